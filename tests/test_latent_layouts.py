"""The fused step and the add-noise op on video latents (B, C, F, H, W) and packed transformer latents
(B, sequence, channels), contiguous or not: sliced out of a wider buffer, permuted (channels last), and
batch-strided (every other sample of a larger batch). The buffers around the views hold NaN, so a kernel that
reads outside a sample's elements fails loudly.

On every available backend: the ops against the formula and against the same call on contiguous copies (bit
for bit: the layout must not change a result, Philox noise included), and every registered scheduler's walk
and forward noising against diffusers' class of the same name.
"""

import inspect

import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_rel, describe_diff
from tiny_pipelines import WAN_UNIPC_SCHEDULER

from fastdiff import coefs, ops
from fastdiff.noise import as_seed_tensor
from fastdiff.schedulers import SCHEDULERS

diffusers = pytest.importorskip("diffusers")

SHAPES = {"video": (2, 3, 3, 5, 7), "packed": (2, 37, 12)}  # odd sizes: no power of two hides a stride bug
KINDS = ("contiguous", "sliced", "permuted", "batch-strided")
FAST_CASES = [(d, b) for d in DEVICES for b in available_backends(d)]
BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]


def laid_out(values: torch.Tensor, kind: str) -> torch.Tensor:
    """``values`` copied into a view of memory layout ``kind`` (NaN in the buffer around it)."""
    if kind == "contiguous":
        return values.clone()
    if kind == "sliced":  # the last dimension a slice of a wider one
        buf = torch.full((*values.shape[:-1], values.shape[-1] + 3), float("nan"), dtype=values.dtype)
        view = buf.to(values.device)[..., 1 : 1 + values.shape[-1]]
    elif kind == "permuted":  # channels last: dimension 1 and the last swapped in memory
        view = torch.empty_like(values.transpose(1, -1).contiguous()).transpose(1, -1)
    elif kind == "batch-strided":  # every other sample of a twice larger batch
        buf = torch.full((2 * values.shape[0], *values.shape[1:]), float("nan"), dtype=values.dtype)
        view = buf.to(values.device)[::2]
    else:
        raise ValueError(kind)
    view.copy_(values)
    assert not view.is_contiguous() and torch.equal(view, values)
    return view


def _row(device, **values):
    row = torch.zeros(coefs.NCOEF, device=device)
    for k, v in values.items():
        row[getattr(coefs, k)] = v
    return row


ROW = dict(X_S=0.5, A_X=1.0, A_M=-0.3, E_S=1.0, E_M=1.0, C_0=0.7, C_E=0.2, C_X=0.1, H_1=-0.15, SIGMA=0.05)


def _fused(backend, x, m, h, row, **kw):
    prev = torch.full(x.shape, float("nan"), device=x.device, dtype=x.dtype)
    x0 = torch.full(x.shape, float("nan"), device=x.device, dtype=x.dtype)
    g = torch.tensor([2.5], device=x.device)
    ops.fused_step(ops.StepParams(x, m, row, prev=prev, x0=x0, guidance=g, hist=(h,), **kw), backend)
    return prev, x0


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_fused_step_on_layouts(layout, kind, dtype, device, backend):
    """Guidance on a doubled model output, a history term, tensor and Philox noise: each input in ``kind``
    gives, bit for bit, what contiguous copies give; and the formula (fp32)."""
    shape = SHAPES[layout]
    g = torch.Generator().manual_seed(0)
    x, h, z = (torch.randn(shape, generator=g).to(device, dtype) for _ in range(3))
    m = torch.randn((2 * shape[0], *shape[1:]), generator=g).to(device, dtype)
    row = _row(device, **ROW)
    seed, offset = as_seed_tensor(11, shape[0], device), torch.tensor([3], device=device)
    for noise in (dict(noise=z), dict(seed=seed, offset=offset)):
        want = _fused(backend, x, m, h, row, **noise)
        lay = {k: laid_out(v, kind) for k, v in noise.items() if k == "noise"}
        got = _fused(backend, laid_out(x, kind), laid_out(m, kind), laid_out(h, kind), row, **{**noise, **lay})
        for name, a, b in zip(("prev", "x0"), got, want):
            assert torch.equal(a, b), f"{name} on a {kind} {layout} layout: {describe_diff(a, b)}"
    if dtype == torch.float32:
        views = (laid_out(t, kind) for t in (x, m, h, z))
        xv, mv, hv, zv = views
        prev, x0 = _fused(backend, xv, mv, hv, row, noise=zv)
        u, c = m.chunk(2)
        mg = u + 2.5 * (c - u)
        x0_ref = 0.5 * (x - 0.3 * mg)
        prev_ref = 0.7 * x0_ref + 0.2 * mg + 0.1 * x - 0.15 * h + 0.05 * z
        assert_rel(prev, prev_ref, 1e-5, f"prev [{backend}] {kind} {layout}")
        assert_rel(x0, x0_ref, 1e-5, f"x0 [{backend}] {kind} {layout}")


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("kind", KINDS[1:])
@pytest.mark.parametrize("layout", list(SHAPES))
def test_add_noise_on_layouts(layout, kind, device, backend):
    """P * x + Q * z per sample, indices into a table: the formula with a noise tensor, and bit for bit what
    contiguous inputs give, with a noise tensor and with Philox noise."""
    shape = SHAPES[layout]
    g = torch.Generator().manual_seed(1)
    x, z = (torch.randn(shape, generator=g).to(device) for _ in range(2))
    table = torch.rand(5, 2, generator=g).to(device)
    index = torch.tensor([3, 1], device=device)
    seed = as_seed_tensor(5, shape[0], device)
    got = ops.add_noise(laid_out(x, kind), table, index, backend=backend, noise=laid_out(z, kind))
    want = table[index, 0].reshape(-1, *[1] * (x.ndim - 1)) * x + table[index, 1].reshape(-1, *[1] * (x.ndim - 1)) * z
    assert_rel(got, want, 1e-6, f"add_noise [{backend}] {kind} {layout}")
    assert torch.equal(got, ops.add_noise(x, table, index, backend=backend, noise=z))
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    philox = ops.add_noise(laid_out(x, kind), table, index, backend=backend, seed=seed, offset=zero)
    assert torch.equal(philox, ops.add_noise(x, table, index, backend=backend, seed=seed, offset=zero))
    assert torch.isfinite(philox).all()


# ---------------------------------------------------------------------------------------------- schedulers


def _step_kwargs(scheduler, i, device) -> dict:
    if "generator" in inspect.signature(scheduler.step).parameters:
        return {"generator": torch.Generator(device).manual_seed(100 + i)}
    return {}


def _walk_laid_out(scheduler, shape, device, steps=5):
    """A loop with fresh random model outputs where, at step i, the sample is laid out as KINDS[i % 4] and the
    model output as KINDS[(i + 1) % 4]. Returns the (prev_sample, pred_original_sample) of every step."""
    gen = torch.Generator().manual_seed(7)
    scheduler.set_timesteps(steps, device=device)
    x = torch.randn(shape, generator=gen).to(device) * getattr(scheduler, "init_noise_sigma", 1.0)
    outs = []
    for i, t in enumerate(scheduler.timesteps):
        m = torch.randn(shape, generator=gen).to(device)
        xs = laid_out(x, KINDS[i % 4])
        res = scheduler.step(laid_out(m, KINDS[(i + 1) % 4]), t, xs, **_step_kwargs(scheduler, i, device))
        outs.append((res.prev_sample, getattr(res, "pred_original_sample", None)))
        x = res.prev_sample
    return outs


# the flow-matching modes the transformer pipelines run (Wan's UniPC, Sana's DPM-Solver), besides each default
FLOW_CONFIGS = {
    "UniPCMultistepScheduler-flow": ("UniPCMultistepScheduler", WAN_UNIPC_SCHEDULER),
    "DPMSolverMultistepScheduler-flow": (
        "DPMSolverMultistepScheduler",
        dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0),
    ),
}
WALKS = {**{name: (name, {}) for name in sorted(SCHEDULERS)}, **FLOW_CONFIGS}


def _pair(walk, backend):
    """(fastdiff's scheduler, diffusers' of the same class and config), or a skip naming what is missing."""
    name, config = WALKS[walk]
    if not hasattr(diffusers, name):
        pytest.skip(f"diffusers has no {name}")
    if name not in SCHEDULERS:
        pytest.skip(f"fastdiff has no {name} yet")
    try:
        ours = SCHEDULERS[name].from_config(config, backend=backend)
    except (NotImplementedError, ValueError) as exc:
        pytest.skip(f"fastdiff's {name} does not take this config yet: {exc}")
    return ours, getattr(diffusers, name).from_config(ours.config)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("walk", list(WALKS))
def test_scheduler_walk_on_layouts_matches_diffusers(walk, layout, device, backend):
    ours, theirs = _pair(walk, backend)
    got = _walk_laid_out(ours, SHAPES[layout], device)
    want = _walk_laid_out(theirs, SHAPES[layout], device)
    assert ours.last_backend == backend
    for i, ((p, x0), (p_d, x0_d)) in enumerate(zip(got, want)):
        assert_rel(p, p_d, 1e-5, f"{walk} [{backend}] {layout} step {i} prev_sample")
        if x0 is not None and x0_d is not None:
            assert_rel(x0, x0_d, 1e-5, f"{walk} [{backend}] {layout} step {i} pred_original_sample")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("layout", list(SHAPES))
@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_forward_noising_on_layouts_matches_diffusers(name, layout, device, backend):
    """``add_noise`` (``scale_noise`` for flow matching) with a sliced sample and permuted noise, one schedule
    timestep per sample, against diffusers."""
    if not hasattr(diffusers, name):
        pytest.skip(f"diffusers has no {name}")
    ours = SCHEDULERS[name](backend=backend)
    theirs = getattr(diffusers, name).from_config(ours.config)
    method = "add_noise" if hasattr(theirs, "add_noise") else "scale_noise"
    g = torch.Generator().manual_seed(2)
    x, z = (torch.randn(SHAPES[layout], generator=g).to(device) for _ in range(2))
    results = []
    for s in (ours, theirs):
        s.set_timesteps(6, device=device)
        t = s.timesteps[[1, 4]]
        xs, zs = laid_out(x, "sliced"), laid_out(z, "permuted")
        results.append(s.add_noise(xs, zs, t) if method == "add_noise" else s.scale_noise(xs, t, zs))
    assert ours.last_backend == backend
    assert_rel(results[0], results[1], 1e-6, f"{name}.{method} [{backend}] {layout}")
