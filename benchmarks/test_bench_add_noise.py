"""add_noise (q_sample with per-sample timesteps): fastdiff's one launch against diffusers."""

import pytest
from conftest import GPU_PLAN, build

from fastdiff import bench

pytest.importorskip("diffusers")

if GPU_PLAN:
    CASES = [
        (size, dt, p)
        for size in bench.STEP_SIZES
        for dt in ("fp16", "fp32")
        for p in ("diffusers", "fastdiff-triton", "fastdiff-cuda")
    ]
else:
    CASES = [("cpu-2x4x16x16", "fp32", p) for p in ("diffusers", "fastdiff")]


@pytest.mark.parametrize("size,dtype,provider", CASES)
def test_add_noise(measure, device, size, dtype, provider):
    shape = {**bench.STEP_SIZES, **bench.CPU_STEP_SIZES}[size]
    case = build(bench.add_noise_case, shape, bench.DTYPES[dtype], device, provider)
    measure(case, kind="add_noise", size=size, dtype=dtype, provider=provider)
