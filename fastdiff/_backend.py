"""Which implementation runs: the CUDA extension, Triton, or the pure-PyTorch reference.

One predicate per optional piece; ``resolve`` turns a request ("auto" or a name, from an argument
or ``FASTDIFF_BACKEND``) into the backend that will run on a given device, or raises an error that
says why the requested one cannot. The choice is logged at DEBUG level once per (request, device).
"""

from __future__ import annotations

import functools
import logging
import os

import torch

logger = logging.getLogger("fastdiff")

BACKENDS = ("auto", "cuda", "triton", "reference")


@functools.cache
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    return _triton_import_error() is None


def interpret_mode() -> bool:
    """Triton kernels run on CPU tensors through the interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _cuda_ext_error() -> str | None:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.fastdiff.*_cuda)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def cuda_ext_available() -> bool:
    return _cuda_ext_error() is None


def unavailable_reason(backend: str, device: torch.device) -> str | None:
    """None if ``backend`` can run on ``device``, else a sentence saying why not."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "triton":
        if not triton_available():
            return f"triton cannot be imported ({_triton_import_error()})"
        if device.type == "cuda":
            return None
        if device.type == "cpu":
            return None if interpret_mode() else "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
        return f"triton kernels do not run on {device.type} tensors"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA extension needs CUDA tensors, got {device.type} tensors"
        if not cuda_ext_available():
            return f"the CUDA extension fastdiff._C is not built or does not load ({_cuda_ext_error()})"
        return None
    raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}")


_logged: set = set()


def resolve(requested: str | None, device) -> str:
    """The backend that runs for ``requested`` on ``device``. None means FASTDIFF_BACKEND or "auto"."""
    device = torch.device(device)
    source = "argument"
    if requested is None:
        requested = os.environ.get("FASTDIFF_BACKEND", "auto") or "auto"
        source = "FASTDIFF_BACKEND"
    if requested not in BACKENDS:
        raise ValueError(f"`backend` ({source}) must be one of {list(BACKENDS)}, got {requested!r}")
    if requested == "auto":
        order = ("cuda", "triton", "reference") if device.type == "cuda" else ("triton", "reference")
        chosen = next(b for b in order if unavailable_reason(b, device) is None)
    else:
        why = unavailable_reason(requested, device)
        if why is not None:
            raise RuntimeError(f"backend {requested!r} ({source}) cannot run: {why}")
        chosen = requested
    key = (requested, device.type, chosen)
    if key not in _logged:
        _logged.add(key)
        logger.debug("fastdiff backend: requested %r on %s -> %s", requested, device.type, chosen)
    return chosen
