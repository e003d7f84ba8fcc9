"""add_noise (q_sample with per-sample timesteps): fastdiff's one launch vs diffusers vs torch.compile."""

import pytest
from conftest import CUDA

from fastdiff import _backend, bench

pytest.importorskip("diffusers")

if CUDA:
    SIZES, DTYPES = list(bench.STEP_SIZES), list(bench.DTYPES)
    PROVIDERS = ["diffusers", "fastdiff"] + (["fastdiff-triton"] if _backend.cuda_ext_available() else [])
else:
    SIZES, DTYPES, PROVIDERS = ["cpu-tiny-1x4x16x16"], ["fp32"], ["diffusers", "fastdiff"]
CASES = [(size, dt, p) for size in SIZES for dt in DTYPES for p in PROVIDERS]
CASES += [("pixel-64x3x256x256", "fp16", "torch-compile")] if CUDA else []


@pytest.mark.parametrize("size,dtype,provider", CASES)
def test_add_noise(measure, device, size, dtype, provider):
    shape = bench.STEP_SIZES.get(size, (1, 4, 16, 16))
    case = bench.add_noise_case(shape, bench.DTYPES[dtype], device, provider)
    measure(case, kind="add_noise", size=size, dtype=dtype, provider=provider)
