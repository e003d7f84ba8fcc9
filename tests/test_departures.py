"""Each deliberate departure from diffusers listed in the README ("The diffusers contract, and where fastdiff
departs from it"), one test per row, with diffusers' own behaviour checked beside it where it runs."""

import json
import logging
import warnings

import pytest
import torch
from helpers import rel_err

import fastdiff

diffusers = pytest.importorskip("diffusers")


@pytest.mark.parametrize("name", sorted(fastdiff.SCHEDULERS))
def test_trained_betas_of_the_wrong_length_are_refused(name):
    if "trained_betas" not in fastdiff.SCHEDULERS[name]._init_keys_ordered():
        pytest.skip(f"{name} has no trained_betas")
    getattr(diffusers, name)(trained_betas=[0.1, 0.3])  # diffusers accepts it
    with pytest.raises(ValueError, match=r"`trained_betas`.*num_train_timesteps=1000.*\(2,\)"):
        fastdiff.SCHEDULERS[name](trained_betas=[0.1, 0.3])


def test_unknown_ddpm_variance_type_is_refused():
    diffusers.DDPMScheduler(variance_type="other")
    with pytest.raises(ValueError, match="`variance_type`.*'other'"):
        fastdiff.DDPMScheduler(variance_type="other")


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_sde_dpmsolver_third_order_is_refused_at_construction():
    d = diffusers.DPMSolverMultistepScheduler(
        algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min", lower_order_final=False
    )
    d.set_timesteps(20)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(UnboundLocalError):  # diffusers: no third-order SDE-DPM-Solver update
        for t in d.timesteps[:3]:
            x = d.step(torch.randn_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="`solver_order`=3 is not defined for `algorithm_type`='sde-dpmsolver'"):
        fastdiff.DPMSolverMultistepScheduler(
            algorithm_type="sde-dpmsolver", solver_order=3, final_sigmas_type="sigma_min"
        )


@pytest.mark.parametrize("channels", [3, 4])
def test_dpm_learned_variance_keeps_the_samples_channels(channels):
    """diffusers keeps the first 3 channels: right for 3-channel samples (where fastdiff agrees), wrong for 4."""
    f = fastdiff.DPMSolverMultistepScheduler(variance_type="learned_range", backend="reference")
    d = diffusers.DPMSolverMultistepScheduler(variance_type="learned_range")
    f.set_timesteps(5)
    d.set_timesteps(5)
    x = torch.randn(2, channels, 4, 4)
    out = torch.randn(2, 2 * channels, 4, 4)
    got = f.step(out, f.timesteps[0], x).prev_sample
    same = f.step  # a C-channel output is accepted too (diffusers slices a no-op)
    assert got.shape == x.shape
    if channels == 3:
        torch.testing.assert_close(got, d.step(out, d.timesteps[0], x).prev_sample, rtol=1e-5, atol=1e-6)
    else:
        with pytest.raises(RuntimeError):
            d.step(out, d.timesteps[0], x)
    f.set_timesteps(5)
    assert same(out[:, :channels], f.timesteps[0], x).prev_sample.shape == x.shape


def test_dpmsolver_with_thresholding_runs_the_reference_step():
    kw = dict(algorithm_type="dpmsolver", thresholding=True, final_sigmas_type="sigma_min")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        f = fastdiff.DPMSolverMultistepScheduler(**kw, backend="torch")
        d = diffusers.DPMSolverMultistepScheduler(**kw)
    f.set_timesteps(6)
    d.set_timesteps(6)
    x_f = x_d = torch.randn(1, 2, 4, 4) * 3
    for tf, td in zip(f.timesteps, d.timesteps):
        m = torch.randn(1, 2, 4, 4)
        x_f, x_d = f.step(m, tf, x_f).prev_sample, d.step(m, td, x_d).prev_sample
        assert f.last_backend == "reference"
    torch.testing.assert_close(x_f, x_d, rtol=1e-5, atol=1e-5)


def test_class_name_is_in_the_config_from_construction():
    assert fastdiff.DDIMScheduler().config["_class_name"] == "DDIMScheduler"
    assert "_class_name" not in diffusers.DDIMScheduler().config  # diffusers adds it when printed or saved


def test_positional_arguments_count_as_passed():
    f = fastdiff.DDPMScheduler(500)
    assert "num_train_timesteps" not in f.config["_use_default_values"]
    assert fastdiff.EulerDiscreteScheduler.from_config(f.config).config.num_train_timesteps == 500
    d = diffusers.DDPMScheduler(500)
    assert diffusers.EulerDiscreteScheduler.from_config(d.config).config.num_train_timesteps == 1000


def test_config_values_are_json_ready_and_read_only():
    f = fastdiff.DDPMScheduler(trained_betas=torch.linspace(1e-4, 0.02, 1000).numpy())
    assert isinstance(f.config.trained_betas, list)
    json.dumps(dict(f.config))
    with pytest.raises(TypeError, match="frozen"):
        f.config["beta_start"] = 0.5


def test_saved_files_carry_the_fastdiff_version(tmp_path):
    fastdiff.DDIMScheduler().save_config(tmp_path)
    saved = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert saved["_fastdiff_version"] == fastdiff.__version__ and "_diffusers_version" not in saved


def test_save_config_into_a_file_raises_both_error_types(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    for kind in (NotADirectoryError, AssertionError):
        with pytest.raises(kind, match="`save_directory`"):
            fastdiff.DDIMScheduler().save_config(path)


def test_ignored_keys_warning_only_for_fastdiff_sources(caplog):
    unknown = dict(fastdiff.DDIMScheduler().config, not_an_option=1)
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        fastdiff.EulerDiscreteScheduler.from_config(unknown)
    assert any("not_an_option" in r.getMessage() for r in caplog.records)
    caplog.clear()
    pndm = dict(diffusers.PNDMScheduler().config, _class_name="PNDMScheduler")
    with caplog.at_level(logging.WARNING, logger="fastdiff"):
        fastdiff.EulerDiscreteScheduler.from_config(pndm)
    assert not [r for r in caplog.records if "ignores" in r.getMessage()]


def test_unipc_flow_prediction_without_predict_x0_is_refused_at_construction():
    """Departure: diffusers builds it and fails at the first step; fastdiff refuses it before any model work."""
    d = diffusers.UniPCMultistepScheduler(prediction_type="flow_prediction", predict_x0=False)
    d.set_timesteps(3)
    with pytest.raises(ValueError, match="flow_prediction"):
        d.step(torch.randn(1, 2), d.timesteps[0], torch.randn(1, 2))
    with pytest.raises(ValueError, match=r"`prediction_type`='flow_prediction' needs `predict_x0`=True"):
        fastdiff.UniPCMultistepScheduler(prediction_type="flow_prediction", predict_x0=False)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_unipc_bh1_final_step_onto_zero_is_finite(backend):
    """Departure: diffusers' bh1 step onto sigma = 0 (final_sigmas_type "zero", the default) computes
    x_t - alpha_t B(h) * 0 with B(h) = -inf: NaN. fastdiff returns the limit, the last x0 prediction."""
    config = dict(solver_type="bh1", prediction_type="sample")
    d = diffusers.UniPCMultistepScheduler(**config)
    f = fastdiff.UniPCMultistepScheduler(**config, backend=backend)
    d.set_timesteps(4)
    f.set_timesteps(4)
    x = torch.randn(2, 3, 4)
    for k, (t_f, t_d) in enumerate(zip(f.timesteps, d.timesteps)):
        m = torch.randn_like(x)
        got, want = f.step(m, t_f, x).prev_sample, d.step(m, t_d, x).prev_sample
        if k < 3:
            assert rel_err(got, want) <= 1e-5
            x = want
    assert want.isnan().all()
    torch.testing.assert_close(got, m, rtol=1e-6, atol=1e-6)  # prediction_type "sample": x0 is the model output


def test_unipc_more_steps_than_training_timesteps_are_refused():
    """diffusers repeats timesteps and sigmas beyond num_train_timesteps and steps to NaN (h = 0); fastdiff refuses
    the count (as for DPM-Solver), and allows it where the sigmas are respaced or flow sigmas (they never repeat)."""
    d = diffusers.UniPCMultistepScheduler()
    d.set_timesteps(1500)
    x = torch.randn(1, 2)
    for t in d.timesteps[:3]:
        x = d.step(torch.randn_like(x), t, x).prev_sample
    assert x.isnan().all()
    with pytest.raises(
        ValueError, match=r"`num_inference_steps`=1500 cannot be larger than `num_train_timesteps`=1000"
    ):
        fastdiff.UniPCMultistepScheduler().set_timesteps(1500)
    s = fastdiff.UniPCMultistepScheduler(use_flow_sigmas=True, prediction_type="flow_prediction")
    s.set_timesteps(1500)
    assert len(s.timesteps) == 1500 and s.sigmas.unique().numel() == 1501


def test_flow_match_euler_extras_for_generic_loops():
    d, f = diffusers.FlowMatchEulerDiscreteScheduler(), fastdiff.FlowMatchEulerDiscreteScheduler()
    for attr in ("init_noise_sigma", "scale_model_input", "add_noise"):
        assert not hasattr(d, attr) and hasattr(f, attr)
    f.set_timesteps(4)
    x, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert f.init_noise_sigma == 1.0 and f.scale_model_input(x, f.timesteps[0]) is x
    assert torch.equal(f.add_noise(x, noise, f.timesteps[:1]), f.scale_noise(x, f.timesteps[:1], noise))


def test_flow_match_euler_timestep_outside_the_schedule():
    d, f = diffusers.FlowMatchEulerDiscreteScheduler(), fastdiff.FlowMatchEulerDiscreteScheduler()
    for s in (d, f):
        s.set_timesteps(4)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(IndexError):
        d.step(x, torch.tensor(123.5), x)
    for error in (IndexError, ValueError):
        f.set_timesteps(4)
        with pytest.raises(error, match=r"`timestep`=123.5 is not in the schedule"):
            f.step(x, torch.tensor(123.5), x)


def test_flow_match_euler_set_timesteps_without_steps():
    with pytest.raises(TypeError):
        diffusers.FlowMatchEulerDiscreteScheduler().set_timesteps()
    d = diffusers.FlowMatchEulerDiscreteScheduler()
    d.set_timesteps(0)
    assert len(d.timesteps) == 0
    for kwargs in ({}, {"num_inference_steps": 0}):
        with pytest.raises(ValueError, match="`num_inference_steps`"):
            fastdiff.FlowMatchEulerDiscreteScheduler().set_timesteps(**kwargs)


def test_flow_match_euler_per_token_timesteps_run_the_reference_step():
    f = fastdiff.FlowMatchEulerDiscreteScheduler(backend="torch")
    f.set_timesteps(4)
    x = torch.randn(1, 6, 2)
    f.step(torch.randn_like(x), f.timesteps[0], x, per_token_timesteps=f.timesteps[0].expand(1, 6))
    assert f.last_backend == "reference"
    f.step(torch.randn_like(x), f.timesteps[1], x)
    assert f.last_backend == "torch"


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_dpm_flow_prediction_with_noise_prediction_solvers_is_refused():
    kw = dict(prediction_type="flow_prediction", algorithm_type="dpmsolver", final_sigmas_type="sigma_min")
    d = diffusers.DPMSolverMultistepScheduler(**kw)
    d.set_timesteps(4)
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError):
        d.step(x, d.timesteps[0], x)
    with pytest.raises(ValueError, match="`prediction_type`='flow_prediction' is not supported"):
        fastdiff.DPMSolverMultistepScheduler(**kw)


def test_dpm_mu_is_checked_and_kept_out_of_the_config():
    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
    with pytest.raises(AssertionError):
        diffusers.DPMSolverMultistepScheduler(**flow).set_timesteps(4, mu=0.5)
    with pytest.raises(ValueError, match=r"`mu`=0.5 needs use_dynamic_shifting=True"):
        fastdiff.DPMSolverMultistepScheduler(**flow).set_timesteps(4, mu=0.5)
    d = diffusers.DPMSolverMultistepScheduler(**flow, use_dynamic_shifting=True)
    f = fastdiff.DPMSolverMultistepScheduler(**flow, use_dynamic_shifting=True)
    for s in (d, f):
        s.set_timesteps(4, mu=0.5)
        s.set_timesteps(6)  # e^mu still applies
    assert torch.equal(f.sigmas, d.sigmas)
    assert d.config.flow_shift != d.config["flow_shift"] == 1.0  # diffusers: attribute and dict entry disagree
    assert f.config.flow_shift == f.config["flow_shift"] == 1.0


def test_dpm_custom_timesteps_with_flow_sigmas_are_refused():
    flow = dict(prediction_type="flow_prediction", use_flow_sigmas=True)
    with pytest.raises(TypeError):
        diffusers.DPMSolverMultistepScheduler(**flow).set_timesteps(timesteps=[900, 500, 100])
    with pytest.raises(ValueError, match="custom `timesteps` cannot be combined with use_flow_sigmas"):
        fastdiff.DPMSolverMultistepScheduler(**flow).set_timesteps(timesteps=[900, 500, 100])


def test_pndm_step_before_set_timesteps_asks_for_it():
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(TypeError):
        diffusers.PNDMScheduler().step(x, 1, x)
    with pytest.raises(ValueError, match="you need to run 'set_timesteps'"):
        fastdiff.PNDMScheduler().step(x, 1, x)


def test_pndm_warm_up_needs_four_intervals():
    with pytest.raises(ValueError, match="broadcast"):
        diffusers.PNDMScheduler().set_timesteps(3)
    with pytest.raises(ValueError, match=r"`num_inference_steps`=3 is too few for the Runge-Kutta warm-up"):
        fastdiff.PNDMScheduler().set_timesteps(3)


def test_pndm_kept_outputs_are_static_buffers():
    d, f = diffusers.PNDMScheduler(skip_prk_steps=True), fastdiff.PNDMScheduler(skip_prk_steps=True)
    for s in (d, f):
        s.set_timesteps(10)
    x, m = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    d.step(m, d.timesteps[0], x)
    f.step(m, f.timesteps[0], x)
    assert d.ets[0] is m and d.cur_sample is x
    assert f.ets[0] is not m and torch.equal(f.ets[0], m) and torch.equal(f.cur_sample, x)
    # the next loop over an equal schedule writes the same buffers; another schedule gets new ones
    kept, cur = f.ets[0], f.cur_sample
    f.set_timesteps(10)
    f.step(2 * m, f.timesteps[0], 2 * x)
    assert f.ets[0] is kept and f.cur_sample is cur and torch.equal(kept, 2 * m) and torch.equal(cur, 2 * x)
    f.set_timesteps(12)
    f.step(m, f.timesteps[0], x)
    assert f.ets[0] is not kept and torch.equal(kept, 2 * m)


def test_pndm_fourth_order_without_this_output_runs_the_reference_step():
    sample = torch.rand(2, 3, 4, 4)
    outs = []
    for s in (diffusers.PNDMScheduler(), fastdiff.PNDMScheduler(backend="torch")):
        s.set_timesteps(50)
        s.ets = [0.1 * sample + k for k in (0.2, 0.15, 0.1, 0.05)]
        s.step_prk(0.1 * sample, 0, sample)
        outs.append(s.step_plms(0.1 * sample, 0, sample).prev_sample)
    assert rel_err(outs[1], outs[0]) <= 1e-5
    assert s.last_backend == "reference"


@pytest.mark.parametrize("name", ["PNDMScheduler", "LCMScheduler"])
def test_non_integer_timesteps_are_refused(name):
    x = torch.randn(1, 2, 3, 3)
    for lib, error in ((diffusers, IndexError), (fastdiff, ValueError)):
        s = getattr(lib, name)()
        s.set_timesteps(5)
        with pytest.raises(error):
            s.step(x, 900.5, x)


def test_lcm_after_the_last_step_asks_for_set_timesteps():
    x = torch.randn(1, 2, 3, 3)
    d, f = diffusers.LCMScheduler(), fastdiff.LCMScheduler()
    for s in (d, f):
        s.set_timesteps(2)
        for t in s.timesteps:
            s.step(x, t, x)
    d.step(x, d.timesteps[-1], x)  # diffusers goes on
    with pytest.raises(ValueError, match="past the last of 2 inference steps; call set_timesteps again"):
        f.step(x, f.timesteps[-1], x)
    for lib, error in ((diffusers, IndexError), (fastdiff, ValueError)):
        s = lib.LCMScheduler()
        s.set_timesteps(2)
        with pytest.raises(error):
            s.step(x, 123, x)


def _dpm_diffusers_torch_reference(cfg: dict) -> list:
    """(name, scheduler) for diffusers' DPM-Solver and fastdiff's on the torch backend and the reference."""
    return [
        ("diffusers", diffusers.DPMSolverMultistepScheduler(**cfg)),
        ("torch", fastdiff.DPMSolverMultistepScheduler(**cfg, backend="torch")),
        ("reference", fastdiff.DPMSolverMultistepScheduler(**cfg, backend="reference")),
    ]


@pytest.mark.parametrize("order,solver_type", [(2, "heun"), (3, "midpoint"), (3, "heun")])
def test_dpm_zero_length_last_step_is_the_identity_on_fused_backends(order, solver_type):
    """Karras sigmas with final_sigmas_type="sigma_min" end on two equal sigmas: a step of length h = 0. diffusers
    divides 0 by 0 there (heun at order 2, both solver types at order 3) and returns NaN; fastdiff's fused
    backends return the sample unchanged (the h -> 0 limit, what diffusers' midpoint order-2 step returns), and
    its reference reproduces diffusers op by op (NaN)."""
    cfg = dict(
        use_karras_sigmas=True,
        solver_order=order,
        solver_type=solver_type,
        lower_order_final=False,
        final_sigmas_type="sigma_min",
    )
    x0 = torch.randn(1, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    outs = torch.randn(20, 1, 2, 3, 3, generator=torch.Generator().manual_seed(1))
    results = {}
    for name, s in _dpm_diffusers_torch_reference(cfg):
        s.set_timesteps(20)
        assert s.sigmas[-1] == s.sigmas[-2]  # the zero-length last step
        x = x0
        for i, t in enumerate(s.timesteps):
            before = x
            x = s.step(outs[i], t, x).prev_sample
        results[name] = (before, x)
    assert results["diffusers"][1].isnan().all() and results["reference"][1].isnan().all()
    before, last = results["torch"]
    assert torch.equal(last, before)


def test_nan_in_a_zero_coefficient_term_on_the_torch_backend():
    """The torch backend (the CPU default) skips a term whose coefficient is exactly 0 at this step, so a NaN
    there does not reach the result; 0 * NaN makes diffusers', the reference's and the kernels' results NaN.
    Here: DPM-Solver with flow sigmas and x0 prediction, the last step onto sigma = 0 reads only the x0."""
    cfg = dict(use_flow_sigmas=True, prediction_type="sample", solver_order=1)
    m = torch.ones(1, 1, 1, 3)
    nan = torch.full((1, 1, 1, 3), float("nan"))
    last = {}
    for name, s in _dpm_diffusers_torch_reference(cfg):
        s.set_timesteps(2)
        s.step(m, s.timesteps[0], torch.zeros(1, 1, 1, 3))
        last[name] = s.step(m, s.timesteps[1], nan).prev_sample
    assert last["diffusers"].isnan().all() and last["reference"].isnan().all()
    assert torch.equal(last["torch"], m)
