"""Euler, Euler ancestral and DPM-Solver++ multistep: fastdiff (reference and fast backends) against
diffusers, step by step over whole schedules, every listed config knob."""

import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_fp32, assert_lowp

import fastdiff

diffusers = pytest.importorskip("diffusers")

RTOL32 = 1e-5
BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]


def _run(
    name, config, device, backend, steps, step_kwargs=None, shape=(2, 3, 7, 9), set_kwargs=None, dtype=torch.float32
):
    """Yield (i, fast output, diffusers output, truth_fn) for every step of a loop driven like a pipeline
    (scale_model_input, then step), on fresh random model outputs. The truth is fastdiff's reference in
    float64 on the same inputs and noise (sigmas kept as diffusers' float32 values)."""
    step_kwargs = step_kwargs or {}
    set_kwargs = set_kwargs if set_kwargs is not None else {"num_inference_steps": steps}
    d = getattr(diffusers, name)(**config)
    f = getattr(fastdiff, name)(**config, backend=backend)
    r = getattr(fastdiff, name)(**config, backend="reference")
    for s in (d, f, r):
        s.set_timesteps(**set_kwargs, device=device)
    torch.testing.assert_close(f.timesteps.double(), d.timesteps.double(), rtol=0, atol=0)
    torch.testing.assert_close(f.sigmas.double(), d.sigmas.double(), rtol=0, atol=0)
    assert abs(float(f.init_noise_sigma) - float(d.init_noise_sigma)) <= 1e-6 * float(d.init_noise_sigma)
    r.sigmas = r.sigmas.double()
    x = torch.randn(shape, device=device, dtype=dtype) * float(d.init_noise_sigma)
    for i, (t_d, t_f) in enumerate(zip(d.timesteps, f.timesteps)):
        m = torch.randn(shape, device=device, dtype=dtype)
        torch.testing.assert_close(f.scale_model_input(x, t_f), d.scale_model_input(x, t_d))
        r.scale_model_input(x.double(), r.timesteps[i])
        seed = 100 + i
        out_d = d.step(m, t_d, x, generator=torch.Generator(device).manual_seed(seed), **step_kwargs)
        out_f = f.step(m, t_f, x, generator=torch.Generator(device).manual_seed(seed), **step_kwargs)
        noise = torch.randn(
            shape,
            generator=torch.Generator(device).manual_seed(seed),
            device=device,
            dtype=torch.float32 if name == "DPMSolverMultistepScheduler" else dtype,
        )
        truth = _truth_step(r, m, x, noise, step_kwargs)
        yield i, out_f, out_d, truth
        x = out_d.prev_sample  # follow diffusers' trajectory so every step sees the same input


def _truth_step(r, m, x, noise, step_kwargs):
    """Run the float64 reference step now (multistep history must advance every step); noise through the
    `variance_noise` / patched draw so it equals the fp32 draws."""
    import fastdiff.schedulers._base as base

    saved = base.randn_tensor
    base.randn_tensor = lambda *a, **k: noise.double()
    try:
        out = r.step(
            m.double(),
            r.timesteps[r.step_index if r.step_index is not None else 0],
            x.double(),
            generator=None,
            **step_kwargs,
        )
    finally:
        base.randn_tensor = saved
    return lambda: out


def _check(out_f, out_d, truth, what, x0=True):
    assert_fp32(out_f.prev_sample, out_d.prev_sample, lambda: truth().prev_sample, RTOL32, f"prev_sample {what}")
    if x0 and out_d.pred_original_sample is not None:
        assert_fp32(
            out_f.pred_original_sample,
            out_d.pred_original_sample,
            lambda: truth().pred_original_sample,
            RTOL32,
            f"pred_original_sample {what}",
        )


EULER_CASES = [
    ({}, {}),
    (dict(prediction_type="v_prediction"), {}),
    (dict(prediction_type="sample"), {}),
    (dict(timestep_spacing="leading", steps_offset=1), {}),
    (dict(timestep_spacing="trailing"), {}),
    (dict(use_karras_sigmas=True), {}),
    (dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=10.0), {}),
    (dict(use_exponential_sigmas=True), {}),
    (dict(use_beta_sigmas=True), {}),
    (dict(interpolation_type="log_linear"), {}),
    (dict(final_sigmas_type="sigma_min"), {}),
    (dict(prediction_type="v_prediction", timestep_type="continuous"), {}),
    (dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", timestep_spacing="trailing"), {}),
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), {}),
    (dict(beta_schedule="squaredcos_cap_v2"), {}),
    ({}, dict(s_churn=2.0, s_tmin=0.5, s_tmax=20.0)),
]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("config,step_kwargs", EULER_CASES)
def test_euler_matches_diffusers(device, backend, config, step_kwargs):
    for i, out_f, out_d, truth in _run("EulerDiscreteScheduler", config, device, backend, 9, step_kwargs):
        _check(out_f, out_d, truth, f"step {i}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize(
    "set_kwargs", [dict(timesteps=[900.0, 650.5, 300.0, 120.0, 5.0]), dict(sigmas=[14.0, 7.0, 3.0, 1.0, 0.3, 0.0])]
)
def test_euler_custom_timesteps_and_sigmas(device, backend, set_kwargs):
    for i, out_f, out_d, truth in _run("EulerDiscreteScheduler", {}, device, backend, None, set_kwargs=set_kwargs):
        _check(out_f, out_d, truth, f"step {i}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize(
    "config",
    [
        {},
        dict(prediction_type="v_prediction"),
        dict(timestep_spacing="leading", steps_offset=1),
        dict(timestep_spacing="trailing"),
        dict(rescale_betas_zero_snr=True, prediction_type="v_prediction"),
        dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    ],
)
def test_euler_ancestral_matches_diffusers(device, backend, config):
    for i, out_f, out_d, truth in _run("EulerAncestralDiscreteScheduler", config, device, backend, 8):
        _check(out_f, out_d, truth, f"step {i}")


DPM_CORE = [
    dict(algorithm_type=a, solver_order=o, solver_type=s, lower_order_final=lof)
    for a in ("dpmsolver++", "sde-dpmsolver++")
    for o in (1, 2, 3)
    for s in ("midpoint", "heun")
    for lof in (True, False)
]
DPM_KNOBS = [
    dict(use_karras_sigmas=True),
    dict(use_karras_sigmas=True, algorithm_type="sde-dpmsolver++"),
    dict(use_lu_lambdas=True),
    dict(use_exponential_sigmas=True),
    dict(use_beta_sigmas=True),
    dict(final_sigmas_type="sigma_min"),
    dict(final_sigmas_type="sigma_min", euler_at_final=True),
    dict(euler_at_final=True, lower_order_final=False),
    dict(prediction_type="v_prediction"),
    dict(prediction_type="sample", thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5),
    dict(thresholding=True, sample_max_value=2.0, solver_order=3),
    dict(timestep_spacing="leading", steps_offset=1),
    dict(timestep_spacing="trailing"),
    dict(lambda_min_clipped=-5.1),
    dict(rescale_betas_zero_snr=True, prediction_type="v_prediction", final_sigmas_type="sigma_min"),
    dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, use_karras_sigmas=True),
    # squaredcos_cap_v2 with karras sigmas repeats t=998 four times at 8 steps and diffusers 0.42 itself runs
    # off the end of its sigmas (IndexError), so the cosine schedule is covered without karras
    dict(beta_schedule="squaredcos_cap_v2"),
]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("config", DPM_CORE + DPM_KNOBS)
@pytest.mark.parametrize("steps", [8, 16])
def test_dpmsolver_matches_diffusers(device, backend, config, steps):
    for i, out_f, out_d, truth in _run("DPMSolverMultistepScheduler", config, device, backend, steps):
        _check(out_f, out_d, truth, f"step {i}", x0=False)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_dpmsolver_custom_timesteps(device, backend):
    set_kwargs = dict(timesteps=[999, 800, 601, 400, 250, 100, 20])
    for i, out_f, out_d, truth in _run("DPMSolverMultistepScheduler", {}, device, backend, None, set_kwargs=set_kwargs):
        _check(out_f, out_d, truth, f"step {i}", x0=False)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize(
    "name", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"]
)
def test_add_noise_matches_diffusers(device, backend, name):
    d = getattr(diffusers, name)()
    f = getattr(fastdiff, name)(backend=backend)
    d.set_timesteps(10, device=device)
    f.set_timesteps(10, device=device)
    x = torch.randn(4, 3, 5, 6, device=device)
    noise = torch.randn_like(x)
    ts = f.timesteps[torch.tensor([0, 3, 9, 5])]
    torch.testing.assert_close(
        f.add_noise(x, noise, ts), d.add_noise(x, noise, d.timesteps[[0, 3, 9, 5]]), rtol=1e-5, atol=1e-5
    )


LOWP = [
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True)),
    ("EulerAncestralDiscreteScheduler", {}),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True)),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3)),
]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,config", LOWP)
def test_low_precision(device, backend, dtype, name, config, monkeypatch):
    """fp32 diffusers is the reference; diffusers in `dtype` is plain PyTorch. All three get the same
    inputs each step (diffusers' low-precision trajectory) and the same noise numbers."""
    import importlib

    import fastdiff.schedulers._base as fd_base

    d_module = importlib.import_module(type(getattr(diffusers, name)()).__module__)
    noise = {}
    fake = lambda shape, generator=None, device=None, dtype=None, **k: noise["z"].to(dtype)
    monkeypatch.setattr(d_module, "randn_tensor", fake)
    monkeypatch.setattr(fd_base, "randn_tensor", fake)
    d32, dlo = getattr(diffusers, name)(**config), getattr(diffusers, name)(**config)
    f = getattr(fastdiff, name)(**config, backend=backend)
    for s in (d32, dlo, f):
        s.set_timesteps(8, device=device)
    x = (torch.randn(2, 3, 8, 8, device=device) * float(d32.init_noise_sigma)).to(dtype)
    for t_32, t_lo, t_f in zip(d32.timesteps, dlo.timesteps, f.timesteps):
        m = torch.randn(2, 3, 8, 8, device=device).to(dtype)
        noise["z"] = torch.randn(2, 3, 8, 8, device=device).to(dtype).float()
        for s, t, xx in ((d32, t_32, x.float()), (dlo, t_lo, x), (f, t_f, x)):
            s.scale_model_input(xx, t)
        ref = d32.step(m.float(), t_32, x.float())
        plain = dlo.step(m, t_lo, x)
        fast = f.step(m, t_f, x)
        assert fast.prev_sample.dtype == dtype
        assert_lowp(fast.prev_sample, plain.prev_sample, ref.prev_sample, f"{name} t={float(t_32)}")
        x = plain.prev_sample


def test_step_index_and_errors():
    f = fastdiff.EulerDiscreteScheduler()
    f.set_timesteps(5)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="integer indices"):
        f.step(x, 3, x)
    with pytest.raises(ValueError, match="not in the schedule"):
        f.step(x, torch.tensor(123.25), x)
    for t in f.timesteps:
        f.step(x, t, x)
    assert f.step_index == 5
    with pytest.raises(ValueError, match="past the last"):
        f.step(x, f.timesteps[0], x)
    f.set_timesteps(5)
    f.set_begin_index(2)
    f.step(x, f.timesteps[0], x)
    assert f.step_index == 3
    with pytest.raises(ValueError, match="only one of `use_karras_sigmas`"):
        fastdiff.EulerDiscreteScheduler(use_karras_sigmas=True, use_beta_sigmas=True)
    with pytest.raises(ValueError, match="`algorithm_type`.*'dpmsolver'"):
        fastdiff.DPMSolverMultistepScheduler(algorithm_type="dpmsolver")
    with pytest.raises(ValueError, match="`solver_order`.*4"):
        fastdiff.DPMSolverMultistepScheduler(solver_order=4)
    with pytest.raises(ValueError, match="`prediction_type`='flow_prediction' is not supported"):
        fastdiff.DPMSolverMultistepScheduler(
            prediction_type="flow_prediction", algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"
        )
