"""DPMSolverMultistepScheduler in flow mode (Sana's ``flow_prediction`` + ``use_flow_sigmas`` + ``flow_shift``, dynamic
shifting with ``set_timesteps(mu=...)``) against diffusers, step by step on every backend, for every algorithm,
solver type and order diffusers supports there; forward noising; fp16/bf16; the errors."""

import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_lowp, assert_rel
from test_sigma_schedulers import _check, _run

import fastdiff

diffusers = pytest.importorskip("diffusers")

NAME = "DPMSolverMultistepScheduler"
BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]
FAST_CASES = [(d, b) for d in DEVICES for b in available_backends(d)]
SANA = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)

SOLVERS = [
    dict(SANA, algorithm_type=algorithm, solver_type=solver, solver_order=order)
    for algorithm in ("dpmsolver++", "sde-dpmsolver++")
    for solver in ("midpoint", "heun")
    for order in (1, 2, 3)
]
KNOBS = [
    dict(SANA, final_sigmas_type="sigma_min"),
    dict(SANA, lower_order_final=False),
    dict(SANA, euler_at_final=True),
    dict(SANA, flow_shift=1.0),
    dict(SANA, thresholding=True, sample_max_value=1.5, dynamic_thresholding_ratio=0.9),
    dict(use_flow_sigmas=True, flow_shift=2.0),  # flow sigmas with an epsilon model
    dict(use_flow_sigmas=True, prediction_type="v_prediction"),
    dict(use_flow_sigmas=True, prediction_type="sample", solver_order=3),
    dict(prediction_type="flow_prediction"),  # a flow prediction on VP sigmas: x0 = x - sigma v with the VE sigma
    # the noise-prediction DPM-Solver on flow sigmas (diffusers requires final_sigmas_type="sigma_min" there)
    dict(use_flow_sigmas=True, algorithm_type="dpmsolver", final_sigmas_type="sigma_min", solver_order=3),
    dict(use_flow_sigmas=True, algorithm_type="sde-dpmsolver", final_sigmas_type="sigma_min"),
    dict(SANA, use_dynamic_shifting=True),  # without mu: flow_shift as configured
]
DYNAMIC = [  # set_timesteps(mu=...): flow_shift = e^mu
    (dict(SANA, use_dynamic_shifting=True), 0.9),
    (dict(SANA, use_dynamic_shifting=True, algorithm_type="sde-dpmsolver++", solver_order=3), 1.6),
]


@pytest.mark.filterwarnings("ignore:.*algorithm_type.*deprecated.*:FutureWarning")
@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("config", SOLVERS + KNOBS)
@pytest.mark.parametrize("steps", [7, 16])
def test_flow_mode_matches_diffusers(device, backend, config, steps):
    for i, out_f, out_d, truth in _run(NAME, config, device, backend, steps):
        _check(out_f, out_d, truth, f"{config} step {i}", x0=False)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("config,mu", DYNAMIC)
def test_dynamic_shifting_matches_diffusers(device, backend, config, mu):
    set_kwargs = dict(num_inference_steps=9, mu=mu)
    for i, out_f, out_d, truth in _run(NAME, config, device, backend, None, set_kwargs=set_kwargs):
        _check(out_f, out_d, truth, f"mu={mu} step {i}", x0=False)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("shape", [(1, 13, 5), (2, 4, 3, 5, 6)])
def test_packed_and_video_shapes(device, backend, shape):
    for i, out_f, out_d, truth in _run(NAME, SANA, device, backend, 6, shape=shape):
        _check(out_f, out_d, truth, f"{shape} step {i}", x0=False)


def test_mu_persists_like_diffusers():
    """diffusers stores e^mu as the flow shift: later set_timesteps calls without mu keep it."""
    config = dict(SANA, use_dynamic_shifting=True)
    d, f = diffusers.DPMSolverMultistepScheduler(**config), fastdiff.DPMSolverMultistepScheduler(**config)
    for kwargs in (dict(mu=1.2), {}, dict(mu=0.3), {}):
        for s in (d, f):
            s.set_timesteps(8, **kwargs)
        assert torch.equal(f.timesteps, d.timesteps) and torch.equal(f.sigmas, d.sigmas), kwargs
    assert f.config.flow_shift == 3.0, "the config keeps the configured value"


@pytest.mark.parametrize("steps", [1, 4, 20, 50, 999])
@pytest.mark.parametrize("config", [SANA, dict(SANA, final_sigmas_type="sigma_min"), dict(SANA, flow_shift=0.4)])
def test_flow_schedule_matches_diffusers(config, steps):
    d, f = diffusers.DPMSolverMultistepScheduler(**config), fastdiff.DPMSolverMultistepScheduler(**config)
    for s in (d, f):
        s.set_timesteps(steps)
    assert f.timesteps.dtype == d.timesteps.dtype == torch.int64
    assert torch.equal(f.timesteps, d.timesteps) and torch.equal(f.sigmas, d.sigmas)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_add_noise_in_flow_mode_matches_diffusers(device, backend):
    d, f = diffusers.DPMSolverMultistepScheduler(**SANA), fastdiff.DPMSolverMultistepScheduler(**SANA, backend=backend)
    for s in (d, f):
        s.set_timesteps(10, device=device)
    x = torch.randn(4, 3, 5, 6, device=device)
    noise = torch.randn_like(x)
    pick = [0, 3, 9, 5]
    assert_rel(f.add_noise(x, noise, f.timesteps[pick]), d.add_noise(x, noise, d.timesteps[pick]), 1e-5, "add_noise")


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [SANA, dict(SANA, algorithm_type="sde-dpmsolver++", solver_order=3)])
def test_low_precision_within_twice_pytorch(device, backend, dtype, config):
    """diffusers in fp32 is the reference, diffusers in ``dtype`` plain PyTorch, on the same low-precision inputs
    and noise (float32 draws from one seed per step, as diffusers draws them)."""
    d32, dlo = diffusers.DPMSolverMultistepScheduler(**config), diffusers.DPMSolverMultistepScheduler(**config)
    f = fastdiff.DPMSolverMultistepScheduler(**config, backend=backend)
    for s in (d32, dlo, f):
        s.set_timesteps(8, device=device)
    x = torch.randn(2, 3, 8, 8, device=device).to(dtype)
    for i, (t_32, t_lo, t_f) in enumerate(zip(d32.timesteps, dlo.timesteps, f.timesteps)):
        m = torch.randn(2, 3, 8, 8, device=device).to(dtype)
        gen = lambda: torch.Generator(device).manual_seed(50 + i)  # noqa: E731
        ref = d32.step(m.float(), t_32, x.float(), generator=gen()).prev_sample
        plain = dlo.step(m, t_lo, x, generator=gen()).prev_sample
        fast = f.step(m, t_f, x, generator=gen()).prev_sample
        assert fast.dtype == dtype and f.last_backend == backend
        assert_lowp(fast, plain, ref, f"{config} step {i}")
        x = plain


def test_flow_mode_errors():
    F = fastdiff.DPMSolverMultistepScheduler
    with pytest.raises(ValueError, match="`prediction_type`='flow_prediction' is not supported for `algorithm_type`"):
        F(prediction_type="flow_prediction", algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    with pytest.raises(ValueError, match=r"`mu`=0.5 needs use_dynamic_shifting=True"):
        F(**SANA).set_timesteps(4, mu=0.5)
    with pytest.raises(ValueError, match="time_shift_type='linear'"):
        F(**SANA, use_dynamic_shifting=True, time_shift_type="linear").set_timesteps(4, mu=0.5)
    with pytest.raises(ValueError, match="custom `timesteps` cannot be combined with use_flow_sigmas"):
        F(**SANA).set_timesteps(timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="`time_shift_type` must be one of"):
        F(time_shift_type="cubic")
