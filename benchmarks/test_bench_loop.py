"""Whole sampling loops, fp16: the CIFAR-10 UNet (google/ddpm-cifar10-32's config, random weights) with DDIM
50 steps at batch 1 and 16, a small guided UNet2DConditionModel, and (once FlowMatchEuler lands, issue 12) a
4-step FlowMatchEuler loop on a small Flux-shaped transformer: diffusers' eager loop, fastdiff eager,
GraphSampler, and the denoiser under torch.compile(mode="reduce-overhead"). Compile and capture are timed
apart; host syncs per loop are counted."""

import pytest
import torch
from conftest import GPU_PLAN, QUICK, build

from fastdiff import bench

pytest.importorskip("diffusers")

PROVIDERS = ("diffusers", "fastdiff-eager", "fastdiff-graph", "unet-compile")
CASES = []
if GPU_PLAN:
    # compiling the UNet takes about a minute per batch size: FASTDIFF_BENCH_QUICK=1 compiles batch 1 only
    CASES += [("cifar10", b, p) for b in (1, 16) for p in PROVIDERS if not (QUICK and b == 16 and p == "unet-compile")]
    CASES += [("flux", 1, p) for p in PROVIDERS[:3]]
    CASES += [("cond", b, p) for b in (1, 16) for p in PROVIDERS[:3]]


@pytest.mark.parametrize("model,batch,provider", CASES)
def test_loop(measure, device, model, batch, provider):
    if device != "cuda":
        pytest.skip("full-loop benchmarks need a CUDA GPU")
    steps = bench.FLOW_STEPS if model == "flux" else bench.STEPS
    case = build(bench.loop_case, model, batch, steps, torch.float16, device, provider)
    measure(
        case, rounds=5, warmup=2, kind="loop", model=model, batch=batch, steps=steps, dtype="fp16", provider=provider
    )
