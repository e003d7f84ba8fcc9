"""Benchmark workloads shared by the pytest-benchmark suites (benchmarks/) and ``fastdiff bench``.

Everything goes through the public API (``PRESETS``/``SCHEDULERS``, ``scheduler.step``, ``sample``,
``GraphSampler``), the same calls a user makes, so the numbers hold for any kernel layout underneath.

Each ``*_case`` builds its inputs once and returns a :class:`Case`:

- ``fn`` runs the timed work and synchronizes (wall time, as a user sees it: host overhead included);
  ``setup`` (untimed, before each call) starts a new loop, ``units`` is how many steps one call takes;
- ``device_fn`` (optional) is the same work without a synchronize, timed on the device with CUDA events
  (:func:`device_time`) for the bandwidth rows: bytes the step must move over that time;
- ``probe`` (optional) counts host syncs (:class:`SyncCounter`) in one more call;
- ``setup_seconds`` is one-off compile or capture time, measured apart from the steady state.

A step at Stable Diffusion latent size is host-bound, so its rows time whole 50-step walks over
``scheduler.timesteps`` (timesteps on the device, as pipelines pass them; per step = walk / steps); a step
at pixel-space batch size is bandwidth-bound, so its rows also time the step on the device.
"""

from __future__ import annotations

import inspect
import platform
import statistics
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

import torch

STEPS = 50  # inference steps per walk and per loop, as in the README's DDIM-50 figures
LATENT = "latent-1x4x64x64"  # Stable Diffusion 1.x/2.x latents at 512 px: host-bound
PIXEL = "pixel-64x3x256x256"  # a pixel-space batch: bandwidth-bound (25 MB per fp16 tensor, beyond L2)
STEP_SIZES = {LATENT: (1, 4, 64, 64), PIXEL: (64, 3, 256, 256)}
# issue 11's "never slower on the CPU" sizes, fp32; the CI subset runs the first unless asked for all
CPU_STEP_SIZES = {"cpu-2x4x16x16": (2, 4, 16, 16), "cpu-1x4x64x64": (1, 4, 64, 64), "cpu-8x3x64x64": (8, 3, 64, 64)}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# The headline step rows, by scheduler class (each row uses the first preset registered for it, e.g. "ddim":
# DDIM with eta 0). A class not registered yet is skipped with a reason, so FlowMatchEuler's rows appear by
# themselves once its scheduler file registers it (issue 12).
HEADLINE_SCHEDULERS = (
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "EulerDiscreteScheduler",
    "FlowMatchEulerDiscreteScheduler",
)
# Bandwidth rows, (preset, noise, providers): a noise-free step (DDIM eta 0) and a noisy one (DDPM), noise drawn
# in the kernel (Philox) or from a generator as diffusers draws it. Both steps are stateless: one index repeats.
BANDWIDTH_CASES = (
    ("ddim", "none", ("diffusers", "fastdiff-triton", "fastdiff-cuda")),
    ("ddpm", "philox", ("fastdiff-triton", "fastdiff-cuda")),
    ("ddpm", "generator", ("diffusers", "fastdiff-triton")),
)
# The whole-loop FlowMatchEuler hook (issue 12): a 4-step loop on a small Flux-shaped transformer.
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"
FLOW_STEPS = 4

PROVIDERS = {
    "diffusers": "diffusers' scheduler.step",
    "diffusers-compile": "torch.compile(diffusers' scheduler.step)",
    "fastdiff": 'fastdiff, backend="auto"',
    "fastdiff-cuda": 'fastdiff, backend="cuda" (the CUDA C++ extension)',
    "fastdiff-triton": 'fastdiff, backend="triton"',
}


class Unavailable(RuntimeError):
    """A case that cannot run here (a missing scheduler, extension or library); the suites skip it."""


@dataclass
class Case:
    fn: Callable[[], object]
    setup: Optional[Callable[[], None]] = None
    units: int = 1
    nbytes: int = 0  # bytes one unit (step) must move: read x and the model output, write prev and x0
    device_fn: Optional[Callable[[], object]] = None
    probe: Optional[Callable[[], dict]] = None
    setup_seconds: float = 0.0
    info: dict = field(default_factory=dict)


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def _synced(fn, device):
    if not is_cuda(device):
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize(device)
        return out

    return run


def _spread(samples: list) -> dict:
    samples = sorted(samples)
    q1, q3 = samples[len(samples) // 4], samples[(3 * len(samples)) // 4]
    return {"median_s": statistics.median(samples), "min_s": samples[0], "iqr_s": q3 - q1, "rounds": len(samples)}


def time_case(case: Case, device, warmup: int = 3, rounds: int = 20, min_time: float = 0.1) -> dict:
    """Median, min and interquartile spread of synchronized wall time per unit (seconds), after warm-up.
    Calls without a ``setup`` are batched per round so that a round lasts at least ``min_time / rounds``."""
    for _ in range(warmup):
        if case.setup:
            case.setup()
        case.fn()
    iters = 1
    if case.setup is None:
        t0 = time.perf_counter()
        case.fn()
        once = max(time.perf_counter() - t0, 1e-7)
        iters = max(1, int(min_time / rounds / once))
    samples = []
    for _ in range(rounds):
        if case.setup:
            case.setup()
        sync(device)
        t0 = time.perf_counter()
        for _ in range(iters):
            case.fn()
        samples.append((time.perf_counter() - t0) / iters / case.units)
    return dict(_spread(samples), iterations=iters)


def time_interleaved(cases: dict, device, warmup: int = 3, rounds: int = 20) -> dict:
    """:func:`time_case` for several cases side by side, in interleaved rounds (one call of each per round, the
    order rotating), so that drift in the machine's speed (clocks, a busy neighbour) falls on all of them
    alike. Returns {name: median, min and spread per unit (seconds)}."""
    for case in cases.values():
        for _ in range(warmup):
            if case.setup:
                case.setup()
            case.fn()
    names = list(cases)
    samples: dict = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            case = cases[name]
            if case.setup:
                case.setup()
            sync(device)
            t0 = time.perf_counter()
            case.fn()
            samples[name].append((time.perf_counter() - t0) / case.units)
    return {name: _spread(v) for name, v in samples.items()}


_FLUSH: dict = {}


def device_time(fn, device="cuda", rep: int = 50, warmup: int = 10, flush: bool = True) -> dict:
    """Device time of ``fn`` (seconds; median and spread of ``rep`` calls) with CUDA events. Before each call a
    256 MB buffer is zeroed: it evicts the previous call's data from L2 and keeps the GPU busy while the host
    enqueues the call, so host launch overhead stays out of the events (as in ``triton.testing.do_bench``)."""
    buf = _FLUSH.get(device) if flush else None
    if flush and buf is None:
        buf = _FLUSH[device] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    for _ in range(warmup):
        fn()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for s, e in zip(starts, ends):
        if buf is not None:
            buf.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize(device)
    return _spread([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read plus written): median of event-timed 1 GB copies."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    t = device_time(lambda: dst.copy_(src), device, rep=20, warmup=3, flush=False)["median_s"]
    return 2 * nbytes / t / 1e9


# ------------------------------------------------------------------------------------------- host syncs


class SyncCounter:
    """Counts host-device synchronizations inside a ``with`` block: ``torch.cuda.set_sync_debug_mode("warn")``
    makes every synchronizing CUDA call (``.item()``, a pageable copy, ``nonzero``, ``synchronize`` ...) warn,
    and the warnings are counted. ``count`` is None off CUDA; :func:`sync_counter_works` checks it counts."""

    def __init__(self, device):
        self.cuda = is_cuda(device)
        self.device = device
        self.count: Optional[int] = None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)  # earlier work's syncs are not ours
            self._mode = torch.cuda.get_sync_debug_mode()
            self._catch = warnings.catch_warnings(record=True)
            self._log = self._catch.__enter__()
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.set_sync_debug_mode(self._mode)
            self._catch.__exit__(*exc)
            self.count = sum("synchroniz" in str(w.message) for w in self._log)
        return False


def sync_counter_works(device) -> bool:
    """True when :class:`SyncCounter` sees a known sync (``.item()`` of a CUDA tensor) and none in a plain add,
    so a count of 0 means no sync rather than a counter that stopped counting."""
    if not is_cuda(device):
        return False
    x = torch.ones(4, device=device)
    with SyncCounter(device) as with_sync:
        x.sum().item()
    with SyncCounter(device) as without:
        x.add_(1)
    return bool(with_sync.count) and without.count == 0


def _mean(counts: list):
    return None if None in counts else sum(counts) / len(counts)


# ------------------------------------------------------------------------------------------ schedulers


def _randn(shape, dtype, device, seed=0):
    g = torch.Generator(device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def headline_preset(scheduler: str) -> str:
    """The preset the headline rows use for a scheduler class: the first one its file registers."""
    from .schedulers import PRESETS, SCHEDULERS

    if scheduler not in SCHEDULERS:
        raise Unavailable(f"fastdiff has no {scheduler} registered yet")
    for name, p in PRESETS.items():
        if p.scheduler == scheduler:
            return name
    raise Unavailable(f"{scheduler} registers no sampler preset")


def make_scheduler(preset: str, provider: str):
    """(scheduler, step kwargs) for a sampler preset: diffusers' class of the same name for the diffusers
    providers, fastdiff's with the provider's backend otherwise; same config overrides for both."""
    from .schedulers import PRESETS

    if preset not in PRESETS:
        raise Unavailable(f"no sampler preset {preset!r} is registered (have: {', '.join(PRESETS)})")
    p = PRESETS[preset]
    if provider.startswith("diffusers"):
        import diffusers

        cls = getattr(diffusers, p.scheduler, None)
        if cls is None:
            raise Unavailable(f"diffusers {diffusers.__version__} has no {p.scheduler}")
        return cls.from_config(dict(p.config)), dict(p.step_kwargs)
    backends = {"fastdiff": None, "fastdiff-cuda": "cuda", "fastdiff-triton": "triton"}
    if provider not in backends:
        raise ValueError(f"unknown provider {provider!r}; expected one of {list(PROVIDERS)}")
    backend = backends[provider]
    if backend == "cuda":
        why = cuda_ext_error()
        if why:
            raise Unavailable(f"the CUDA extension fastdiff._C is not built or does not load: {why}")
    return p.cls.from_config(dict(p.config), backend=backend), dict(p.step_kwargs)


def cpu_walk_case(preset: str, shape, provider: str, steps: int = 20, seed: int = 0) -> Case:
    """A whole walk on the CPU in float32, ``set_timesteps`` to the last step, each step's output fed to the
    next, fresh model outputs (drawn once); noise from a generator reseeded per walk, as diffusers draws it.
    ``provider``: "diffusers", or "fastdiff" (backend "auto"). Per unit: one step."""
    s, kw = make_scheduler(preset, provider)
    x0 = _randn(shape, torch.float32, "cpu", seed + 1)
    ms = [_randn(shape, torch.float32, "cpu", seed + 2 + i) for i in range(steps)]
    takes_generator = "generator" in inspect.signature(s.step).parameters
    scales = hasattr(s, "scale_model_input")
    gen = torch.Generator().manual_seed(seed)

    def walk():
        gen.manual_seed(seed)
        s.set_timesteps(steps)
        x = x0
        for t, m in zip(s.timesteps, ms):
            x_in = s.scale_model_input(x, t) if scales else x  # diffusers' FlowMatchEuler has none
            x = s.step(m, t, x_in, **kw, **({"generator": gen} if takes_generator else {}))[0]
        return x

    return Case(walk, units=steps, info={"preset": preset, "provider": provider})


def cpu_parity(sizes: dict = CPU_STEP_SIZES, presets=None, steps: int = 20, rounds: int = 15, out=print) -> list:
    """diffusers' step against fastdiff's (``backend="auto"``) on CPU tensors: for every preset and size, whole
    walks timed side by side in interleaved rounds (:func:`time_interleaved`). Returns one row per (preset,
    size): medians and interquartile spreads per step, and ``ratio`` = diffusers' median / fastdiff's."""
    from . import ops
    from .schedulers import PRESETS

    rows = []
    for size, shape in sizes.items():
        for preset in presets or PRESETS:
            try:
                cases = {p: cpu_walk_case(preset, shape, p, steps) for p in ("diffusers", "fastdiff")}
            except Unavailable as exc:
                out(f"{size:16s} {preset:16s} skipped: {exc}")
                continue
            t = time_interleaved(cases, "cpu", warmup=2, rounds=rounds)
            d, f = t["diffusers"], t["fastdiff"]
            row = dict(
                size=size,
                preset=preset,
                backend=ops.select(None, "cpu", torch.float32),
                diffusers_us=d["median_s"] * 1e6,
                diffusers_iqr_us=d["iqr_s"] * 1e6,
                fastdiff_us=f["median_s"] * 1e6,
                fastdiff_iqr_us=f["iqr_s"] * 1e6,
                ratio=d["median_s"] / f["median_s"],
                rounds=rounds,
                steps=steps,
            )
            rows.append(row)
            out(
                f"{size:16s} {preset:16s} diffusers {row['diffusers_us']:8.1f} us/step "
                f"(IQR {row['diffusers_iqr_us']:6.1f})  fastdiff[{row['backend']}] {row['fastdiff_us']:8.1f} "
                f"(IQR {row['fastdiff_iqr_us']:6.1f})  diffusers/fastdiff {row['ratio']:.2f}"
            )
    return rows


def cuda_ext_error() -> Optional[str]:
    """None when the CUDA extension ``fastdiff._C`` imports, else why not."""
    try:
        from . import _C  # noqa: F401
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _noise_kwargs(noise: str, provider: str, device) -> dict:
    if noise == "none":
        return {}
    if noise == "philox":
        if not provider.startswith("fastdiff"):
            raise Unavailable(f"{provider} has no in-kernel Philox noise")
        return {"noise_seed": 0}  # seeds 0..B-1, one per sample
    if noise != "generator":
        raise ValueError(f"`noise` must be 'none', 'generator' or 'philox', got {noise!r}")
    return {"generator": torch.Generator(device).manual_seed(0)}


def step_case(preset: str, shape, dtype, device, provider: str, noise: str = "generator", steps: int = STEPS) -> Case:
    """A walk of ``steps`` scheduler steps (set_timesteps untimed before each walk, timesteps on the device),
    fixed inputs x and model output m. Per unit: one step. ``provider``: one of :data:`PROVIDERS`."""
    x = _randn(shape, dtype, device, 1)
    m = _randn(shape, dtype, device, 2)
    s, kw = make_scheduler(preset, provider)
    kw.update(_noise_kwargs(noise, provider, device))
    s.set_timesteps(steps, device=device)
    if hasattr(s, "scale_model_input"):  # diffusers' sigma schedulers warn on every step until this was called
        s.scale_model_input(x, s.timesteps[0])
    step = s.step
    setup_seconds = 0.0
    if provider == "diffusers-compile":
        step = torch.compile(s.step)
    start = lambda: s.set_timesteps(steps, device=device)

    def walk():
        for t in s.timesteps:  # views of the device tensor: no host read
            out = step(m, t, x, **kw)
        return out

    fn = _synced(walk, device)
    info = {"preset": preset, "noise": noise if draws_noise(preset) else "none"}
    if provider == "diffusers-compile":
        t0 = time.perf_counter()
        try:
            for _ in range(2):  # compile (recompiles included), then one steady walk
                start()
                fn()
        except Exception as exc:  # dynamo may refuse a CUDA timestep indexing diffusers' CPU alphas_cumprod
            torch._dynamo.reset()
            for name, value in list(vars(s).items()):
                if isinstance(value, torch.Tensor) and name != "timesteps":
                    setattr(s, name, value.to(device))
            step = torch.compile(s.step)
            for _ in range(2):
                start()
                fn()
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            info["compile_note"] = f"as is: {type(exc).__name__}: {first}; compiled with its tables on the device"
        setup_seconds = time.perf_counter() - t0

    def probe():
        with SyncCounter(device) as c:
            start()
        counts = []
        for t in s.timesteps:
            with SyncCounter(device) as one:
                step(m, t, x, **kw)
            counts.append(one.count)
        sync(device)
        later = counts[1:] or [0]
        return {"syncs_set_timesteps": c.count, "syncs_first_step": counts[0], "syncs_per_step": _mean(later)}

    case = Case(fn, setup=start, units=steps, nbytes=4 * x.numel() * x.element_size(), probe=probe, info=info)
    case.setup_seconds = setup_seconds
    start()
    fn()
    if hasattr(s, "last_backend"):
        info["backend"] = s.last_backend
    return case


def draws_noise(preset: str) -> bool:
    """Whether a preset's step draws noise (DDPM, ancestral and SDE samplers, DDIM with eta > 0)."""
    from .schedulers import PRESETS

    p = PRESETS[preset]
    return p.cls.from_config(p.config).draws_noise(p.step_kwargs)


def device_step_case(preset: str, shape, dtype, device, provider: str, noise: str = "generator") -> Case:
    """One scheduler step at step 10 of 50, repeated (DDIM and DDPM steps carry no state between calls): wall
    time per synchronized call, and device time per step for GB/s against the copy bandwidth."""
    x = _randn(shape, dtype, device, 1)
    m = _randn(shape, dtype, device, 2)
    s, kw = make_scheduler(preset, provider)
    if provider == "diffusers-compile":
        raise Unavailable("the compiled step is timed in the latent-size walks")
    if hasattr(s, "step_index"):  # sigma-space and multistep samplers count their steps
        raise Unavailable(f"{type(s).__name__} keeps state between steps: time it as a walk (step_case)")
    kw.update(_noise_kwargs(noise, provider, device))
    s.set_timesteps(STEPS, device=device)
    t = s.timesteps[10]
    call = lambda: s.step(m, t, x, **kw)
    call()
    info = {"preset": preset, "noise": noise if draws_noise(preset) else "none"}
    if hasattr(s, "last_backend"):
        info["backend"] = s.last_backend
    return Case(
        _synced(call, device),
        nbytes=4 * x.numel() * x.element_size(),
        device_fn=call if is_cuda(device) else None,
        info=info,
    )


def add_noise_case(shape, dtype, device, provider: str) -> Case:
    """DDPM add_noise with per-sample timesteps on the device (a training step's q_sample)."""
    x = _randn(shape, dtype, device, 3)
    noise = _randn(shape, dtype, device, 4)
    ts = torch.randint(0, 1000, (shape[0],), device=device, generator=torch.Generator(device).manual_seed(5))
    s, _ = make_scheduler("ddpm", provider)
    fn = lambda: s.add_noise(x, noise, ts)
    fn()
    info = {"backend": s.last_backend} if hasattr(s, "last_backend") else {}
    return Case(_synced(fn, device), nbytes=x.numel() * x.element_size() * 3, info=info)


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


# A small Flux-shaped transformer: FLUX.1's block structure (double- then single-stream blocks, 3-axis RoPE,
# 64 packed latent channels) at a fraction of its width and depth; 256 px images as 16x16 packed tokens.
FLUX_SMALL = dict(
    patch_size=1,
    in_channels=64,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=64,
    num_attention_heads=4,
    joint_attention_dim=256,
    pooled_projection_dim=128,
    guidance_embeds=False,
    axes_dims_rope=(8, 28, 28),
)
FLUX_TOKENS, FLUX_TEXT_TOKENS = 16 * 16, 64


class FluxDenoiser(torch.nn.Module):
    """``model(x, t, **cond)`` around a FluxTransformer2DModel, called as FluxPipeline calls it (timestep / 1000
    for every sample): the callable form ``fastdiff.sample`` and ``GraphSampler`` take."""

    def __init__(self, transformer):
        super().__init__()
        self.transformer = transformer

    def forward(self, x, t, **cond):
        timestep = (t / 1000).expand(x.shape[0]).to(x.dtype)
        return self.transformer(hidden_states=x, timestep=timestep, return_dict=False, **cond)[0]


def flux_transformer(device, dtype, seed=0):
    import diffusers

    torch.manual_seed(seed)
    return diffusers.FluxTransformer2DModel(**FLUX_SMALL).to(device=device, dtype=dtype).eval()


def _flux_inputs(batch, dtype, device):
    d = FLUX_SMALL
    side = int(FLUX_TOKENS**0.5)
    img_ids = torch.zeros(side, side, 3, device=device)
    img_ids[..., 1] = torch.arange(side, device=device)[:, None]
    img_ids[..., 2] = torch.arange(side, device=device)[None, :]
    return {
        "encoder_hidden_states": _randn((batch, FLUX_TEXT_TOKENS, d["joint_attention_dim"]), dtype, device, 8),
        "pooled_projections": _randn((batch, d["pooled_projection_dim"]), dtype, device, 9),
        "img_ids": img_ids.reshape(-1, 3).to(dtype),
        "txt_ids": torch.zeros(FLUX_TEXT_TOKENS, 3, device=device, dtype=dtype),
    }


def loop_case(model: str, batch: int, steps: int, dtype, device, provider: str, guidance_scale: float = 5.0) -> Case:
    """A whole sampling loop. model: "cifar10" (UNet2DModel, 3x32x32, DDIM), "cond" (UNet2DConditionModel with
    classifier-free guidance, 4x32x32, 16 text tokens, DDIM) or "flux" (small Flux-shaped transformer, packed
    latents, FlowMatchEuler). providers: "diffusers" (the hand-written pipeline loop), "fastdiff-eager"
    (fastdiff.sample, graph off), "fastdiff-graph" (GraphSampler), "unet-compile" (the denoiser under
    torch.compile(mode="reduce-overhead"), diffusers' scheduler)."""
    import diffusers

    import fastdiff

    from .schedulers import SCHEDULERS

    if model == "flux":
        sched_name = FLOW_SCHEDULER
        if provider.startswith("fastdiff") and sched_name not in SCHEDULERS:
            raise Unavailable(f"fastdiff has no {sched_name} yet (issue 12): the Flux loop runs once it lands")
        net = FluxDenoiser(flux_transformer(device, dtype))
        shape = (batch, FLUX_TOKENS, FLUX_SMALL["in_channels"])
        cond = _flux_inputs(batch, dtype, device)
        guided = False
    else:
        sched_name = "DDIMScheduler"
        net = cifar10_unet(device, dtype) if model == "cifar10" else small_cond_unet(device, dtype)
        shape = (batch, 3, 32, 32) if model == "cifar10" else (batch, 4, 32, 32)
        guided = model == "cond"
        cond = {"encoder_hidden_states": _randn((batch, 16, 64), dtype, device, 6)} if guided else {}
    uncond = {k: torch.zeros_like(v) for k, v in cond.items()} if guided else None
    latents = _randn(shape, dtype, device, 7)
    info = {"params_M": sum(p.numel() for p in net.parameters()) / 1e6, "scheduler": sched_name}

    if provider in ("diffusers", "unet-compile"):
        sched = getattr(diffusers, sched_name)()
        call = torch.compile(net, mode="reduce-overhead") if provider == "unet-compile" else net
        doubled = {k: torch.cat([uncond[k], v]) for k, v in cond.items()} if guided else cond
        scale = getattr(sched, "scale_model_input", lambda x, t: x)  # FlowMatchEuler has none

        @torch.no_grad()
        def run():
            sched.set_timesteps(steps, device=device)
            x = latents * getattr(sched, "init_noise_sigma", 1.0)  # FlowMatchEuler has none: its noise is unscaled
            for t in sched.timesteps:
                out = _output(call(scale(torch.cat([x, x]) if guided else x, t), t, **doubled))
                if guided:
                    u, c = out.chunk(2)
                    out = u + guidance_scale * (c - u)
                x = sched.step(out, t, x).prev_sample
            return x

        setup = 0.0
        if provider == "unet-compile":
            t0 = time.perf_counter()
            for _ in range(3):  # compile, then record the cudagraphs (reduce-overhead records on later calls)
                run()
            sync(device)
            setup = time.perf_counter() - t0
        return Case(_synced(run, device), setup_seconds=setup, probe=_loop_probe(run, device, steps), info=info)

    sched = getattr(fastdiff, sched_name)()
    kw = {"model_kwargs": cond} if cond else {}
    if guided:
        kw.update(uncond_kwargs=uncond, guidance_scale=guidance_scale)
    if provider == "fastdiff-eager":
        fn = torch.no_grad()(
            lambda: fastdiff.sample(
                net, sched, latents=latents, num_inference_steps=steps, graph=False, progress=False, **kw
            )
        )
        fn()
        info["backend"] = sched.last_backend
        return Case(_synced(fn, device), probe=_loop_probe(fn, device, steps), info=info)
    if provider == "fastdiff-graph":
        sampler = fastdiff.GraphSampler(
            net, sched, shape, dtype=dtype, num_inference_steps=steps, guidance_scale=guidance_scale if guided else None
        )
        call_kw = {k: v for k, v in kw.items() if k != "guidance_scale"}
        t0 = time.perf_counter()
        sampler(latents=latents, **call_kw)
        sync(device)
        setup = time.perf_counter() - t0
        info.update(
            backend=sampler.scheduler.last_backend,
            capture_s=sampler.stats.get("capture_seconds"),
            graph_MB=(sampler.stats.get("graph_bytes") or 0) / 2**20,
        )
        fn = lambda: sampler(latents=latents, **call_kw)
        return Case(_synced(fn, device), setup_seconds=setup, probe=_loop_probe(fn, device, steps), info=info)
    raise ValueError(f"unknown provider {provider!r}")


def _output(out):
    if isinstance(out, torch.Tensor):
        return out
    return out.sample if hasattr(out, "sample") else out[0]


def _loop_probe(fn, device, steps):
    def probe():
        with SyncCounter(device) as c:
            fn()
        sync(device)
        return {"syncs_per_loop": c.count, "syncs_per_step": None if c.count is None else c.count / steps}

    return probe


# ------------------------------------------------------------------------------------------ environment


def environment() -> dict:
    """Device, driver and versions for the results files."""
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version()}
    for name in ("triton", "diffusers"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    from ._version import __version__

    env["fastdiff"] = __version__
    env["cuda_ext"] = cuda_ext_error() or "loaded"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env["device"] = props.name
        env["capability"] = f"{props.major}.{props.minor}"
        env["sms"] = props.multi_processor_count
        env["memory_GB"] = round(props.total_memory / 1e9, 1)
        try:
            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            env["driver"] = out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
        except (OSError, subprocess.SubprocessError, IndexError):
            env["driver"] = None
    else:
        env["device"] = platform.processor() or platform.machine() or "cpu"
    return env


# ------------------------------------------------------------------------------------------ fastdiff bench


def run_subset(device: Optional[str] = None, out=print) -> list:
    """The representative subset behind ``fastdiff bench``: 50-step walks of DDIM and DDPM against diffusers at
    latent size (and on CUDA the step's device-time bandwidth at pixel size, and the CIFAR-10 UNet DDIM-50 loop
    eager vs graph). Returns result rows."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    env = environment()
    out(
        f"fastdiff bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, "
        f"diffusers {env['diffusers']})"
    )
    cuda = is_cuda(device)
    copy = copy_bandwidth(device) if cuda else None
    if copy:
        out(f"device-to-device copy: {copy:.0f} GB/s")
    dtype = torch.float16 if cuda else torch.float32
    for preset in ("ddim", "ddpm"):
        cases = {p: step_case(preset, STEP_SIZES[LATENT], dtype, device, p) for p in ("diffusers", "fastdiff")}
        res = {p: st["median_s"] for p, st in time_interleaved(cases, device, rounds=10).items()}
        backend = cases["fastdiff"].info.get("backend")
        row = dict(
            kind="step",
            preset=preset,
            size=LATENT,
            dtype=str(dtype).replace("torch.", ""),
            diffusers_us=res["diffusers"] * 1e6,
            fastdiff_us=res["fastdiff"] * 1e6,
            speedup=res["diffusers"] / res["fastdiff"],
            backend=backend,
        )
        rows.append(row)
        out(
            f"step {preset:5s} {LATENT} {row['dtype']}, per step of a {STEPS}-step walk: diffusers "
            f"{row['diffusers_us']:8.1f} us  fastdiff {row['fastdiff_us']:7.1f} us [{backend}]  {row['speedup']:5.1f}x"
        )
    if cuda:
        case = device_step_case("ddim", STEP_SIZES[PIXEL], dtype, device, "fastdiff")
        t = device_time(case.device_fn, device)["median_s"]
        gbps = case.nbytes / t / 1e9
        rows.append(
            dict(kind="bandwidth", preset="ddim", size=PIXEL, device_us=t * 1e6, GBps=gbps, pct_copy=gbps / copy * 100)
        )
        out(
            f"step ddim {PIXEL} fp16 on the device: {t * 1e6:.1f} us, {gbps:.0f} GB/s, {gbps / copy * 100:.0f}% of copy"
        )
        res = {}
        for provider in ("diffusers", "fastdiff-eager", "fastdiff-graph"):
            case = loop_case("cifar10", 1, STEPS, torch.float16, device, provider)
            res[provider] = time_case(case, device, warmup=2, rounds=5)["median_s"]
        row = dict(
            kind="loop", model="cifar10-unet", batch=1, steps=STEPS, **{f"{k}_ms": v * 1e3 for k, v in res.items()}
        )
        rows.append(row)
        out(
            f"DDIM-{STEPS} loop, CIFAR-10 UNet, batch 1, fp16: diffusers {res['diffusers'] * 1e3:.1f} ms, "
            f"fastdiff eager {res['fastdiff-eager'] * 1e3:.1f} ms, GraphSampler {res['fastdiff-graph'] * 1e3:.1f} ms "
            f"({res['diffusers'] / res['fastdiff-graph']:.1f}x)"
        )
    return rows
