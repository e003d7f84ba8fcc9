"""Command line: ``fastdiff doctor``, ``fastdiff sample``, ``fastdiff generate``, ``fastdiff bench``.

Every argument is checked before a model is loaded, and every user error ends with a one-line message and exit
code 2, never a traceback. Output files are written to a temporary file in their folder and renamed when
complete, so a failed or interrupted run leaves nothing behind.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
from dataclasses import dataclass

from ._version import __version__


class UsageError(Exception):
    """A bad argument: printed as one line, exit code 2."""


def _version(mod: str) -> str:
    try:
        module = __import__(mod)
        return getattr(module, "__version__", "installed")
    except Exception as exc:  # not installed, or broken
        return f"not available ({type(exc).__name__})"


def doctor(args) -> int:
    """Print versions, devices and which backends can run where, and why not."""
    import torch

    from . import _backend, ops

    print(f"fastdiff {__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    print(f"torch {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})")
    print(f"triton {_version('triton')}")
    print(f"diffusers {_version('diffusers')} (optional)")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(
                f"cuda:{i} {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB, "
                f"{p.multi_processor_count} SMs"
            )
    else:
        print("CUDA devices: none (torch.cuda.is_available() is False)")
    print(
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!s} FASTDIFF_BACKEND="
        f"{os.environ.get('FASTDIFF_BACKEND', '')!s}"
    )
    ext = _backend._cuda_ext_error()
    print(f"CUDA extension fastdiff._C: {'built' if ext is None else 'not available (' + ext + ')'}")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for dev in devices:
        print(f"backends on {dev}:")
        for b in ops.BACKENDS[1:]:
            why = ops.unavailable(b, torch.device(dev))
            print(f"  {b:9s} {'available' if why is None else 'unavailable: ' + why}")
        try:
            print(f"  auto -> {ops.select(None, dev)}")
        except Exception as exc:
            print(f"  auto -> error: {exc}")
    return 0


def bench_cmd(args) -> int:
    """A representative subset of the benchmarks, printed as a table (full suites: pytest benchmarks/)."""
    import torch

    from . import bench

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise UsageError("the benchmarks compare against diffusers: pip install 'fastdiff[bench]'") from None
    bench.run_subset(args.device)
    return 0


# The cosine schedule reaches sigma ~ 2e4 at t = 999, where the unclipped sigma-space samplers fall apart
# (digits model, 100 samples, 20-30 steps, fastdiff and diffusers alike: mean top-class probability 0.41-0.43);
# diffusers' remedies: DPM-Solver's lambda_min_clipped=-5.1 (0.945) and Euler from t=980, "leading" (0.95).
# UniPC (200 samples): linspace 0.416 at 10 steps, 0.419 at 20; "leading" (from t=900 / 940) 0.931 and 0.938.
COSINE_OVERRIDES = {
    "EulerDiscreteScheduler": {"timestep_spacing": "leading"},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing": "leading"},
    "DPMSolverMultistepScheduler": {"lambda_min_clipped": -5.1},
    "UniPCMultistepScheduler": {"timestep_spacing": "leading"},
}

# the sampler of flow-matching models (x = (1 - sigma) x0 + sigma noise, velocity prediction)
FLOW_SCHEDULER = "FlowMatchEulerDiscreteScheduler"

# `fastdiff sample` runs at most this many pixels (batch x height x width) per batch when --batch-size is not
# given: 256 digits of 16x16. The digits model's peak memory grows by ~0.4 MiB per sample (CPU, fp32: +270 MiB at
# batch 256, +565 MiB at 1024 over the process's base), so a default batch stays near 100 MiB of work.
AUTO_BATCH_PIXELS = 256 * 16 * 16
# the grid's tiles are upscaled this many times (nearest) so that 16x16 digits are visible
GRID_SCALE = 4


# ----------------------------------------------------------------------------------------------- argument types


def _positive_int(name):
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {text!r}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {value}")
        return value

    return parse


def _finite_float(name, minimum=None):
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{name} must be a finite number, got {text!r}")
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"{name} must be >= {minimum:g}, got {value:g}")
        return value

    return parse


# ----------------------------------------------------------------------------------------------- CPU threads


def default_threads() -> int:
    """CPU threads for ``fastdiff sample``: the CPUs this process may use minus the machine's 1-minute load
    average (the cores other processes leave idle), at least 1.

    Measured on this project's 2-core machine (digits model, 64 images, DDIM 50 steps, load average 1.7-4.3 from
    other users): 1 thread median 10.6 s (9.3-12.0 s over 3 runs), 2 threads median 26.4 s (9.0-74.3 s). A second
    thread gains at most 3% when a core is free and costs up to 7x when another process holds it, because
    torch's threads wait for each other at every operator.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        load = os.getloadavg()[0]
    except OSError:  # not available on this platform
        load = 0.0
    return max(1, cpus - int(round(load)))


def _set_threads(threads: int, device) -> None:
    import torch

    if device.type == "cpu":
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------------- model


@dataclass(frozen=True)
class ModelInfo:
    """What a --model needs before its weights are loaded: its kind ('digits', 'digits-flow', 'pipeline' or
    'unet'), scheduler config, one sample's (C, H, W) and whether it takes class labels."""

    spec: str
    kind: str
    sched_config: dict
    chw: tuple
    labelled: bool


def _read_json(path: str, spec: str) -> dict:
    import json

    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise UsageError(f"--model {spec}: cannot read {path} ({exc})") from None


def _unet_info(spec: str, config: dict, sched_config: dict, kind: str) -> ModelInfo:
    if config.get("_class_name") != "UNet2DModel":
        raise UsageError(f"--model {spec}: config.json describes {config.get('_class_name')!r}, not a UNet2DModel")
    size = config.get("sample_size")
    hw = (size, size) if isinstance(size, int) else tuple(size or ())
    if len(hw) != 2:
        raise UsageError(f"--model {spec}: the UNet config has sample_size {size!r}; expected an int or (H, W)")
    return ModelInfo(spec, kind, sched_config, (int(config.get("in_channels", 3)), *hw), False)


def _model_info(spec: str) -> ModelInfo:
    """Read --model's configs, without loading weights (that comes after every argument is checked)."""
    if spec == "digits":
        from .models import digits

        chw = (digits.CHANNELS, digits.IMAGE_SIZE, digits.IMAGE_SIZE)
        return ModelInfo(spec, "digits", dict(digits.SCHEDULER_CONFIG), chw, True)
    if spec == "digits-flow":
        from .models import digits

        chw = (digits.CHANNELS, digits.IMAGE_SIZE, digits.IMAGE_SIZE)
        return ModelInfo(spec, "digits-flow", dict(digits.FLOW_SCHEDULER_CONFIG), chw, True)
    if not os.path.isdir(spec):
        raise UsageError(f"--model {spec}: not 'digits', not 'digits-flow' and not a local folder")
    import importlib.util

    if importlib.util.find_spec("diffusers") is None:
        raise UsageError("--model with a folder needs diffusers: pip install 'fastdiff[diffusers]'")
    index = os.path.join(spec, "model_index.json")
    if os.path.isfile(index):
        unet = _read_json(index, spec).get("unet")
        if not (isinstance(unet, list) and unet[-1] == "UNet2DModel"):
            raise UsageError(
                f"--model {spec}: the pipeline's denoiser is {unet!r}; fastdiff runs unconditional UNet2DModels"
            )
        config = _read_json(os.path.join(spec, "unet", "config.json"), spec)
        sched_path = os.path.join(spec, "scheduler", "scheduler_config.json")
        return _unet_info(spec, config, _read_json(sched_path, spec) if os.path.isfile(sched_path) else {}, "pipeline")
    if os.path.isfile(os.path.join(spec, "config.json")):
        config = _read_json(os.path.join(spec, "config.json"), spec)
        sched_path = os.path.join(spec, "scheduler_config.json")
        return _unet_info(spec, config, _read_json(sched_path, spec) if os.path.isfile(sched_path) else {}, "unet")
    raise UsageError(f"--model {spec}: no model_index.json or config.json: not a diffusers model folder")


def _load_model(info: ModelInfo, device, dtype):
    """The denoiser of --model, on ``device`` in ``dtype``, in eval mode."""
    if info.kind == "digits":
        from .models import digits

        return digits.load_default_model(device=device, dtype=dtype)
    if info.kind == "digits-flow":
        from .models import digits

        return digits.load_flow_model(device=device, dtype=dtype)
    import diffusers

    try:
        if info.kind == "pipeline":
            unet = diffusers.UNet2DModel.from_pretrained(info.spec, subfolder="unet", local_files_only=True)
        else:
            unet = diffusers.UNet2DModel.from_pretrained(info.spec, local_files_only=True)
    except Exception as exc:  # a corrupt or incomplete folder
        raise UsageError(
            f"--model {info.spec}: cannot load it as a diffusion model ({type(exc).__name__}: {exc})"
        ) from None
    return unet.to(device=device, dtype=dtype).eval()


# ----------------------------------------------------------------------------------------------- sampler


def _is_flow_preset(preset) -> bool:
    """Whether a preset samples velocity (flow-matching) models only: FlowMatchEuler's, or a solver's flow mode."""
    return preset.scheduler == FLOW_SCHEDULER or preset.config.get("prediction_type") == "flow_prediction"


def _flow_presets(presets) -> list:
    """The sampler presets that can sample the flow-matching digits model: the flow presets (FlowMatchEuler's,
    dpm++2m-flow), and those of a solver that ``FLOW_MODE_OVERRIDES`` puts in flow mode that pick no other sigma
    spacing (diffusers' UniPC takes Karras / exponential / beta sigmas before flow sigmas, from the DDPM betas:
    wrong for a flow model)."""
    from .models.digits import FLOW_MODE_OVERRIDES

    other_sigmas = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
    return sorted(
        p.name
        for p in presets.values()
        if _is_flow_preset(p) or (p.scheduler in FLOW_MODE_OVERRIDES and not any(p.config.get(k) for k in other_sigmas))
    )


def _preset(args, info: ModelInfo):
    """The sampler preset of --sampler (default: flow-euler for the flow model, ddim otherwise), checked against
    what the model predicts: a flow model takes only flow samplers, an epsilon/v/x0 model no flow preset."""
    from .schedulers import PRESETS

    flow = info.kind == "digits-flow"
    if args.sampler is None:
        args.sampler = "flow-euler" if flow else "ddim"
    preset = PRESETS[args.sampler]
    if flow and args.sampler not in _flow_presets(PRESETS):
        raise UsageError(
            f"--sampler {args.sampler}: {preset.scheduler} does not sample the flow-matching model {args.model} "
            f"(it predicts the velocity noise - x0); expected one of {', '.join(_flow_presets(PRESETS))}"
        )
    predicts = info.sched_config.get("prediction_type")
    if _is_flow_preset(preset) and predicts in ("epsilon", "v_prediction", "sample"):
        raise UsageError(
            f"--sampler {args.sampler}: a flow-matching sampler, but --model {args.model} predicts {predicts!r}; "
            "use --model digits-flow, or another sampler"
        )
    return preset


def _scheduler(args, info: ModelInfo):
    """(scheduler with --steps set, step kwargs) for --sampler, --eta, --guidance and --backend."""
    preset = _preset(args, info)
    name, overrides, step_kwargs = preset.scheduler, dict(preset.config), dict(preset.step_kwargs)
    if args.eta is not None:
        if name != "DDIMScheduler":
            raise UsageError(f"--eta applies to --sampler ddim only, not {args.sampler}")
        step_kwargs["eta"] = args.eta
    if args.guidance is not None and name == "DDIMScheduler":
        # with clip_sample, DDIM's direction term must use the clipped x0 under guidance: the digits model
        # scores 0.50 mean top-class probability at scale 3 without it, 0.997 with it (MODEL_CARD.md)
        step_kwargs["use_clipped_model_output"] = True
    config = info.sched_config
    if config.get("beta_schedule") == "squaredcos_cap_v2":
        overrides = {**COSINE_OVERRIDES.get(name, {}), **overrides}
    if info.kind == "digits-flow" and name != FLOW_SCHEDULER:
        from .models.digits import FLOW_MODE_OVERRIDES

        # the solver's own config in flow mode, not FlowMatchEuler's (whose `shift` it would warn about)
        config = {"num_train_timesteps": config["num_train_timesteps"]}
        overrides = {**FLOW_MODE_OVERRIDES.get(name, {}), **overrides}
    backend = None if args.backend == "auto" else args.backend
    scheduler = preset.cls.from_config(config, **overrides, backend=backend)
    try:
        scheduler.set_timesteps(args.steps)
    except ValueError as exc:
        raise UsageError(f"--steps {args.steps}: {exc}") from None
    return scheduler, step_kwargs


def _label_pattern(args, info: ModelInfo):
    """The labels cycled over the sample indices (sample i gets pattern[i % len]), or None: 'all' is 0..9."""
    if (args.guidance is not None or args.labels is not None) and not info.labelled:
        raise UsageError(f"--guidance/--labels: the model {args.model!r} is unconditional")
    text = "all" if args.labels is None and args.guidance is not None else args.labels
    if text is None:
        return None
    from .models.digits import NUM_CLASSES

    if text == "all":
        return list(range(NUM_CLASSES))
    try:
        given = [int(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--labels {text!r}: expected 'all' or digits like 3,1,4") from None
    if any(v < 0 or v >= NUM_CLASSES for v in given):
        raise UsageError(f"--labels {text!r}: digits must be 0..9")
    return given


def _device(args):
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cpu":
        return torch.device("cpu")
    index = int(os.environ.get("LOCAL_RANK", "0"))  # torchrun: one GPU per process
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def _dtype(args):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]


# ----------------------------------------------------------------------------------------------- outputs


def _image_format(path: str) -> str:
    """The PIL format that --out's extension names (it decides the file's format)."""
    from PIL import Image

    ext = os.path.splitext(path)[1].lower()
    known = Image.registered_extensions()
    fmt = known.get(ext)
    if fmt is None or fmt not in Image.SAVE:
        common = ".png, .jpg, .webp, .bmp, .tiff"
        got = f"the extension {ext!r}" if ext else "no extension"
        raise UsageError(f"--out {path}: {got} names no image format PIL can write; expected one of {common}")
    return fmt


def _check_writable(path: str, flag: str) -> None:
    """The folder exists and is writable and ``path`` is not a folder; creates nothing."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, expected a file name")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {folder} (permission denied)")


def _check_outputs(args) -> None:
    if args.out is None and args.save_array is None and not args.judge:
        args.out = "samples.png"
    if args.out is not None:
        _check_writable(args.out, "--out")
        _image_format(args.out)
    if args.save_array is not None:
        _check_writable(args.save_array, "--save-array")
        if not args.save_array.endswith(".npy"):
            raise UsageError(f"--save-array {args.save_array}: expected a .npy file name (numpy's format)")
    if args.judge:
        if args.model not in ("digits", "digits-flow"):
            raise UsageError("--judge scores digits: it needs --model digits or digits-flow")
        try:
            import sklearn  # noqa: F401
        except ImportError as exc:
            raise UsageError(f"--judge needs scikit-learn: pip install 'fastdiff[quality]' ({exc})") from None


def _available_memory() -> int | None:
    """Bytes of memory available to new allocations (Linux MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gib(n: float) -> str:
    return f"{n / 2**40:.1f} TiB" if n >= 2**40 else f"{n / 2**30:.1f} GiB"


def _grid_bytes(num: int, chw: tuple) -> int:
    cols = math.ceil(math.sqrt(num))
    rows = math.ceil(num / cols)
    _, h, w = chw
    return rows * (h * GRID_SCALE + 2) * cols * (w * GRID_SCALE + 2) * 3


def _check_memory(args, chw: tuple) -> None:
    """``fastdiff sample`` keeps every sample (float32) and draws one grid: refuse an -n whose results alone do not
    fit in memory, before an hour of sampling ends in the allocator."""
    samples = args.num * math.prod(chw) * 4
    grid = _grid_bytes(args.num, chw) if args.out else 0
    available = _available_memory()
    if available is not None and samples + grid > available:
        raise UsageError(
            f"-n {args.num}: keeping the samples needs {_gib(samples)} (float32 {(args.num, *chw)})"
            + (f" and the --out grid {_gib(grid)}" if grid else "")
            + f", more than the {_gib(available)} of memory available. Sample fewer, or use `fastdiff generate "
            "--num N --out-dir DIR`, which writes uint8 samples to disk in chunks of --batch-size"
        )


def auto_batch_size(num: int, chw: tuple) -> int:
    """Samples per batch when --batch-size is not given: at most :data:`AUTO_BATCH_PIXELS` pixels per batch."""
    return max(1, min(num, AUTO_BATCH_PIXELS // (chw[1] * chw[2])))


def _grid(images, scale: int = GRID_SCALE):
    """(N, C, H, W) images in [0, 1] as one RGB PIL image, each image upscaled ``scale`` x (nearest)."""
    import numpy as np
    from PIL import Image

    n, c, h, w = images.shape
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    pad = 2
    grid = np.ones((rows * (h * scale + pad) + pad, cols * (w * scale + pad) + pad, 3), dtype=np.uint8) * 255
    arr = (images.numpy() * 255).round().astype(np.uint8)
    for i in range(n):
        tile = arr[i].transpose(1, 2, 0)
        tile = np.repeat(np.repeat(tile, scale, 0), scale, 1)
        if c == 1:
            tile = np.repeat(tile, 3, 2)
        r, col = divmod(i, cols)
        y, x = pad + r * (h * scale + pad), pad + col * (w * scale + pad)
        grid[y : y + h * scale, x : x + w * scale] = tile[..., :3]
    return Image.fromarray(grid)


def _write_temporary(path: str, write) -> str:
    """``write(file)`` into a new temporary file beside ``path``; returns its name."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def _save_outputs(images, args) -> None:
    """--out (grid) and --save-array (float32 (N, C, H, W) in [0, 1]): both written to temporary files first and
    renamed only when both are complete, so a failure leaves neither, nor a partial file."""
    import numpy as np

    writers = []
    if args.out:
        grid, fmt = _grid(images), _image_format(args.out)
        writers.append((args.out, lambda fh: grid.save(fh, format=fmt)))
    if args.save_array:
        array = images.numpy().astype(np.float32)
        writers.append((args.save_array, lambda fh: np.save(fh, array, allow_pickle=False)))
    staged = []
    try:
        for path, write in writers:
            staged.append((_write_temporary(path, write), path))
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


# ----------------------------------------------------------------------------------------------- sample


@dataclass
class _Run:
    """Everything ``fastdiff sample`` decided before loading the model."""

    info: ModelInfo
    device: object
    dtype: object
    scheduler: object
    step_kwargs: dict
    labels: list | None
    graph: object
    batch_size: int


def _plan_sample(args) -> _Run:
    """Check every argument of ``fastdiff sample`` (no model is loaded)."""
    _check_outputs(args)
    device = _device(args)
    _set_threads(args.threads or default_threads(), device)
    info = _model_info(args.model)
    labels = _label_pattern(args, info)
    scheduler, step_kwargs = _scheduler(args, info)
    graph = {"auto": "auto", "on": True, "off": False}[args.graph]
    if graph is True and device.type != "cuda":
        raise UsageError("--graph on needs a CUDA GPU (CUDA graphs); use --graph auto or off on the CPU")
    _check_memory(args, info.chw)
    batch = args.batch_size or auto_batch_size(args.num, info.chw)
    return _Run(info, device, _dtype(args), scheduler, step_kwargs, labels, graph, batch)


def _sample_kwargs(run: _Run, args, start: int, n: int) -> dict:
    """The conditioning of samples start..start+n-1 (labels cycled over the indices; guidance)."""
    import torch

    if run.labels is None:
        return {}
    from .models.digits import NULL_CLASS

    labels = torch.tensor([run.labels[i % len(run.labels)] for i in range(start, start + n)], device=run.device)
    kwargs = {"model_kwargs": {"class_labels": labels}}
    if args.guidance is not None:
        kwargs["uncond_kwargs"] = {"class_labels": torch.full_like(labels, NULL_CLASS)}
        kwargs["guidance_scale"] = args.guidance
    return kwargs


def _sample_all(model, run: _Run, args):
    """float32 (num, C, H, W) in [0, 1], sampled in batches of ``run.batch_size`` under one progress display
    counting steps (per step when eager, per batch when a CUDA graph runs the loop)."""
    import torch

    from . import sample as fd_sample
    from .progress import progress

    batches = []
    n_batches = math.ceil(args.num / run.batch_size)
    eager = run.device.type != "cuda" or run.graph is False
    with progress(n_batches * args.steps, desc="sample", unit="steps", enabled=not args.quiet) as bar:
        for start in range(0, args.num, run.batch_size):
            n = min(run.batch_size, args.num - start)
            out = fd_sample(
                model,
                run.scheduler,
                shape=(n, *run.info.chw),
                seed=args.seed + start,
                num_inference_steps=args.steps,
                graph=run.graph,
                progress=False,
                callback=(lambda i, t, x: bar.update(1)) if eager else None,
                step_kwargs=run.step_kwargs,
                **_sample_kwargs(run, args, start, n),
            )
            batches.append(out.float())
            if not eager:
                bar.update(args.steps)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return ((torch.cat(batches) + 1) / 2).clamp(0, 1).cpu()


def sample_cmd(args) -> int:
    """Sample images with the embedded digits model (or a local diffusers UNet2DModel) and save a grid."""
    import time

    import torch

    run = _plan_sample(args)
    model = _load_model(run.info, run.device, run.dtype)
    t0 = time.perf_counter()
    images = _sample_all(model, run, args)
    seconds = time.perf_counter() - t0
    _save_outputs(images, args)
    backend = run.scheduler.last_backend or "graph"
    threads = torch.get_num_threads()
    where = f"{run.device}" + (f", {threads} thread{'s' if threads > 1 else ''}" if run.device.type == "cpu" else "")
    n_batches = math.ceil(args.num / run.batch_size)
    print(
        f"{args.num} images, {args.sampler} {args.steps} steps on {where} [{backend} backend"
        f"{', CUDA graph' if run.device.type == 'cuda' and run.graph is not False else ''}], "
        f"{n_batches} batch{'es' if n_batches > 1 else ''} of {run.batch_size}: {seconds:.2f} s, "
        f"{seconds / args.num * 1e3:.1f} ms per image, {args.num / seconds:.1f} images/s"
    )
    for flag, path in (("grid", args.out), ("array", args.save_array)):
        if path:
            print(f"wrote {flag} {path}")
    if args.judge:
        from .quality import judge

        q = judge(images.numpy())
        print(
            f"digit classifier: mean top-class probability {q['mean_top_prob']:.3f}; class counts "
            f"{q['class_counts']} (min {q['min_class_fraction']:.1%}, max {q['max_class_fraction']:.1%})"
        )
    return 0


# ----------------------------------------------------------------------------------------------- generate


def _plan_generate(args):
    """Check every argument of ``fastdiff generate`` (no model is loaded): (info, device, scheduler, step kwargs,
    label pattern)."""
    if os.path.exists(args.out_dir) and not os.path.isdir(args.out_dir):
        raise UsageError(f"--out-dir {args.out_dir}: is a file, expected a folder")
    parent = os.path.dirname(os.path.abspath(args.out_dir))
    if not os.path.isdir(parent):
        raise UsageError(f"--out-dir {args.out_dir}: the folder {parent} does not exist")
    device = _device(args)
    # a fixed default, not the load-based one of `sample`: the thread count can change a CPU forward's float
    # results, so it is part of the job (the manifest records it) and must be the same on every run and rank
    _set_threads(args.threads or 1, device)
    info = _model_info(args.model)
    labels = _label_pattern(args, info)
    scheduler, step_kwargs = _scheduler(args, info)
    return info, device, scheduler, step_kwargs, labels


def generate_cmd(args) -> int:
    """Generate --num samples into --out-dir, resumably, over the processes torchrun started (or this one)."""
    from .generate import JobMismatchError, generate

    info, device, scheduler, step_kwargs, labels = _plan_generate(args)
    model = _load_model(info, device, _dtype(args))
    from .models.digits import NULL_CLASS

    try:
        result = generate(
            model,
            scheduler,
            args.num,
            args.out_dir,
            shape=info.chw,
            seed=args.seed,
            batch_size=args.batch_size,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            labels=labels,
            null_label=NULL_CLASS if args.guidance is not None else None,
            step_kwargs=step_kwargs,
            model_id=_model_id(info),
            job_info={"model": args.model, "sampler": args.sampler},
            png=args.png,
            progress=not args.quiet,
        )
    except JobMismatchError as exc:  # the user's choice of folder or settings, not a failure
        raise UsageError(str(exc)) from None
    if int(os.environ.get("RANK", "0")) == 0:
        rate = f", {result.generated / result.seconds:.1f} images/s" if result.generated else ""
        print(
            f"{result.num} samples in {result.path}: {result.generated} made by this run on {result.world_size} "
            f"process{'es' if result.world_size > 1 else ''} in {result.seconds:.1f} s{rate}"
        )
    return 0


def _model_id(info: ModelInfo) -> str | None:
    """The embedded model by the hash of its weights file (hashing the loaded tensors gives the same answer
    slower); a folder's model: None, so generate() hashes its loaded weights."""
    if info.kind not in ("digits", "digits-flow"):
        return None
    import hashlib

    from .models import digits

    path = digits.FLOW_WEIGHTS_PATH if info.kind == "digits-flow" else digits.WEIGHTS_PATH
    with open(path, "rb") as fh:
        return f"{info.kind}:sha256:" + hashlib.sha256(fh.read()).hexdigest()


# ----------------------------------------------------------------------------------------------- parser


class _HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, except where there is none to show (None, False)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "%(default)" in text or not action.option_strings or default is None or default is False:
            return text
        if default == argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _add_model_args(p, sample_defaults: bool) -> None:
    from . import ops
    from .schedulers import PRESETS

    p.add_argument(
        "--model",
        default="digits",
        help="'digits' or 'digits-flow' (embedded; flow matching) or a local diffusers pipeline/UNet2DModel folder",
    )
    p.add_argument(
        "--sampler",
        choices=sorted(PRESETS),
        default=None,
        help="sampler preset (default: ddim; digits-flow: flow-euler)",
    )
    p.add_argument("--steps", type=_positive_int("--steps"), default=50, help="denoising steps")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--backend", choices=list(ops.BACKENDS), default="auto", help="step kernel")
    p.add_argument(
        "--guidance",
        type=_finite_float("--guidance"),
        default=None,
        help="classifier-free guidance scale (digits model)",
    )
    p.add_argument("--labels", default=None, help="digits to draw: 'all' (0..9 cycled) or e.g. 3,1,4")
    p.add_argument(
        "--eta", type=_finite_float("--eta", 0.0), default=None, help="DDIM eta >= 0 (0 deterministic, 1 DDPM-like)"
    )
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="model and sample dtype")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    threads = (
        "torch CPU threads; default: the CPUs the machine's load leaves idle"
        if sample_defaults
        else ("torch CPU threads per process (part of the job on the CPU)")
    )
    p.add_argument("--threads", type=_positive_int("--threads"), default=None if sample_defaults else 1, help=threads)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastdiff", description=__doc__.splitlines()[0], formatter_class=_HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser(
        "doctor", help="versions, devices, and which backends are available and why not", formatter_class=_HelpFormatter
    )
    d.set_defaults(func=doctor)

    sp = sub.add_parser(
        "sample",
        help="sample images (default: the embedded digits model) and save a grid",
        formatter_class=_HelpFormatter,
    )
    _add_model_args(sp, sample_defaults=True)
    sp.add_argument("-n", "--num", type=_positive_int("--num"), default=64, help="number of images")
    sp.add_argument(
        "--batch-size",
        type=_positive_int("--batch-size"),
        default=None,
        help=f"images per batch; default: up to {AUTO_BATCH_PIXELS} pixels per batch (256 digits)",
    )
    sp.add_argument("--graph", choices=["auto", "on", "off"], default="auto", help="CUDA graph of the whole loop")
    sp.add_argument(
        "--out", default=None, help="image grid, format from the extension (.png, .jpg, ...); default samples.png"
    )
    sp.add_argument("--save-array", default=None, help=".npy of the samples, float32 (N, C, H, W) in [0, 1]")
    sp.add_argument("--judge", action="store_true", help="score the samples with a digits classifier (scikit-learn)")
    sp.set_defaults(func=sample_cmd)

    g = sub.add_parser(
        "generate",
        help="many samples into a folder, resumable, the same set on any number of processes (torchrun)",
        description="Generate --num samples into --out-dir/samples.npz (uint8 (N, H, W, C), index order). Under "
        "torchrun put `--` before the options: torchrun --nproc_per_node=2 -m fastdiff generate -- --num 64 "
        "--out-dir DIR",
        formatter_class=_HelpFormatter,
    )
    g.add_argument("-n", "--num", type=_positive_int("--num"), required=True, help="number of samples")
    g.add_argument("--out-dir", required=True, help="folder of the job (created; re-run the same command to resume)")
    g.add_argument(
        "--batch-size",
        type=_positive_int("--batch-size"),
        default=64,
        help="samples per chunk: part of the job, like --seed",
    )
    _add_model_args(g, sample_defaults=False)
    g.add_argument("--png", action="store_true", help="also write one PNG per sample into --out-dir/png")
    g.set_defaults(func=generate_cmd)

    b = sub.add_parser(
        "bench",
        help="time a representative subset against diffusers and print the table",
        formatter_class=_HelpFormatter,
    )
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    b.set_defaults(func=bench_cmd)
    return parser


def _drop_separator(argv: list) -> list:
    """``generate -- --num 8`` -> ``generate --num 8``: torchrun needs ``--`` before the program's options (it
    reads ``--num`` as its own ``--numa-binding``) and, depending on Python's argparse, passes it on."""
    if len(argv) >= 2 and argv[1] == "--" and not argv[0].startswith("-"):
        return [argv[0], *argv[2:]]
    return argv


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(_drop_separator(list(sys.argv[1:] if argv is None else argv)))
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"fastdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure past argument checking: one line, the traceback on request
        if os.environ.get("FASTDIFF_DEBUG") == "1":
            raise
        print(
            f"fastdiff {args.command}: failed: {type(exc).__name__}: {exc} (FASTDIFF_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
