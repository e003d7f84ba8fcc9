"""Test configuration: Triton runs interpreted on the CPU when no CUDA GPU is present (set before
any kernel module is imported, since triton.jit reads TRITON_INTERPRET at decoration time)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastdiff import _backend  # noqa: E402


def available_backends(device: str) -> list[str]:
    """Fast backends that can run on `device` in this environment."""
    return [b for b in ("triton", "cuda") if _backend.unavailable_reason(b, torch.device(device)) is None]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
