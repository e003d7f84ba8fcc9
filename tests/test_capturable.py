"""The program GraphSampler captures, checked on any device: no Python-level host read runs inside it, and
a second run of it (the one a capture records, after the warm-up) gives exactly what the eager ``sample``
gives, also after new inputs are loaded into its static buffers as between replays.

On CUDA a host read inside the loop (``.item()``, ``.tolist()``, a branch on a tensor, ...) is a device sync,
which would break the capture and stall the eager loop; here every Python-level host read of a tensor raises
while the loop body runs. The Triton interpreter reads its arguments on the host by design, so the guard is
lifted inside a kernel launch (on a GPU that launch is one asynchronous ``cuLaunchKernel``). Syncs inside
PyTorch's C++ (``nonzero``, boolean-mask indexing) are invisible to this guard; on CUDA the guard also turns
on ``torch.cuda.set_sync_debug_mode("error")``, as GraphSampler's own warm-up does.
"""

import contextlib

import pytest
import torch
from conftest import DEVICES, available_backends
from test_sampling import TinyCondModel

import fastdiff
from fastdiff.graph import GraphSampler
from fastdiff.kernels import add_noise as add_noise_kernels
from fastdiff.kernels import step as step_kernels
from fastdiff.noise import as_seed_tensor

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")

SCHEDULERS = {
    # every registered scheduler at its defaults, then the knobs that change what a step reads or writes
    **{name: (cls, {}) for name, cls in fastdiff.SCHEDULERS.items()},
    "ddpm-large-var": (lambda: fastdiff.DDPMScheduler(variance_type="fixed_large"), {}),
    "ddpm-thresholding": (lambda: fastdiff.DDPMScheduler(thresholding=True, prediction_type="v_prediction"), {}),
    "ddim-eta1": (lambda: fastdiff.DDIMScheduler(timestep_spacing="trailing"), {"eta": 1.0}),
    "euler-karras": (lambda: fastdiff.EulerDiscreteScheduler(use_karras_sigmas=True), {}),
    "dpm++3m": (lambda: fastdiff.DPMSolverMultistepScheduler(solver_order=3), {}),
    "dpm++2m-sde": (lambda: fastdiff.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {}),
    "dpm-solver-3": (
        lambda: fastdiff.DPMSolverMultistepScheduler(
            algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"
        ),
        {},
    ),
    "unipc-wan": (
        lambda: fastdiff.UniPCMultistepScheduler(
            prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0
        ),
        {},
    ),
    "unipc-3-bh1-disable-corrector": (
        lambda: fastdiff.UniPCMultistepScheduler(
            solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min", disable_corrector=[2]
        ),
        {},
    ),
    "unipc-eps": (
        lambda: fastdiff.UniPCMultistepScheduler(
            predict_x0=False, prediction_type="v_prediction", final_sigmas_type="sigma_min"
        ),
        {},
    ),
    "unipc-thresholding": (
        lambda: fastdiff.UniPCMultistepScheduler(thresholding=True, prediction_type="v_prediction"),
        {},
    ),
    "sde-dpm-solver": (
        lambda: fastdiff.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
        {},
    ),
    "flow-euler-sde": (lambda: fastdiff.FlowMatchEulerDiscreteScheduler(stochastic_sampling=True, shift=3.0), {}),
    "dpm++3m-sde-flow": (
        lambda: fastdiff.DPMSolverMultistepScheduler(
            algorithm_type="sde-dpmsolver++",
            solver_order=3,
            prediction_type="flow_prediction",
            use_flow_sigmas=True,
            flow_shift=3.0,
        ),
        {},
    ),
}


@contextlib.contextmanager
def no_host_reads():
    """Make every Python-level host read of a tensor raise, except inside a Triton kernel launch."""
    armed = [True]
    saved = {}

    def guard(name, orig):
        def read(self, *args, **kwargs):
            if armed[0]:
                raise AssertionError(f"host read inside the loop: Tensor.{name} on a {tuple(self.shape)} tensor")
            return orig(self, *args, **kwargs)

        return read

    def unguarded(orig):
        def launch(*args, **kwargs):
            armed[0] = False
            try:
                return orig(*args, **kwargs)
            finally:
                armed[0] = True

        return launch

    for name in HOST_READS:
        saved[(torch.Tensor, name)] = torch.Tensor.__dict__.get(name)
        setattr(torch.Tensor, name, guard(name, getattr(torch.Tensor, name)))
    for mod in (step_kernels, add_noise_kernels):
        saved[(mod, "launch")] = mod.launch
        mod.launch = unguarded(mod.launch)
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else None
    if mode is not None:
        torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        if mode is not None:
            torch.cuda.set_sync_debug_mode(mode)
        for (owner, name), value in saved.items():
            if value is None:
                delattr(owner, name)
            else:
                setattr(owner, name, value)


def test_guard_catches_host_reads():
    x = torch.ones(3)
    with no_host_reads():
        with pytest.raises(AssertionError, match=r"Tensor.item"):
            x.sum().item()
        with pytest.raises(AssertionError, match=r"Tensor.__bool__"):
            bool(x.sum() > 0)
        with pytest.raises(AssertionError, match=r"Tensor.tolist"):
            x.tolist()
    assert x.sum().item() == 3.0  # restored


def test_guard_catches_a_model_that_reads_back():
    class Reads(TinyCondModel):
        def forward(self, x, t, **kwargs):
            if x.abs().max() > 1e6:  # a data-dependent branch: the value is needed on the host
                x = x.clamp(-1e6, 1e6)
            return super().forward(x, t, **kwargs)

    model = Reads(channels=2).eval()
    sampler = GraphSampler(model, fastdiff.DDIMScheduler(), (1, 2, 4, 4), dtype=torch.float32, device="cpu")
    st = sampler._static_inputs((1, 2, 4, 4), torch.float32, 3, None, {})
    with torch.no_grad(), no_host_reads(), pytest.raises(AssertionError, match="Tensor.__bool__"):
        sampler._run(st)


def _sample(model, make, device, backend, steps, step_kwargs, seed, **kw):
    return fastdiff.sample(
        model,
        make(),
        seed=seed,  # seeds seed, seed + 1: what the static buffer holds after _load(as_seed_tensor(seed))
        num_inference_steps=steps,
        step_kwargs=step_kwargs,
        graph=False,
        progress=False,
        backend=backend,
        **kw,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton", "cuda", "reference"])
@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_loop_body_reads_nothing_back_and_reruns_exactly(device, backend, name):
    """GraphSampler's steps around a capture, without the graph: static buffers and a scheduler copy, a
    warm-up run, the run a capture records (no host reads), then new seeds through the static buffers."""
    if backend != "reference" and backend not in available_backends(device):
        pytest.skip(f"backend {backend!r} is not available on {device}")
    make, step_kwargs = SCHEDULERS[name]
    torch.manual_seed(0)
    model = TinyCondModel(channels=2).to(device).eval()
    shape, steps = (2, 2, 6, 5), 6
    sched = make()
    sampler = GraphSampler(
        model,
        sched,
        shape,
        dtype=torch.float32,
        num_inference_steps=steps,
        step_kwargs=step_kwargs,
        device=device,
        backend=backend,
    )
    with torch.no_grad():
        st = sampler._static_inputs(shape, torch.float32, steps, None, {})
        assert st.scheduler is not sched and sched.num_inference_steps is None  # the user's scheduler is untouched
        sampler._load(st, as_seed_tensor(7, 2, device), None, None, {})
        first = sampler._run(st)  # the warm-up: compiles, fills the scheduler copy's device tables
        with no_host_reads():
            second = sampler._run(st)  # what a capture records
        sampler._load(st, as_seed_tensor(20, 2, device), None, None, {})
        with no_host_reads():
            third = sampler._run(st)
        eager = _sample(model, make, device, backend, steps, step_kwargs, 7, shape=shape)
        eager_new = _sample(model, make, device, backend, steps, step_kwargs, 20, shape=shape)
    assert torch.isfinite(second).all()
    assert torch.equal(first, second), f"{name}: the second run of the loop differs from the first"
    assert torch.equal(second, eager), f"{name}: the captured program differs from eager sample()"
    assert torch.equal(third, eager_new), f"{name}: new seeds in the static buffer differ from eager sample()"


class NestedCondModel(TinyCondModel):
    """Conditioning nested like SDXL's ``added_cond_kwargs``: a dict of tensors inside the kwargs."""

    def forward(self, x, t, encoder_hidden_states=None, added_cond_kwargs=None):
        out = super().forward(x, t, encoder_hidden_states)
        return out + added_cond_kwargs["bias"][:, :, None, None]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler"])
def test_guided_loop_with_latents_reads_nothing_back(device, name):
    """Latents, guidance scale and (nested) conditioning changed through the static buffers, as between
    replays, with the graph key unchanged."""
    from fastdiff.graph import _structure
    from fastdiff.loop import doubled_kwargs

    backend = (available_backends(device) or ["reference"])[0]
    make, step_kwargs = SCHEDULERS[name]
    torch.manual_seed(0)
    model = NestedCondModel(channels=2).to(device).eval()
    shape, steps = (2, 2, 6, 5), 5
    uncond = {
        "encoder_hidden_states": torch.zeros(2, 3, 5, device=device),
        "added_cond_kwargs": {"bias": torch.zeros(2, 2, device=device)},
    }

    def cond_kwargs():
        return {
            "encoder_hidden_states": torch.randn(2, 3, 5, device=device),
            "added_cond_kwargs": {"bias": torch.randn(2, 2, device=device)},
        }

    calls = [
        (torch.randn(shape, device=device), 3.0, cond_kwargs()),
        (torch.randn(shape, device=device), 1.5, cond_kwargs()),
    ]
    sampler = GraphSampler(
        model,
        make(),
        shape,
        dtype=torch.float32,
        num_inference_steps=steps,
        guidance_scale=3.0,
        guidance_rescale=0.5,
        step_kwargs=step_kwargs,
        device=device,
        backend=backend,
    )
    with torch.no_grad():
        first = doubled_kwargs(uncond, calls[0][2], shape[0])
        st = sampler._static_inputs(shape, torch.float32, steps, 3.0, first)
        sampler._load(st, as_seed_tensor(7, 2, device), calls[0][0], 3.0, first)
        sampler._run(st)
        for latents, g, cond in calls:
            doubled = doubled_kwargs(uncond, cond, shape[0])
            assert _structure(doubled) == _structure(first), "new conditioning values must not need a new graph"
            sampler._load(st, as_seed_tensor(7, 2, device), latents, g, doubled)
            with no_host_reads():
                got = sampler._run(st)
            eager = _sample(
                model,
                make,
                device,
                backend,
                steps,
                step_kwargs,
                7,
                latents=latents,
                guidance_scale=g,
                guidance_rescale=0.5,
                model_kwargs=cond,
                uncond_kwargs=uncond,
            )
            assert torch.equal(got, eager), f"guided {name}, scale {g}: the captured program differs from eager"
    assert _structure(doubled_kwargs(uncond, cond, 2)) != _structure(
        {"encoder_hidden_states": doubled["encoder_hidden_states"]}
    )


def test_doubled_kwargs_nested_and_errors():
    from fastdiff.loop import doubled_kwargs

    c = {"e": torch.ones(2, 3), "add": {"t": torch.ones(2, 4), "ids": [torch.ones(2, 1), 5]}, "flag": True}
    u = {"e": torch.zeros(2, 3), "add": {"t": torch.zeros(2, 4), "ids": [torch.zeros(2, 1), 5]}, "flag": True}
    d = doubled_kwargs(u, c, 2)
    assert d["e"].shape == (4, 3) and d["e"][:2].eq(0).all() and d["e"][2:].eq(1).all()
    assert d["add"]["t"].shape == (4, 4) and d["add"]["ids"][0].shape == (4, 1) and d["add"]["ids"][1] == 5
    assert d["flag"] is True
    with pytest.raises(ValueError, match=r"`uncond_kwargs\['add'\]` keys"):
        doubled_kwargs({**u, "add": {"t": u["add"]["t"]}}, c, 2)
    with pytest.raises(ValueError, match=r"`model_kwargs\['add'\]\['t'\]` has shape \(3, 4\)"):
        doubled_kwargs(u, {**c, "add": {**c["add"], "t": torch.ones(3, 4)}}, 2)
    with pytest.raises(TypeError, match=r"`model_kwargs\['e'\]` and `uncond_kwargs\['e'\]` must both be tensors"):
        doubled_kwargs({**u, "e": None}, c, 2)
    with pytest.raises(ValueError, match=r"non-tensor .*\['flag'\].* differ"):
        doubled_kwargs({**u, "flag": False}, c, 2)


# ---------------------------------------------------------------------------------------------- transformer adapters

TRANSFORMER_CASES = {
    # family, true-CFG scale, Flux's distilled guidance (a number: part of the graph's key, filled in the loop)
    "sd3-cfg": ("sd3", 4.0, None),
    "flux-distilled": ("flux", None, 3.5),
    "flux-true-cfg": ("flux", 2.5, None),
    "wan-cfg": ("wan", 5.0, None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "sched_name", ["DPMSolverMultistepScheduler", "FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler"]
)
@pytest.mark.parametrize("case", list(TRANSFORMER_CASES))
def test_transformer_adapters_read_nothing_back_and_rerun_exactly(device, sched_name, case):
    """SD3, Flux (packed latents, shared ids, guidance embedding) and Wan (5-D latents) through GraphSampler's
    captured program: no host read; new seeds, latents and conditioning through the static buffers (nested
    ``joint_attention_kwargs`` too) give what eager ``sample()`` gives, bit for bit."""
    pytest.importorskip("transformers")
    from test_transformers import tiny_model
    from tiny_pipelines import LATENT_SHAPES, WAN_UNIPC_SCHEDULER, conditioning

    from fastdiff.graph import _structure
    from fastdiff.loop import doubled_kwargs

    if sched_name not in fastdiff.SCHEDULERS:
        pytest.skip(f"fastdiff has no {sched_name} yet")
    family, scale, distilled = TRANSFORMER_CASES[case]
    config = WAN_UNIPC_SCHEDULER if sched_name == "UniPCMultistepScheduler" else {}  # flow mode, as Wan runs it

    def make():
        return fastdiff.SCHEDULERS[sched_name].from_config(config)

    backend = (available_backends(device) or ["reference"])[0]
    model = tiny_model(family, distilled is not None, device)
    shape, steps = (2, *LATENT_SHAPES[family]), 3

    def kwargs(seed):
        kw = conditioning(family, 2, seed, device)
        if family != "wan":
            kw["joint_attention_kwargs"] = {}
        return dict(kw, guidance=distilled) if distilled is not None else kw

    uncond = kwargs(100) if scale is not None else None
    sampler = GraphSampler(
        model,
        make(),
        shape,
        dtype=torch.float32,
        num_inference_steps=steps,
        guidance_scale=scale,
        device=device,
        backend=backend,
    )
    shared = sampler.adapter.shared
    calls = [(kwargs(1), None, 7), (kwargs(2), torch.randn(shape, device=device), 9)]
    with torch.no_grad():
        first = doubled_kwargs(uncond, calls[0][0], 2, shared) if scale is not None else calls[0][0]
        st = sampler._static_inputs(shape, torch.float32, steps, scale, first)
        sampler._load(st, as_seed_tensor(7, 2, device), None, scale, first)
        sampler._run(st)  # warm-up
        for cond, latents, seed in calls:
            call = doubled_kwargs(uncond, cond, 2, shared) if scale is not None else cond
            assert _structure(call) == _structure(first), "new conditioning values must not need a new graph"
            sampler._load(st, as_seed_tensor(seed, 2, device), latents, scale, call)
            with no_host_reads():
                got = sampler._run(st)
            eager = _sample(
                model,
                make,
                device,
                backend,
                steps,
                {},
                seed,
                **(dict(latents=latents) if latents is not None else dict(shape=shape)),
                guidance_scale=scale,
                model_kwargs=cond,
                uncond_kwargs=uncond,
            )
            assert torch.isfinite(got).all()
            assert torch.equal(got, eager), f"{case} with {sched_name}: the captured program differs from eager"
