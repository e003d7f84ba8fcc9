"""What can run here: one predicate per optional piece (Triton, the CUDA extension), each with the reason
when it cannot. ``fastdiff.ops.select`` decides from these which implementation runs; ``fastdiff doctor``
reports them."""

from __future__ import annotations

import functools
import os
from typing import Optional

import torch


@functools.cache
def _triton_import_error() -> Optional[str]:
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
def _cuda_ext_error() -> Optional[str]:
    try:
        from . import _C  # noqa: F401  (registers torch.ops.fastdiff.*_cuda)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def cuda_ext_available() -> bool:
    return _cuda_ext_error() is None


def triton_unavailable(device: torch.device) -> Optional[str]:
    """None if the Triton kernels run on ``device`` tensors, else why not."""
    if not triton_available():
        return f"triton cannot be imported ({_triton_import_error()})"
    if device.type == "cuda":
        return None
    if device.type == "cpu":
        return None if interpret_mode() else "tensors are on the CPU and TRITON_INTERPRET=1 is not set"
    return f"triton kernels do not run on {device.type} tensors"


def cuda_ext_unavailable(device: torch.device) -> Optional[str]:
    """None if the CUDA extension runs on ``device`` tensors, else why not."""
    if device.type != "cuda":
        return f"the CUDA extension needs CUDA tensors, got {device.type} tensors"
    if not cuda_ext_available():
        return f"the CUDA extension fastdiff._C is not built or does not load ({_cuda_ext_error()})"
    return None
