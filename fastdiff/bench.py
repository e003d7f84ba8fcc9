"""Benchmark workloads shared by the pytest-benchmark suites (benchmarks/) and ``fastdiff bench``.

Each ``*_case`` builds inputs once and returns a ``Case``: a callable that runs the work and then
synchronizes (so wall time is device time plus launch overhead, as a user sees it), the bytes the
step's tensors move (read plus written, counted from the tensors), and any one-off setup time
(compile, capture) measured apart. diffusers is needed only for the diffusers providers.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

STEP_SIZES = {
    "latent-1x4x64x64": (1, 4, 64, 64),
    "latent-4x4x128x128": (4, 4, 128, 128),
    "pixel-64x3x256x256": (64, 3, 256, 256),
}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
STEP_SCHEDULERS = {
    "ddpm": ("DDPMScheduler", {}),
    "ddim-eta0": ("DDIMScheduler", {"eta": 0.0}),
    "ddim-eta1": ("DDIMScheduler", {"eta": 1.0}),
}


@dataclass
class Case:
    fn: Callable[[], object]
    nbytes: int = 0
    setup_seconds: float = 0.0
    info: dict = field(default_factory=dict)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_case(case: Case, device, warmup: int = 10, rounds: int = 30, min_time: float = 0.2) -> dict:
    """Median, min and spread of synchronized wall time per call (seconds), after warm-up. Calls are
    batched per round so that a round lasts at least min_time / rounds."""
    for _ in range(warmup):
        case.fn()
    sync(device)
    t0 = time.perf_counter()
    case.fn()
    sync(device)
    once = max(time.perf_counter() - t0, 1e-7)
    iters = max(1, int(min_time / rounds / once))
    samples = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(iters):
            case.fn()
        sync(device)
        samples.append((time.perf_counter() - t0) / iters)
    samples.sort()
    q1, q3 = samples[len(samples) // 4], samples[(3 * len(samples)) // 4]
    return {
        "median_s": statistics.median(samples),
        "min_s": samples[0],
        "iqr_s": q3 - q1,
        "rounds": rounds,
        "iterations": iters,
    }


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read plus written), median of timed copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    case = Case(lambda: dst.copy_(src), 2 * nbytes)
    return case.nbytes / time_case(case, device, warmup=3, rounds=15, min_time=0.3)["median_s"] / 1e9


def _randn(shape, dtype, device, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def step_case(scheduler: str, shape, dtype, device, provider: str) -> Case:
    """One scheduler step at step 10 of 50, timesteps on the device as SD pipelines pass them.

    providers: "diffusers"; "fastdiff" (backend auto), "fastdiff-triton", "fastdiff-cuda" (noise from a
    torch.Generator, same draws as diffusers); "fastdiff-philox" (noise drawn in the kernel);
    "torch-compile" (fastdiff.reference's op-by-op step under torch.compile, noise by torch.randn_like)."""
    name, kwargs = STEP_SCHEDULERS[scheduler]
    x = _randn(shape, dtype, device, 1)
    m = _randn(shape, dtype, device, 2)
    noisy = scheduler == "ddpm" or kwargs.get("eta", 0) > 0
    elem = x.element_size()
    nbytes = x.numel() * elem * 4  # read x, m; write prev, x0
    gen = torch.Generator(device).manual_seed(0)
    if provider == "diffusers":
        import diffusers

        s = getattr(diffusers, name)()
        s.set_timesteps(50, device=device)
        t = s.timesteps[10]
        fn = lambda: s.step(m, t, x, generator=gen, **kwargs)
        return Case(_synced(fn, device), nbytes + (x.numel() * elem if noisy else 0))
    if provider.startswith("fastdiff"):
        import fastdiff

        backend = {"fastdiff": None, "fastdiff-philox": None, "fastdiff-triton": "triton", "fastdiff-cuda": "cuda"}[
            provider
        ]
        s = getattr(fastdiff, name)(backend=backend)
        s.set_timesteps(50, device=device)
        t = s.timesteps[10]
        if provider == "fastdiff-philox":
            seeds = torch.arange(shape[0], device=device)
            fn = lambda: s.step(m, t, x, noise_seed=seeds, **kwargs)
            extra = 0
        else:
            fn = lambda: s.step(m, t, x, generator=gen, **kwargs)
            extra = x.numel() * elem if noisy else 0
        fn()
        return Case(_synced(fn, device), nbytes + extra, info={"backend": s.last_backend})
    if provider == "torch-compile":
        return _compiled_reference_step(name, kwargs, x, m, device, nbytes)
    raise ValueError(f"unknown provider {provider!r}")


def _compiled_reference_step(name, kwargs, x, m, device, nbytes) -> Case:
    import fastdiff
    from fastdiff import reference

    s = getattr(fastdiff, name)()
    s.set_timesteps(50)
    t = int(s.timesteps[10])
    prev_t = int(s.previous_timestep(t))
    acp = s.alphas_cumprod.to(device)
    if name == "DDPMScheduler":

        def step(mm, xx):
            return reference.ddpm_step(mm, t, xx, alphas_cumprod=acp, prev_t=prev_t, noise=torch.randn_like(xx))
    else:
        final = s.final_alpha_cumprod.to(device)
        eta = kwargs.get("eta", 0.0)

        def step(mm, xx):
            noise = torch.randn_like(xx) if eta > 0 else None
            return reference.ddim_step(
                mm, t, xx, alphas_cumprod=acp, final_alpha_cumprod=final, prev_t=prev_t, eta=eta, noise=noise
            )

    compiled = torch.compile(step, dynamic=False)
    t0 = time.perf_counter()
    compiled(m, x)
    compiled(m, x)
    sync(device)
    setup = time.perf_counter() - t0
    return Case(_synced(lambda: compiled(m, x), device), nbytes, setup_seconds=setup)


def add_noise_case(shape, dtype, device, provider: str) -> Case:
    """DDPM add_noise with per-sample timesteps on the device (a training step's q_sample)."""
    x = _randn(shape, dtype, device, 3)
    noise = _randn(shape, dtype, device, 4)
    ts = torch.randint(0, 1000, (shape[0],), device=device, generator=torch.Generator(device).manual_seed(5))
    nbytes = x.numel() * x.element_size() * 3
    if provider == "diffusers":
        import diffusers

        s = diffusers.DDPMScheduler()
        fn = lambda: s.add_noise(x, noise, ts)
        return Case(_synced(fn, device), nbytes)
    if provider.startswith("fastdiff"):
        import fastdiff

        backend = {"fastdiff": None, "fastdiff-triton": "triton", "fastdiff-cuda": "cuda"}[provider]
        s = fastdiff.DDPMScheduler(backend=backend)
        fn = lambda: s.add_noise(x, noise, ts)
        fn()
        return Case(_synced(fn, device), nbytes, info={"backend": s.last_backend})
    if provider == "torch-compile":
        from fastdiff import reference

        acp = fastdiff_acp(device)
        compiled = torch.compile(lambda a, b, c: reference.add_noise(acp, a, b, c), dynamic=False)
        t0 = time.perf_counter()
        compiled(x, noise, ts)
        sync(device)
        return Case(_synced(lambda: compiled(x, noise, ts), device), nbytes, setup_seconds=time.perf_counter() - t0)
    raise ValueError(f"unknown provider {provider!r}")


def fastdiff_acp(device):
    import fastdiff

    return fastdiff.DDPMScheduler().alphas_cumprod.to(device)


def _synced(fn, device):
    if torch.device(device).type != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


# ---------------------------------------------------------------------------------------------- loops


def cifar10_unet(device, dtype, seed=0):
    """diffusers' UNet2DModel with the DDPM-CIFAR10 configuration (google/ddpm-cifar10-32), random weights."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        layers_per_block=2,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None,
        dropout=0.0,
        norm_num_groups=32,
        norm_eps=1e-6,
        downsample_padding=0,
        flip_sin_to_cos=False,
        freq_shift=1,
        resnet_time_scale_shift="default",
    )
    return unet.to(device=device, dtype=dtype).eval()


def small_cond_unet(device, dtype, seed=0):
    """A small UNet2DConditionModel (random weights) for guided sampling, 4x32x32 latents."""
    import diffusers

    torch.manual_seed(seed)
    unet = diffusers.UNet2DConditionModel(
        sample_size=32,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    return unet.to(device=device, dtype=dtype).eval()


def loop_case(model: str, batch: int, steps: int, dtype, device, provider: str, guidance_scale: float = 5.0) -> Case:
    """A whole DDIM sampling loop. model: "cifar10" (UNet2DModel, 3x32x32) or "cond" (UNet2DConditionModel with
    classifier-free guidance, 4x32x32, 16 text tokens). providers: "diffusers" (the hand-written pipeline
    loop), "fastdiff-eager" (fastdiff.sample, graph off), "fastdiff-graph" (GraphSampler),
    "compile-reduce-overhead" (the UNet under torch.compile(mode="reduce-overhead"), diffusers' scheduler)."""
    import diffusers

    import fastdiff

    unet = cifar10_unet(device, dtype) if model == "cifar10" else small_cond_unet(device, dtype)
    shape = (batch, 3, 32, 32) if model == "cifar10" else (batch, 4, 32, 32)
    guided = model == "cond"
    cond = _randn((batch, 16, 64), dtype, device, 6) if guided else None
    uncond = torch.zeros_like(cond) if guided else None
    latents = _randn(shape, dtype, device, 7)
    info = {"params_M": sum(p.numel() for p in unet.parameters()) / 1e6}

    if provider in ("diffusers", "compile-reduce-overhead"):
        sched = diffusers.DDIMScheduler()
        net = unet
        setup = 0.0
        if provider == "compile-reduce-overhead":
            net = torch.compile(unet, mode="reduce-overhead")

        @torch.no_grad()
        def run():
            sched.set_timesteps(steps, device=device)
            x = latents * sched.init_noise_sigma
            for t in sched.timesteps:
                if guided:
                    out = net(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
                    u, c = out.chunk(2)
                    out = u + guidance_scale * (c - u)
                else:
                    out = net(x, t).sample
                x = sched.step(out, t, x).prev_sample
            return x

        if provider == "compile-reduce-overhead":
            t0 = time.perf_counter()
            for _ in range(3):  # compile, then record the cudagraphs
                run()
            sync(device)
            setup = time.perf_counter() - t0
        return Case(_synced(run, device), setup_seconds=setup, info=info)

    kw = (
        dict(
            model_kwargs={"encoder_hidden_states": cond},
            uncond_kwargs={"encoder_hidden_states": uncond},
            guidance_scale=guidance_scale,
        )
        if guided
        else {}
    )
    if provider == "fastdiff-eager":
        fn = lambda: fastdiff.sample(
            unet,
            fastdiff.DDIMScheduler(),
            latents=latents,
            num_inference_steps=steps,
            graph=False,
            progress=False,
            **kw,
        )
        return Case(_synced(torch.no_grad()(fn), device), info=info)
    if provider == "fastdiff-graph":
        sampler = fastdiff.GraphSampler(
            unet,
            fastdiff.DDIMScheduler(),
            shape,
            dtype=dtype,
            num_inference_steps=steps,
            guidance_scale=guidance_scale if guided else None,
        )
        call_kw = {k: v for k, v in kw.items() if k != "guidance_scale"}
        t0 = time.perf_counter()
        sampler(latents=latents, **call_kw)
        sync(device)
        setup = time.perf_counter() - t0
        info.update(
            capture_s=sampler.stats.get("capture_seconds"), graph_MB=sampler.stats.get("graph_bytes", 0) / 2**20
        )
        return Case(_synced(lambda: sampler(latents=latents, **call_kw), device), setup_seconds=setup, info=info)
    raise ValueError(f"unknown provider {provider!r}")


def environment() -> dict:
    import platform

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    try:
        import diffusers

        env["diffusers"] = diffusers.__version__
    except ImportError:
        env["diffusers"] = None
    env["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu"
    return env


def run_subset(device: Optional[str] = None, out=print) -> list:
    """The representative subset behind ``fastdiff bench``: the fused step against diffusers at latent and
    pixel size (fp16), and on CUDA the CIFAR-10 UNet DDIM-50 loop eager vs graph. Returns result rows."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    env = environment()
    out(
        f"fastdiff bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
        f"diffusers {env['diffusers']})"
    )
    cuda = torch.device(device).type == "cuda"
    copy = copy_bandwidth(device) if cuda else None
    if copy:
        out(f"device-to-device copy: {copy:.0f} GB/s")
    sizes = ["latent-1x4x64x64", "pixel-64x3x256x256"] if cuda else ["latent-1x4x64x64"]
    dtype = torch.float16 if cuda else torch.float32
    for size in sizes:
        for sched in ("ddim-eta0", "ddpm"):
            res = {}
            for provider in ("diffusers", "fastdiff"):
                case = step_case(sched, STEP_SIZES[size], dtype, device, provider)
                res[provider] = time_case(case, device, rounds=15, min_time=0.1)["median_s"]
                if provider == "fastdiff":
                    backend = case.info.get("backend")
                    gbps = case.nbytes / res[provider] / 1e9
            row = dict(
                kind="step",
                scheduler=sched,
                size=size,
                dtype=str(dtype).replace("torch.", ""),
                diffusers_us=res["diffusers"] * 1e6,
                fastdiff_us=res["fastdiff"] * 1e6,
                speedup=res["diffusers"] / res["fastdiff"],
                backend=backend,
                GBps=gbps,
                pct_copy=gbps / copy * 100 if copy else None,
            )
            rows.append(row)
            pct = f", {row['pct_copy']:.0f}% of copy" if copy else ""
            out(
                f"step {sched:10s} {size:20s} {row['dtype']}: diffusers {row['diffusers_us']:8.1f} us  fastdiff "
                f"{row['fastdiff_us']:7.1f} us [{backend}]  {row['speedup']:5.1f}x  ({gbps:.0f} GB/s{pct})"
            )
    if cuda:
        res = {}
        for provider in ("diffusers", "fastdiff-eager", "fastdiff-graph"):
            case = loop_case("cifar10", 1, 50, torch.float16, device, provider)
            res[provider] = time_case(case, device, warmup=2, rounds=5, min_time=0.5)["median_s"]
        row = dict(kind="loop", model="cifar10-unet", batch=1, steps=50, **{f"{k}_ms": v * 1e3 for k, v in res.items()})
        rows.append(row)
        out(
            f"DDIM-50 loop, CIFAR-10 UNet, batch 1, fp16: diffusers {res['diffusers'] * 1e3:.1f} ms, fastdiff eager "
            f"{res['fastdiff-eager'] * 1e3:.1f} ms, GraphSampler {res['fastdiff-graph'] * 1e3:.1f} ms "
            f"({res['diffusers'] / res['fastdiff-graph']:.1f}x)"
        )
    return rows
