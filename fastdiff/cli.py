"""Command line: ``fastdiff doctor``, ``fastdiff sample``, ``fastdiff bench``.

Every user error ends with a one-line message and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import platform
import sys


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
    from ._version import __version__

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
    import os

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
COSINE_OVERRIDES = {
    "EulerDiscreteScheduler": {"timestep_spacing": "leading"},
    "EulerAncestralDiscreteScheduler": {"timestep_spacing": "leading"},
    "DPMSolverMultistepScheduler": {"lambda_min_clipped": -5.1},
}


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


def _check_writable(path: str, flag: str) -> None:
    import os

    folder = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder, expected a file name")
    try:
        with open(path, "ab"):
            pass
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot write there ({exc.strerror})") from None


def _load_model(spec: str, device, dtype):
    """(model, scheduler config, image shape (C, H, W), supports labels) for --model."""
    import os

    if spec == "digits":
        from .models import digits

        model = digits.load_default_model(device=device, dtype=dtype)
        return model, dict(digits.SCHEDULER_CONFIG), (digits.CHANNELS, digits.IMAGE_SIZE, digits.IMAGE_SIZE), True
    if not os.path.isdir(spec):
        raise UsageError(f"--model {spec}: not 'digits' and not a local folder")
    try:
        import diffusers
    except ImportError:
        raise UsageError("--model with a folder needs diffusers: pip install 'fastdiff[diffusers]'") from None
    import json

    config_path = os.path.join(spec, "model_index.json")
    try:
        if os.path.isfile(config_path):
            pipe = diffusers.DiffusionPipeline.from_pretrained(spec, local_files_only=True)
            unet, sched_config = getattr(pipe, "unet", None), dict(pipe.scheduler.config)
            if not isinstance(unet, diffusers.UNet2DModel):
                raise UsageError(
                    f"--model {spec}: the pipeline's denoiser is {type(unet).__name__}; "
                    "fastdiff sample runs unconditional UNet2DModel pipelines"
                )
        elif os.path.isfile(os.path.join(spec, "config.json")):
            with open(os.path.join(spec, "config.json")) as fh:
                cls = json.load(fh).get("_class_name")
            if cls != "UNet2DModel":
                raise UsageError(f"--model {spec}: config.json describes {cls!r}, not a UNet2DModel")
            unet = diffusers.UNet2DModel.from_pretrained(spec, local_files_only=True)
            sched_path = os.path.join(spec, "scheduler_config.json")
            sched_config = json.load(open(sched_path)) if os.path.isfile(sched_path) else {}
        else:
            raise UsageError(f"--model {spec}: no model_index.json or config.json: not a diffusers model folder")
    except UsageError:
        raise
    except Exception as exc:  # a corrupt or incomplete folder
        raise UsageError(f"--model {spec}: cannot load it as a diffusion model ({type(exc).__name__}: {exc})") from None
    unet = unet.to(device=device, dtype=dtype).eval()
    size = unet.config.sample_size
    hw = (size, size) if isinstance(size, int) else tuple(size)
    return unet, sched_config, (unet.config.in_channels, *hw), False


def sample_cmd(args) -> int:
    """Sample images with the embedded digits model (or a local diffusers UNet2DModel) and save a grid."""
    import time

    import numpy as np
    import torch

    from . import sample as fd_sample
    from . import schedulers

    if args.out is None and args.save_array is None and not args.judge:
        args.out = "samples.png"
    for flag, path in (("--out", args.out), ("--save-array", args.save_array)):
        if path is not None:
            _check_writable(path, flag)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    model, sched_config, chw, labelled = _load_model(args.model, device, dtype)
    if (args.guidance is not None or args.labels is not None) and not labelled:
        raise UsageError(f"--guidance/--labels: the model {args.model!r} is unconditional")
    if args.guidance is not None and args.labels is None:
        args.labels = "all"
    preset = schedulers.PRESETS[args.sampler]
    name, overrides, step_kwargs = preset.scheduler, dict(preset.config), dict(preset.step_kwargs)
    if args.eta is not None:
        if name != "DDIMScheduler":
            raise UsageError(f"--eta applies to --sampler ddim only, not {args.sampler}")
        step_kwargs["eta"] = args.eta
    if args.guidance is not None and name == "DDIMScheduler":
        # with clip_sample, DDIM's direction term must use the clipped x0 under guidance: the digits model
        # scores 0.50 mean top-class probability at scale 3 without it, 0.997 with it (MODEL_CARD.md)
        step_kwargs["use_clipped_model_output"] = True
    if sched_config.get("beta_schedule") == "squaredcos_cap_v2":
        overrides = {**COSINE_OVERRIDES.get(name, {}), **overrides}
    scheduler = preset.cls.from_config(
        sched_config, **overrides, backend=None if args.backend == "auto" else args.backend
    )
    try:
        scheduler.set_timesteps(args.steps)
    except ValueError as exc:
        raise UsageError(f"--steps {args.steps}: {exc}") from None

    kwargs = {}
    if args.labels is not None:
        from .models.digits import NULL_CLASS, NUM_CLASSES

        if args.labels == "all":
            labels = [i % NUM_CLASSES for i in range(args.num)]
        else:
            try:
                given = [int(v) for v in args.labels.split(",")]
            except ValueError:
                raise UsageError(f"--labels {args.labels!r}: expected 'all' or digits like 3,1,4") from None
            if any(v < 0 or v >= NUM_CLASSES for v in given):
                raise UsageError(f"--labels {args.labels!r}: digits must be 0..9")
            labels = [given[i % len(given)] for i in range(args.num)]
        label_t = torch.tensor(labels, device=device)
        kwargs["model_kwargs"] = {"class_labels": label_t}
        if args.guidance is not None:
            kwargs["uncond_kwargs"] = {"class_labels": torch.full_like(label_t, NULL_CLASS)}
            kwargs["guidance_scale"] = args.guidance
    graph = {"auto": "auto", "on": True, "off": False}[args.graph]
    if graph is True and device.type != "cuda":
        raise UsageError("--graph on needs a CUDA GPU (CUDA graphs); use --graph auto or off on the CPU")

    batches = []
    t0 = time.perf_counter()
    done = 0
    while done < args.num:
        n = min(args.batch_size or args.num, args.num - done)
        part_kwargs = {
            k: ({kk: vv[done : done + n] for kk, vv in v.items()} if isinstance(v, dict) else v)
            for k, v in kwargs.items()
        }
        out = fd_sample(
            model,
            scheduler,
            shape=(n, *chw),
            seed=args.seed + done,
            num_inference_steps=args.steps,
            graph=graph,
            progress=not args.quiet,
            step_kwargs=step_kwargs,
            **part_kwargs,
        )
        batches.append(out.float())
        done += n
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    images = ((torch.cat(batches) + 1) / 2).clamp(0, 1).cpu()
    if args.out:
        _save_grid(images, args.out)
    if args.save_array:
        np.save(args.save_array, images.numpy().astype(np.float32))
    backend = scheduler.last_backend or "graph"
    print(
        f"{args.num} images, {args.sampler} {args.steps} steps on {device} [{backend} backend"
        f"{', CUDA graph' if device.type == 'cuda' and graph is not False else ''}]: {seconds:.2f} s, "
        f"{seconds / args.num * 1e3:.1f} ms per image, {args.num / seconds:.1f} images/s"
    )
    for flag, path in (("grid", args.out), ("array", args.save_array)):
        if path:
            print(f"wrote {flag} {path}")
    if args.judge:
        from .quality import judge

        if not labelled:
            raise UsageError("--judge scores digits: it needs the digits model")
        q = judge(images.numpy())
        print(
            f"digit classifier: mean top-class probability {q['mean_top_prob']:.3f}; class counts "
            f"{q['class_counts']} (min {q['min_class_fraction']:.1%}, max {q['max_class_fraction']:.1%})"
        )
    return 0


def _save_grid(images, path: str, scale: int = 4) -> None:
    """Save (N, C, H, W) images in [0, 1] as one PNG grid, each image upscaled ``scale`` x (nearest)."""
    import math

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
    Image.fromarray(grid).save(path)


def build_parser() -> argparse.ArgumentParser:
    from . import ops
    from .schedulers import PRESETS

    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="versions, devices, and which backends are available and why not")
    d.set_defaults(func=doctor)
    sp = sub.add_parser("sample", help="sample images (default: the embedded digits model) and save a grid")
    sp.add_argument(
        "--model", default="digits", help="'digits' (embedded) or a local diffusers pipeline/UNet2DModel folder"
    )
    sp.add_argument("--sampler", choices=sorted(PRESETS), default="ddim")
    sp.add_argument("--steps", type=_positive_int("--steps"), default=50)
    sp.add_argument("-n", "--num", type=_positive_int("--num"), default=64, help="number of images")
    sp.add_argument("--batch-size", type=_positive_int("--batch-size"), default=None)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--backend", choices=list(ops.BACKENDS), default="auto")
    sp.add_argument("--graph", choices=["auto", "on", "off"], default="auto", help="CUDA graph of the whole loop")
    sp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (digits model)")
    sp.add_argument("--labels", default=None, help="digits to draw: 'all' (0..9 cycled) or e.g. 3,1,4")
    sp.add_argument("--eta", type=float, default=None, help="DDIM eta (0 deterministic, 1 DDPM-like)")
    sp.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    sp.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    sp.add_argument("--out", default=None, help="PNG grid of the samples (default samples.png)")
    sp.add_argument("--save-array", default=None, help=".npy of the samples, float32 (N, C, H, W) in [0, 1]")
    sp.add_argument("--judge", action="store_true", help="score the samples with a digits classifier (scikit-learn)")
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    sp.set_defaults(func=sample_cmd)
    b = sub.add_parser("bench", help="time a representative subset against diffusers and print the table")
    b.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    b.set_defaults(func=bench_cmd)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        print(f"fastdiff {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # a failure past argument checking: one line, the traceback on request
        import os

        if os.environ.get("FASTDIFF_DEBUG") == "1":
            raise
        print(
            f"fastdiff {args.command}: failed: {type(exc).__name__}: {exc} (FASTDIFF_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
