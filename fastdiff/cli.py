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

    from . import __version__, _backend

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
        for b in ("cuda", "triton", "reference"):
            why = _backend.unavailable_reason(b, torch.device(dev))
            print(f"  {b:9s} {'available' if why is None else 'unavailable: ' + why}")
        try:
            print(f"  auto -> {_backend.resolve(None, dev)}")
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastdiff", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("doctor", help="versions, devices, and which backends are available and why not")
    d.set_defaults(func=doctor)
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


if __name__ == "__main__":
    raise SystemExit(main())
