"""Scheduler step: fastdiff's fused step vs diffusers' step vs a torch.compile'd reference step."""

import pytest
from conftest import CUDA

from fastdiff import _backend, bench

pytest.importorskip("diffusers")

if CUDA:
    SIZES = list(bench.STEP_SIZES)
    DTYPES = list(bench.DTYPES)
    PROVIDERS = ["diffusers", "fastdiff", "fastdiff-philox"]
    if _backend.cuda_ext_available():
        PROVIDERS.append("fastdiff-triton")  # auto is the CUDA extension; show Triton beside it
else:  # CPU subset for CI: reference vs diffusers at a tiny size, no speed claims
    SIZES, DTYPES, PROVIDERS = ["cpu-tiny-1x4x16x16"], ["fp32"], ["diffusers", "fastdiff"]
# torch.compile costs ~10-20 s per (scheduler, size, dtype): compare where the targets are set
COMPILED = {
    ("ddim-eta0", "latent-1x4x64x64", "fp16"),
    ("ddpm", "latent-1x4x64x64", "fp16"),
    ("ddim-eta0", "pixel-64x3x256x256", "fp16"),
    ("ddim-eta0", "pixel-64x3x256x256", "fp32"),
}
CASES = [(s, size, dt, p) for s in bench.STEP_SCHEDULERS for size in SIZES for dt in DTYPES for p in PROVIDERS]
CASES += [(s, size, dt, "torch-compile") for (s, size, dt) in sorted(COMPILED) if CUDA]


@pytest.mark.parametrize("scheduler,size,dtype,provider", CASES)
def test_step(measure, device, scheduler, size, dtype, provider):
    shape = bench.STEP_SIZES.get(size, (1, 4, 16, 16))
    case = bench.step_case(scheduler, shape, bench.DTYPES[dtype], device, provider)
    measure(case, kind="step", scheduler=scheduler, size=size, dtype=dtype, provider=provider)
