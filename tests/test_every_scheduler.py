"""Checks every registered scheduler gets without any edit here: a new sampler file is tested by this file.

Parametrized over ``fastdiff.schedulers.SCHEDULERS``: a whole walk against diffusers' class of the same name
on every backend (fresh random model outputs, noise drawn from the same generator), the output contract,
copy/pickle, ``draws_noise`` against what a walk really consumes, and step-by-step agreement between the
fused backends and the reference in fp16/bf16 (flash-attention's 2x-PyTorch rule).
"""

import copy
import pickle

import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_lowp, rel_err

from fastdiff.schedulers import SCHEDULERS

diffusers = pytest.importorskip("diffusers")

NAMES = sorted(SCHEDULERS)
BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]


def _walk(scheduler, steps, shape, seed, dtype=torch.float32, device="cpu", model_outputs=None):
    """Run a full loop with fresh random model outputs; returns (per-step (prev, x0) list, model outputs)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    outs, mos = [], []
    for i, t in enumerate(scheduler.timesteps):
        m = model_outputs[i] if model_outputs is not None else torch.randn(shape, generator=gen).to(device, dtype)
        mos.append(m)
        noise_gen = torch.Generator(device=device).manual_seed(1000 + i)
        kwargs = {"generator": noise_gen} if "generator" in _step_params(scheduler) else {}
        res = scheduler.step(m, t, x, **kwargs)
        outs.append((res.prev_sample, getattr(res, "pred_original_sample", None)))
        x = res.prev_sample
    return outs, mos


def _step_params(scheduler) -> set:
    import inspect

    return set(inspect.signature(scheduler.step).parameters)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", NAMES)
def test_walk_matches_diffusers(name, device, backend):
    if not hasattr(diffusers, name):
        pytest.skip(f"diffusers has no {name}")
    ours = SCHEDULERS[name](backend=backend)
    theirs = getattr(diffusers, name).from_config(ours.config)
    shape = (2, 3, 7, 5)
    got, mos = _walk(ours, 9, shape, seed=3, device=device)
    want, _ = _walk(theirs, 9, shape, seed=3, device=device, model_outputs=mos)
    assert ours.last_backend == backend
    for i, ((p, x0), (p_d, x0_d)) in enumerate(zip(got, want)):
        err = rel_err(p, p_d)
        assert err <= 1e-5, f"{name} [{backend}] step {i}: prev_sample off by {err:.2e} relative"
        assert (x0 is None) == (x0_d is None), f"{name}: pred_original_sample presence differs at step {i}"
        if x0 is not None:
            assert rel_err(x0, x0_d) <= 1e-5, f"{name} [{backend}] step {i}: pred_original_sample differs"


@pytest.mark.parametrize("name", NAMES)
def test_output_contract(name):
    s = SCHEDULERS[name]()
    s.set_timesteps(4)
    x = torch.randn(1, 2, 3, 3)
    out = s.step(torch.randn_like(x), s.timesteps[0], x)
    assert out.prev_sample is out["prev_sample"] is out[0]
    assert out.to_tuple()[0] is out.prev_sample
    s.set_timesteps(4)
    tup = s.step(torch.randn_like(x), s.timesteps[0], x, return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == x.shape


@pytest.mark.parametrize("name", NAMES)
def test_copy_and_pickle_keep_the_schedule(name):
    s = SCHEDULERS[name](backend="reference")
    s.set_timesteps(6)
    for clone in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert type(clone) is type(s) and dict(clone.config) == dict(s.config)
        assert torch.equal(clone.timesteps, s.timesteps)


@pytest.mark.parametrize("name", NAMES)
def test_draws_noise_says_what_a_walk_consumes(name):
    """``draws_noise`` (used by the integrations to keep generator draws identical) matches whether a loop
    really consumes the generator."""
    s = SCHEDULERS[name](backend="reference")
    s.set_timesteps(5)
    x = torch.randn(1, 2, 3, 3)
    gen = torch.Generator().manual_seed(0)
    state = gen.get_state()
    for t in s.timesteps:
        x = s.step(torch.randn_like(x), t, x, generator=gen).prev_sample
    consumed = not torch.equal(state, gen.get_state())
    assert s.draws_noise({}) == consumed, f"{name}: draws_noise says {s.draws_noise({})}, the walk drew {consumed}"


@pytest.mark.parametrize("device,backend", [(d, b) for d in DEVICES for b in available_backends(d)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_within_twice_pytorch(name, device, backend, dtype):
    """Each fused step in fp16/bf16 is within twice plain PyTorch's error (the reference run in the same low
    precision) against the float32 reference, from the same inputs."""
    shape = (2, 3, 9, 7)
    fast = SCHEDULERS[name](backend=backend)
    plain = SCHEDULERS[name](backend="reference")
    ref32 = SCHEDULERS[name](backend="reference")
    for s in (fast, plain, ref32):
        s.set_timesteps(6, device=device)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen).to(device)
    for i in range(6):
        m = torch.randn(shape, generator=gen).to(device)
        x_lp, m_lp = x.to(dtype), m.to(dtype)
        seed = torch.tensor([11, 12], device=device)
        a = fast.step(m_lp, fast.timesteps[i], x_lp, noise_seed=seed).prev_sample
        b = plain.step(m_lp, plain.timesteps[i], x_lp, noise_seed=seed).prev_sample
        r = ref32.step(m_lp.float(), ref32.timesteps[i], x_lp.float(), noise_seed=seed).prev_sample
        assert fast.last_backend == backend
        assert_lowp(a, b, r, what=f"{name} [{backend}] step {i}")
        x = r
