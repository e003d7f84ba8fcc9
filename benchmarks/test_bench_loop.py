"""Whole DDIM-50 loops: diffusers' eager loop, fastdiff eager, GraphSampler, and the UNet under
torch.compile(mode="reduce-overhead") with diffusers' scheduler. Compile and capture are timed apart."""

import os

import pytest
import torch
from conftest import CUDA

from fastdiff import bench

pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif(not CUDA, reason="full-loop benchmarks need a CUDA GPU")

PROVIDERS = ["diffusers", "fastdiff-eager", "fastdiff-graph", "compile-reduce-overhead"]
# compiling the CIFAR-10 UNet takes about a minute per batch size: FASTDIFF_BENCH_QUICK=1 keeps it to batch 1
QUICK = os.environ.get("FASTDIFF_BENCH_QUICK") == "1"
CASES = [("cifar10", b, p) for b in (1, 16) for p in PROVIDERS if not (QUICK and b == 16 and p.startswith("compile"))]
CASES += [("cond", b, p) for b in (1, 16) for p in PROVIDERS[:3]]


@pytest.mark.parametrize("model,batch,provider", CASES)
def test_loop(measure, device, model, batch, provider):
    case = bench.loop_case(model, batch, 50, torch.float16, device, provider)
    measure(case, rounds=5, warmup=2, kind="loop", model=model, batch=batch, steps=50, dtype="fp16", provider=provider)
