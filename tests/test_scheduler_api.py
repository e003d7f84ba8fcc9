"""The diffusers scheduler API surface, config round trips, backend selection and error messages."""

import logging

import pytest
import torch

import fastdiff

diffusers = pytest.importorskip("diffusers")

NAMES = ["DDPMScheduler", "DDIMScheduler"]
ALL_NAMES = NAMES + ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("name", ALL_NAMES)
def test_constructor_signature_matches_diffusers(name):
    import inspect

    ours = inspect.signature(getattr(fastdiff, name).__init__).parameters
    theirs = inspect.signature(getattr(diffusers, name).__init__).parameters
    for k, p in theirs.items():
        assert k in ours, f"{name} lacks argument {k}"
        assert ours[k].default == p.default or (p.default is None and ours[k].default is None), k
    assert list(ours)[: len(theirs)] == list(theirs), "same positional order as diffusers"


@pytest.mark.parametrize("name", ALL_NAMES)
def test_config_round_trips(tmp_path, name):
    d = getattr(diffusers, name)(beta_schedule="scaled_linear", prediction_type="v_prediction", steps_offset=1)
    f = getattr(fastdiff, name).from_config(d.config)
    assert f.config.beta_schedule == "scaled_linear" and f.config.steps_offset == 1
    f.save_pretrained(tmp_path)
    back = getattr(fastdiff, name).from_pretrained(tmp_path)
    # a reloaded config is the original without the `_use_default_values` bookkeeping (every key now explicit)
    assert "_use_default_values" in f.config and "_use_default_values" not in back.config
    assert dict(back.config) == {k: v for k, v in f.config.items() if k != "_use_default_values"}
    # diffusers reads what fastdiff wrote
    d2 = getattr(diffusers, name).from_pretrained(tmp_path)
    assert d2.config.prediction_type == "v_prediction"
    with pytest.raises(TypeError):
        f.config["beta_schedule"] = "linear"


@pytest.mark.parametrize("name", ALL_NAMES)
def test_copy_and_pickle(name):
    """GraphSampler gives each graph its own deepcopy of the scheduler; pipelines get pickled and copied."""
    import copy
    import pickle

    s = getattr(fastdiff, name)(beta_schedule="scaled_linear", steps_offset=1)
    s.set_timesteps(7)
    for other in (copy.deepcopy(s), pickle.loads(pickle.dumps(s))):
        assert type(other.config) is type(s.config) and dict(other.config) == dict(s.config)
        assert torch.equal(other.timesteps, s.timesteps)
        with pytest.raises(TypeError, match="frozen"):
            other.config["steps_offset"] = 0
        other.set_timesteps(3)
        assert len(s.timesteps) == 7, "the copy shares no state with the original"


def test_from_config_of_another_scheduler_carries_its_options():
    """As in diffusers: options of another scheduler are not init arguments but stay in the config (so a later
    switch back keeps them) and come back as unused kwargs; options left at their defaults are dropped."""
    ddpm = diffusers.DDPMScheduler(variance_type="fixed_large", clip_sample=False)
    ddim, unused = fastdiff.DDIMScheduler.from_config(ddpm.config, return_unused_kwargs=True, eta_unused=1)
    assert ddim.config.clip_sample is False
    assert ddim.config.variance_type == "fixed_large" and "variance_type" in unused and unused["eta_unused"] == 1
    assert "thresholding" in ddim.config["_use_default_values"], "DDPM's defaults do not count as set"
    back = fastdiff.DDPMScheduler.from_config(ddim.config)
    assert back.config.variance_type == "fixed_large" and back.config.clip_sample is False


@pytest.mark.parametrize("name", ALL_NAMES)
def test_api_attributes(name):
    f, d = getattr(fastdiff, name)(), getattr(diffusers, name)()
    assert f.order == d.order and float(f.init_noise_sigma) == float(d.init_noise_sigma) and len(f) == len(d)
    f.set_timesteps(25, device="cpu")
    d.set_timesteps(25, device="cpu")
    assert torch.equal(f.timesteps, d.timesteps) and f.timesteps.dtype == d.timesteps.dtype
    x = torch.randn(1, 2, 3, 3)
    torch.testing.assert_close(f.scale_model_input(x, f.timesteps[3]), d.scale_model_input(x, d.timesteps[3]))
    out = f.step(torch.randn_like(x), f.timesteps[3], x, return_dict=False)
    assert isinstance(out, tuple) and len(out) == (1 if name == "DPMSolverMultistepScheduler" else 2)
    res = f.step(torch.randn_like(x), f.timesteps[3], x)
    assert res[0] is res.prev_sample


@pytest.mark.parametrize("name", NAMES)
def test_timestep_forms(name):
    f = getattr(fastdiff, name)(backend="reference")
    f.set_timesteps(10)
    x, m = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = int(f.timesteps[4])
    ref = f.step(m, f.timesteps[4], x, noise_seed=1).prev_sample
    for form in (t, float(t), torch.tensor(t), torch.tensor([t]), f.timesteps.clone()[4]):
        torch.testing.assert_close(f.step(m, form, x, noise_seed=1).prev_sample, ref, rtol=0, atol=0)


def test_previous_timestep_matches_diffusers():
    for spacing in ("leading", "trailing", "linspace"):
        d = diffusers.DDPMScheduler(timestep_spacing=spacing)
        f = fastdiff.DDPMScheduler(timestep_spacing=spacing)
        d.set_timesteps(13)
        f.set_timesteps(13)
        for t in d.timesteps:
            assert int(f.previous_timestep(t)) == int(d.previous_timestep(t))


def test_backend_is_visible(caplog, monkeypatch):
    f = fastdiff.DDIMScheduler(backend="reference")
    f.set_timesteps(5)
    x = torch.randn(1, 1, 2, 2)
    with caplog.at_level(logging.DEBUG, logger="fastdiff"):
        fastdiff.ops._select.cache_clear()
        f.step(x, f.timesteps[0], x)
    assert f.last_backend == "reference"
    assert any("-> reference" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("FASTDIFF_BACKEND", "reference")
    g = fastdiff.DDIMScheduler()
    g.set_timesteps(5)
    g.step(x, g.timesteps[0], x)
    assert g.last_backend == "reference"


def test_backend_errors(monkeypatch):
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="`backend`.*'gpu'"):
        f = fastdiff.DDIMScheduler(backend="gpu")
        f.set_timesteps(5)
        f.step(x, f.timesteps[0], x)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    f = fastdiff.DDIMScheduler(backend="triton")
    f.set_timesteps(5)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        f.step(x, f.timesteps[0], x)
    f = fastdiff.DDIMScheduler(backend="cuda")
    f.set_timesteps(5)
    with pytest.raises(RuntimeError, match="CUDA"):
        f.step(x, f.timesteps[0], x)
    monkeypatch.setenv("FASTDIFF_BACKEND", "fast")
    f = fastdiff.DDIMScheduler()
    f.set_timesteps(5)
    with pytest.raises(ValueError, match="FASTDIFF_BACKEND"):
        f.step(x, f.timesteps[0], x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(beta_schedule="cosine"), "`beta_schedule`.*'cosine'"),
        (dict(prediction_type="eps"), "`prediction_type`.*'eps'"),
        (dict(timestep_spacing="uniform"), "`timestep_spacing`.*'uniform'"),
        (dict(trained_betas=[0.1, 0.2]), "`trained_betas`.*length"),
        (dict(num_train_timesteps=0), "`num_train_timesteps`"),
    ],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_config_values(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        getattr(fastdiff, name)(**kwargs)


def test_bad_variance_type():
    with pytest.raises(ValueError, match="`variance_type`.*'fixed'"):
        fastdiff.DDPMScheduler(variance_type="fixed")


@pytest.mark.parametrize("name", NAMES)
def test_bad_step_inputs(name):
    f = getattr(fastdiff, name)(backend="reference")
    with pytest.raises(ValueError, match="`num_inference_steps`=1001"):
        f.set_timesteps(1001)
    with pytest.raises(ValueError, match="`num_inference_steps` must be >= 1"):
        f.set_timesteps(0)
    with pytest.raises(ValueError, match="descending"):
        f.set_timesteps(timesteps=[10, 20])
    f.set_timesteps(10)
    x = torch.randn(2, 3, 4, 4)
    if name == "DDIMScheduler":  # like diffusers, DDIM steps from any integer timestep to t - T // n
        with pytest.raises(ValueError, match=r"`timestep`=1000 must be an integer in \[0, num_train_timesteps"):
            f.step(x, 1000, x)
    else:
        with pytest.raises(ValueError, match=r"`timestep`=5 is not in the schedule"):
            f.step(x, 5, x)
    with pytest.raises(ValueError, match=r"`model_output` has shape \(2, 3, 4, 5\)"):
        f.step(torch.randn(2, 3, 4, 5), f.timesteps[0], x)
    with pytest.raises(TypeError, match="`sample` must be a floating-point tensor"):
        f.step(x, f.timesteps[0], torch.ones(2, 3, 4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="`model_output` is on meta"):
        f.step(torch.randn(2, 3, 4, 4, device="meta"), f.timesteps[0], x)
    with pytest.raises(ValueError, match="odd batch"):
        f.step(torch.randn(3, 3, 4, 4), f.timesteps[0], x, guidance_scale=2.0)
    with pytest.raises(ValueError, match="`timestep` must be a scalar"):
        f.step(x, f.timesteps[:2], x)
    with pytest.raises(ValueError, match="`noise_seed` must give one seed per sample"):
        f.step(x, f.timesteps[0], x, noise_seed=[1, 2, 3], **({"eta": 1.0} if name == "DDIMScheduler" else {}))


def test_ddim_step_before_set_timesteps():
    f = fastdiff.DDIMScheduler()
    x = torch.randn(1, 1, 2, 2)
    with pytest.raises(ValueError, match="set_timesteps"):
        f.step(x, 999, x)


def test_add_noise_errors():
    f = fastdiff.DDPMScheduler(backend="reference")
    x = torch.randn(3, 2, 4)
    with pytest.raises(ValueError, match=r"`timesteps` must lie in \[0, 1000\)"):
        f.add_noise(x, torch.randn_like(x), torch.tensor([0, 1000, 5]))
    with pytest.raises(ValueError, match="`timesteps` must have 1 or batch=3 entries"):
        f.add_noise(x, torch.randn_like(x), torch.tensor([1, 2]))
    with pytest.raises(TypeError, match="`timesteps` must be an integer tensor"):
        f.add_noise(x, torch.randn_like(x), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="`noise` has shape"):
        f.add_noise(x, torch.randn(3, 2, 5), torch.tensor([1]))
    with pytest.raises(ValueError, match="`noise` is required"):
        f.add_noise(x, None, torch.tensor([1]))


def test_ddpm_learned_variance_needs_doubled_channels():
    f = fastdiff.DDPMScheduler(variance_type="learned_range")
    f.set_timesteps(4)
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match=r"expected \(1, 6, 4, 4\)"):
        f.step(torch.randn(1, 3, 4, 4), f.timesteps[0], x)


def test_last_backend_names_the_kernel_that_ran(monkeypatch):
    """With backend "cuda", dtype mixes the extension does not cover run (and are reported) as Triton."""
    from fastdiff import _backend, ops

    monkeypatch.setattr(_backend, "cuda_ext_unavailable", lambda device: None)
    monkeypatch.setattr(_backend, "triton_unavailable", lambda device: None)
    monkeypatch.setattr(ops, "fused_step", lambda p, backend: None)
    monkeypatch.setattr(ops, "add_noise", lambda *args, **kwargs: None)
    ops._select.cache_clear()
    try:
        x16 = torch.zeros(1, 2, dtype=torch.float16)
        euler = fastdiff.EulerDiscreteScheduler(backend="cuda")
        euler.set_timesteps(4)
        euler.step(x16, euler.timesteps[0], x16)  # Euler's fp16 prev with a float32 x0
        assert euler.last_backend == "triton"
        ddim = fastdiff.DDIMScheduler(backend="cuda")
        ddim.set_timesteps(4)
        ddim.step(x16, ddim.timesteps[0], x16)
        assert ddim.last_backend == "cuda"
        ddim.step(x16.float(), ddim.timesteps[1], x16)  # a float32 model output for an fp16 sample
        assert ddim.last_backend == "triton"
        ddim.add_noise(x16, x16.float(), torch.tensor([3]))
        assert ddim.last_backend == "triton"
        ddim.add_noise(x16, x16, torch.tensor([3]))
        assert ddim.last_backend == "cuda"
    finally:
        ops._select.cache_clear()
