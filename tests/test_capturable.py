"""The program GraphSampler captures, checked on any device: it reads nothing back to the host, and a second
run of it (the one a capture records, after the warm-up) gives exactly what the eager ``sample`` gives.

On CUDA a host read inside the loop (``.item()``, ``.tolist()``, a branch on a tensor, ...) is a device sync,
which would break the capture and stall the eager loop; here every Python-level host read of a tensor raises
while the loop body runs. The Triton interpreter reads its arguments on the host by design, so the guard is
lifted inside a kernel launch (on a GPU that launch is one asynchronous ``cuLaunchKernel``).
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

HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")

SCHEDULERS = {
    "ddpm": (lambda: fastdiff.DDPMScheduler(), {}),
    "ddpm-large-var": (lambda: fastdiff.DDPMScheduler(variance_type="fixed_large"), {}),
    "ddpm-thresholding": (lambda: fastdiff.DDPMScheduler(thresholding=True, prediction_type="v_prediction"), {}),
    "ddim": (lambda: fastdiff.DDIMScheduler(), {}),
    "ddim-eta1": (lambda: fastdiff.DDIMScheduler(timestep_spacing="trailing"), {"eta": 1.0}),
    "euler": (lambda: fastdiff.EulerDiscreteScheduler(), {}),
    "euler-karras": (lambda: fastdiff.EulerDiscreteScheduler(use_karras_sigmas=True), {}),
    "euler-a": (lambda: fastdiff.EulerAncestralDiscreteScheduler(), {}),
    "dpm++2m": (lambda: fastdiff.DPMSolverMultistepScheduler(), {}),
    "dpm++3m": (lambda: fastdiff.DPMSolverMultistepScheduler(solver_order=3), {}),
    "dpm++2m-sde": (lambda: fastdiff.DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {}),
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
    try:
        yield
    finally:
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


def _seeds(first, device):
    return torch.tensor([first, first + 1], dtype=torch.int64, device=device)


def _sample(model, make, device, backend, steps, step_kwargs, seed, **kw):
    return fastdiff.sample(
        model,
        make(),
        seed=_seeds(seed, device),
        num_inference_steps=steps,
        step_kwargs=step_kwargs,
        graph=False,
        progress=False,
        backend=backend,
        **kw,
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["triton", "cuda", "reference"])
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
        sampler._load(st, _seeds(7, device), None, None, {})
        first = sampler._run(st)  # the warm-up: compiles, fills the scheduler copy's device tables
        with no_host_reads():
            second = sampler._run(st)  # what a capture records
        sampler._load(st, _seeds(20, device), None, None, {})
        with no_host_reads():
            third = sampler._run(st)
        eager = _sample(model, make, device, backend, steps, step_kwargs, 7, shape=shape)
        eager_new = _sample(model, make, device, backend, steps, step_kwargs, 20, shape=shape)
    assert torch.isfinite(second).all()
    assert torch.equal(first, second), f"{name}: the second run of the loop differs from the first"
    assert torch.equal(second, eager), f"{name}: the captured program differs from eager sample()"
    assert torch.equal(third, eager_new), f"{name}: new seeds in the static buffer differ from eager sample()"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", ["ddim", "dpm++2m", "euler-a"])
def test_guided_loop_with_latents_reads_nothing_back(device, name):
    """Latents, guidance scale and conditioning changed through the static buffers, as between replays."""
    backend = (available_backends(device) or ["reference"])[0]
    make, step_kwargs = SCHEDULERS[name]
    torch.manual_seed(0)
    model = TinyCondModel(channels=2).to(device).eval()
    shape, steps = (2, 2, 6, 5), 5
    uncond = torch.zeros(2, 3, 5, device=device)
    calls = [(torch.randn(shape, device=device), 3.0, torch.randn(2, 3, 5, device=device)) for _ in range(2)]
    calls[1] = (calls[1][0], 1.5, calls[1][2])
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

    def doubled(cond):
        return {"encoder_hidden_states": torch.cat([uncond, cond])}

    with torch.no_grad():
        st = sampler._static_inputs(shape, torch.float32, steps, 3.0, doubled(calls[0][2]))
        sampler._load(st, _seeds(7, device), calls[0][0], 3.0, doubled(calls[0][2]))
        sampler._run(st)
        for latents, g, cond in calls:
            sampler._load(st, _seeds(7, device), latents, g, doubled(cond))
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
                model_kwargs={"encoder_hidden_states": cond},
                uncond_kwargs={"encoder_hidden_states": uncond},
            )
            assert torch.equal(got, eager), f"guided {name}, scale {g}: the captured program differs from eager"
