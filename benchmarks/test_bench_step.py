"""Scheduler step: diffusers' step, fastdiff's fused step (CUDA extension and Triton) and diffusers' step under
torch.compile, side by side. On a GPU: 50-step walks at latent size (host-bound: launches and syncs) for the
headline schedulers, and the step's device-time bandwidth at pixel size, with and without in-kernel Philox
noise. On the CPU (CI): walks of every registered preset against diffusers, backend "auto", fp32."""

import os

import pytest
from conftest import GPU_PLAN, build

from fastdiff import bench
from fastdiff.schedulers import PRESETS

pytest.importorskip("diffusers")

if GPU_PLAN:
    # fp16 first: the targets are set there; bf16 after
    LATENT_CASES = [
        (sched, dtype, provider)
        for dtype in ("fp16", "bf16")
        for sched in bench.HEADLINE_SCHEDULERS
        for provider in ("diffusers", "fastdiff-triton", "fastdiff-cuda")
    ]
    # a compile costs ~10-30 s: one, where the target "faster than diffusers' step under torch.compile" is set
    LATENT_CASES.append(("DDIMScheduler", "fp16", "diffusers-compile"))
    BANDWIDTH_CASES = [
        (preset, noise, dtype, provider)
        for dtype in ("fp16", "fp32")
        for preset, noise, providers in bench.BANDWIDTH_CASES
        for provider in providers
    ]
    CPU_CASES = []
else:
    LATENT_CASES, BANDWIDTH_CASES = [], []
    sizes = list(bench.CPU_STEP_SIZES)
    if os.environ.get("FASTDIFF_BENCH_CPU_SIZES") != "all":
        sizes = sizes[:1]
    CPU_CASES = [
        (preset, size, provider) for size in sizes for preset in PRESETS for provider in ("diffusers", "fastdiff")
    ]


@pytest.mark.parametrize("scheduler,dtype,provider", LATENT_CASES)
def test_step_latent(measure, device, scheduler, dtype, provider):
    preset = build(bench.headline_preset, scheduler)
    case = build(bench.step_case, preset, bench.STEP_SIZES[bench.LATENT], bench.DTYPES[dtype], device, provider)
    measure(case, rounds=20, warmup=3, kind="step", size=bench.LATENT, dtype=dtype, provider=provider)


@pytest.mark.parametrize("preset,noise,dtype,provider", BANDWIDTH_CASES)
def test_step_bandwidth(measure, device, preset, noise, dtype, provider):
    shape = bench.STEP_SIZES[bench.PIXEL]
    case = build(bench.device_step_case, preset, shape, bench.DTYPES[dtype], device, provider, noise)
    measure(case, rounds=20, warmup=3, kind="bandwidth", size=bench.PIXEL, dtype=dtype, provider=provider)


@pytest.mark.parametrize("preset,size,provider", CPU_CASES)
def test_step_cpu(measure, device, preset, size, provider):
    case = build(bench.step_case, preset, bench.CPU_STEP_SIZES[size], bench.DTYPES["fp32"], device, provider)
    measure(case, rounds=10, warmup=2, kind="step", size=size, dtype="fp32", provider=provider)
