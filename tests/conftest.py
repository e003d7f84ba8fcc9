"""Test configuration: Triton runs interpreted on the CPU when no CUDA GPU is present (set before
any kernel module is imported, since triton.jit reads TRITON_INTERPRET at decoration time)."""

import os
import signal
import threading

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if os.environ.get("PYTEST_XDIST_WORKER"):
    # the README's `-n 2`: one torch thread per worker process, so two workers use two cores without competing
    # (two threads each would wait for a busy core at every operator on a 2-core machine)
    torch.set_num_threads(1)

import pytest  # noqa: E402

from fastdiff import ops  # noqa: E402


def available_backends(device: str) -> list[str]:
    """Fast backends that can run on `device` in this environment (the torch evaluation runs everywhere)."""
    return [b for b in ("torch", "triton", "cuda") if ops.unavailable(b, torch.device(device)) is None]


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


@pytest.fixture(autouse=True)
def _no_tf32():
    """TF32 convolutions round their inputs to 10 mantissa bits, so a 1e-7 difference in the latents can flip
    a rounding and move the next UNet output by ~1e-3: that measures TF32, not the scheduler. Full fp32 here."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# Tests that run every case again on the Triton interpreter (CPU tensors, TRITON_INTERPRET=1), which costs 10-100x
# the torch evaluation per step: the four grid files spent 1,395 s of the suite's 2,719 s of test time there (51%),
# and the loops in test_sampling, test_pipelines and test_integrations another 75 s of the remaining 494 s (-n 2,
# --durations=0, this 2-core machine, 2026-11-30). Marked `long`, they run in CI right after the README's test
# command (.ci/run: -m long); the interpreted kernels stay in the README's command through test_ops,
# test_philox, test_every_scheduler (a whole walk against diffusers on every backend) and test_fuzz. With a GPU
# (compiled Triton, no interpreter) nothing is marked.
LONG_INTERPRETED = {
    "test_diffusers_regression.py",
    "test_step_equivalence.py",
    "test_sigma_schedulers.py",
    "test_capturable.py",
    "test_sampling.py",
    "test_pipelines.py",
    "test_integrations.py",
}


def pytest_collection_modifyitems(config, items):
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    for item in items:
        callspec = getattr(item, "callspec", None)
        if item.path.name in LONG_INTERPRETED and callspec and callspec.params.get("backend") == "triton":
            item.add_marker(pytest.mark.long)


def pytest_configure(config):
    # a time limit's SIGTERM (`timeout`, a CI runner) ends the run like Ctrl-C: pytest still prints its summary
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)


# hypothesis profiles for tests/test_fuzz.py, chosen by FASTDIFF_FUZZ: "ci" (default) a bounded, derandomized run
# (the same 15 examples per scheduler every run, 20-50 s on this 2-core machine), "long" for local bug hunts
try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # the fuzz tests skip themselves without hypothesis
    pass
else:
    _FUZZ_COMMON = dict(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much], print_blob=True)
    # no shrinking in CI: a failing example is printed whole (shrinking one can take minutes); "long" shrinks
    _NO_SHRINK = (Phase.explicit, Phase.reuse, Phase.generate)
    settings.register_profile("ci", max_examples=15, deadline=None, derandomize=True, phases=_NO_SHRINK, **_FUZZ_COMMON)
    settings.register_profile("long", max_examples=1000, deadline=None, **_FUZZ_COMMON)
    settings.load_profile(os.environ.get("FASTDIFF_FUZZ", "ci"))
