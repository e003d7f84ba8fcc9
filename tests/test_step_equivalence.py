"""DDPM and DDIM steps: fastdiff (reference and fast backends) against diffusers, step by step."""

import itertools

import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_fp32, assert_lowp, assert_rel

import fastdiff

diffusers = pytest.importorskip("diffusers")

RTOL32 = 1e-5
BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]
SHAPES = [(2, 3, 7, 9), (1, 4, 5, 11), (3, 2, 37)]

CLIP_MODES = {
    "none": dict(clip_sample=False),
    "clip": dict(clip_sample=True),
    "clip_range": dict(clip_sample=True, clip_sample_range=1.7),
    "threshold": dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.4),
}


def _pair(name, config, backend):
    d = getattr(diffusers, name)(**config)
    f = getattr(fastdiff, name)(**config, backend=backend)
    return d, f


def _model_output(shape, variance_type, device, dtype=torch.float32):
    eps = torch.randn(shape, device=device, dtype=dtype)
    if variance_type == "learned":  # a predicted variance: positive
        return torch.cat([eps, torch.rand(shape, device=device, dtype=dtype) * 0.05 + 1e-4], dim=1)
    if variance_type == "learned_range":  # an interpolation weight in [-1, 1]
        return torch.cat([eps, torch.rand(shape, device=device, dtype=dtype) * 2 - 1], dim=1)
    return eps


def _run_both(
    d, f, shape, device, steps, step_kwargs=None, variance_type="fixed_small", dtype=torch.float32, sample_scale=1.0
):
    """Run both schedulers over their timesteps on fresh random inputs; yield (t, fast, diffusers, truth_fn)
    where truth_fn() gives diffusers' own step in float64 on the same inputs and noise."""
    step_kwargs = step_kwargs or {}
    d.set_timesteps(steps)
    f.set_timesteps(steps)
    assert f.timesteps.tolist() == d.timesteps.tolist()
    for t_d, t_f in zip(d.timesteps, f.timesteps):
        x = torch.randn(shape, device=device, dtype=dtype) * sample_scale
        m = _model_output(shape, variance_type, device, dtype)
        seed = int(t_d)
        out_d = d.step(m, t_d, x, generator=torch.Generator(device).manual_seed(seed), **step_kwargs)
        out_f = f.step(m, t_f, x, generator=torch.Generator(device).manual_seed(seed), **step_kwargs)

        def truth(t=int(t_d), x=x, m=m, seed=seed):
            # the same draws as the fp32 step (a float64 draw would give other numbers)
            noise = torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)
            return _reference_f64(f, t, m, x, noise, step_kwargs)

        yield int(t_d), out_f, out_d, truth


def _reference_f64(f, t, m, x, noise, step_kwargs):
    """The reference step with every scalar and tensor in float64 (only the float32 schedule itself is
    kept): the ground truth both fp32 implementations approximate."""
    cfg = f.config
    common = dict(
        alphas_cumprod=f.alphas_cumprod.double(),
        prev_t=int(f.previous_timestep(t)),
        prediction_type=cfg.prediction_type,
        clip_sample=cfg.clip_sample,
        clip_sample_range=cfg.clip_sample_range,
        thresholding=cfg.thresholding,
        dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
        sample_max_value=cfg.sample_max_value,
        noise=noise.double(),
    )
    if isinstance(f, fastdiff.DDIMScheduler):
        prev, x0 = fastdiff.reference.ddim_step(
            m.double(),
            t,
            x.double(),
            final_alpha_cumprod=f.final_alpha_cumprod.double(),
            eta=step_kwargs.get("eta", 0.0),
            use_clipped_model_output=step_kwargs.get("use_clipped_model_output", False),
            **common,
        )
    else:
        prev, x0 = fastdiff.reference.ddpm_step(m.double(), t, x.double(), variance_type=cfg.variance_type, **common)
    return fastdiff.SchedulerOutput(prev, x0)


def _check(out_f, out_d, truth, what):
    assert_fp32(out_f.prev_sample, out_d.prev_sample, lambda: truth().prev_sample, RTOL32, f"prev_sample {what}")
    assert_fp32(
        out_f.pred_original_sample,
        out_d.pred_original_sample,
        lambda: truth().pred_original_sample,
        RTOL32,
        f"pred_original_sample {what}",
    )


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize(
    "variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
)
@pytest.mark.parametrize("clip_mode", list(CLIP_MODES))
def test_ddpm_matches_diffusers(device, backend, prediction_type, variance_type, clip_mode):
    config = dict(prediction_type=prediction_type, variance_type=variance_type, **CLIP_MODES[clip_mode])
    # diffusers 0.42 takes sqrt(log(beta_t)) for fixed_large_log and returns NaN (see test below); the
    # variance that name stands for is beta_t, i.e. fixed_large's
    d_config = dict(config, variance_type="fixed_large") if variance_type == "fixed_large_log" else config
    d = diffusers.DDPMScheduler(**d_config)
    f = fastdiff.DDPMScheduler(**config, backend=backend)
    shape = SHAPES[hash((prediction_type, variance_type, clip_mode)) % len(SHAPES)]
    for t, out_f, out_d, truth in _run_both(d, f, shape, device, 6, variance_type=variance_type, sample_scale=1.5):
        _check(out_f, out_d, truth, f"t={t}")
        assert f.last_backend == backend


def test_diffusers_fixed_large_log_is_nan():
    """Documents why fastdiff departs from diffusers for variance_type='fixed_large_log': diffusers 0.42
    adds sqrt(log(beta_t)) * noise, NaN for every t > 0. If diffusers fixes it, this test tells us."""
    d = diffusers.DDPMScheduler(variance_type="fixed_large_log")
    d.set_timesteps(4)
    x = torch.randn(1, 2, 4, 4)
    out = d.step(torch.randn_like(x), d.timesteps[0], x, generator=torch.Generator().manual_seed(0))
    assert torch.isnan(out.prev_sample).all()
    f = fastdiff.DDPMScheduler(variance_type="fixed_large_log", backend="reference")
    f.set_timesteps(4)
    assert torch.isfinite(f.step(torch.randn_like(x), f.timesteps[0], x).prev_sample).all()


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("prediction_type", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("clip_mode", list(CLIP_MODES))
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("use_clipped,set_alpha_to_one", [(False, True), (True, True), (False, False), (True, False)])
def test_ddim_matches_diffusers(device, backend, prediction_type, clip_mode, eta, use_clipped, set_alpha_to_one):
    config = dict(prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, **CLIP_MODES[clip_mode])
    d, f = _pair("DDIMScheduler", config, backend)
    shape = SHAPES[hash((prediction_type, clip_mode, eta)) % len(SHAPES)]
    kwargs = dict(eta=eta, use_clipped_model_output=use_clipped)
    for t, out_f, out_d, truth in _run_both(d, f, shape, device, 5, kwargs, sample_scale=1.5):
        _check(out_f, out_d, truth, f"t={t}")


SCHEDULE_KNOBS = list(
    itertools.product(
        ["linear", "scaled_linear", "squaredcos_cap_v2", "trained"],
        ["leading", "trailing", "linspace"],
        [0, 1],
        [False, True],
    )
)


def _schedule_config(beta_schedule, spacing, offset, rescale):
    config = dict(timestep_spacing=spacing, steps_offset=offset, rescale_betas_zero_snr=rescale)
    if beta_schedule == "trained":
        config["trained_betas"] = torch.linspace(2e-4, 0.03, 1000).pow(1.1).tolist()
    else:
        config["beta_schedule"] = beta_schedule
        if beta_schedule == "scaled_linear":
            config.update(beta_start=0.00085, beta_end=0.012)
    if rescale:  # zero terminal SNR is meant for v-prediction (x0 from epsilon is undefined at abar = 0)
        config["prediction_type"] = "v_prediction"
    return config


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("beta_schedule,spacing,offset,rescale", SCHEDULE_KNOBS)
def test_schedule_knobs_match_diffusers(device, backend, name, beta_schedule, spacing, offset, rescale):
    config = _schedule_config(beta_schedule, spacing, offset, rescale)
    d, f = _pair(name, config, backend)
    torch.testing.assert_close(f.alphas_cumprod, d.alphas_cumprod, rtol=0, atol=0)
    # with zero terminal SNR and eta=1, diffusers' float32 sqrt(1 - abar_prev - std^2) at t=T-1 is sqrt of a
    # rounding-negative number (NaN); fastdiff's float64 table gives 0. eta=0.8 keeps the comparison meaningful.
    kwargs = dict(eta=0.8 if rescale else 1.0) if name == "DDIMScheduler" else {}
    for t, out_f, out_d, truth in _run_both(d, f, (2, 3, 6, 5), device, 7, kwargs):
        _check(out_f, out_d, truth, f"{name} t={t}")


def test_sigmoid_betas_match_diffusers_ddpm():
    d = diffusers.DDPMScheduler(beta_schedule="sigmoid")
    for name in ("DDPMScheduler", "DDIMScheduler"):
        f = getattr(fastdiff, name)(beta_schedule="sigmoid")
        torch.testing.assert_close(f.betas, d.betas, rtol=0, atol=0)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_ddpm_custom_timesteps_match_diffusers(device, backend):
    d, f = _pair("DDPMScheduler", {}, backend)
    custom = [900, 777, 500, 123, 10, 1, 0]
    d.set_timesteps(timesteps=custom)
    f.set_timesteps(timesteps=custom)
    for t_d, t_f in zip(d.timesteps, f.timesteps):
        assert int(f.previous_timestep(t_f)) == int(d.previous_timestep(t_d))
        x, m = torch.randn(2, 3, 5, 5, device=device), torch.randn(2, 3, 5, 5, device=device)
        out_d = d.step(m, t_d, x, generator=torch.Generator(device).manual_seed(3))
        out_f = f.step(m, t_f, x, generator=torch.Generator(device).manual_seed(3))
        noise = torch.randn(x.shape, generator=torch.Generator(device).manual_seed(3), device=device)
        _check(out_f, out_d, lambda t=int(t_d), x=x, m=m, n=noise: _reference_f64(f, t, m, x, n, {}), f"t={int(t_d)}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_ddim_custom_timesteps_follow_the_list(device, backend):
    """diffusers' DDIM has no custom timesteps; fastdiff's steps to the next listed timestep, checked
    against the reference step with the same prev_t."""
    f = fastdiff.DDIMScheduler(backend=backend)
    custom = [950, 700, 420, 100, 3]
    f.set_timesteps(timesteps=custom)
    x, m = torch.randn(2, 3, 4, 6, device=device), torch.randn(2, 3, 4, 6, device=device)
    for i, t in enumerate(f.timesteps):
        prev_t = custom[i + 1] if i + 1 < len(custom) else -1
        assert int(f.previous_timestep(t)) == prev_t
        out = f.step(m, t, x, eta=0.3, variance_noise=torch.ones_like(x) * 0.5)
        exp = fastdiff.reference.ddim_step(
            m,
            custom[i],
            x,
            alphas_cumprod=f.alphas_cumprod,
            final_alpha_cumprod=f.final_alpha_cumprod,
            prev_t=prev_t,
            eta=0.3,
            noise=torch.ones_like(x) * 0.5,
        )
        assert_rel(out.prev_sample, exp[0], RTOL32, f"t={custom[i]}")


# ------------------------------------------------------------------ low precision


LOWP_CASES = [
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", dict(prediction_type="v_prediction", variance_type="fixed_large"), {}),
    ("DDPMScheduler", dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.3), {}),
    ("DDPMScheduler", dict(variance_type="learned_range", clip_sample=False), {}),
    ("DDIMScheduler", {}, dict(eta=0.0)),
    ("DDIMScheduler", dict(prediction_type="v_prediction", clip_sample=False), dict(eta=1.0)),
    ("DDIMScheduler", dict(prediction_type="sample"), dict(eta=0.5, use_clipped_model_output=True)),
]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,config,kwargs", LOWP_CASES)
def test_low_precision_within_twice_plain_pytorch_error(device, backend, dtype, name, config, kwargs):
    d32, f = _pair(name, config, backend)
    d_lo = getattr(diffusers, name)(**config)
    for s in (d32, f, d_lo):
        s.set_timesteps(6)
    vt = config.get("variance_type", "fixed_small")
    for t in d32.timesteps.tolist():
        x32 = torch.randn(2, 3, 9, 7, device=device) * 1.5
        m32 = _model_output((2, 3, 9, 7), vt, device)
        noise32 = torch.randn_like(x32)
        x, m, noise = x32.to(dtype), m32.to(dtype), noise32.to(dtype)
        x32, m32, noise32 = x.float(), m.float(), noise.float()  # same inputs, exactly representable

        def run(s, xx, mm, nn):
            # feed the noise through the generator path: regenerate the same draw as a tensor seed
            kw = dict(kwargs)
            if name == "DDIMScheduler":
                if kw.get("eta", 0) > 0:
                    kw["variance_noise"] = nn
                return s.step(mm, t, xx, **kw)
            torch.manual_seed(7)
            return s.step(mm, t, xx, **kw)

        ref = run(d32, x32, m32, noise32)
        plain = run(d_lo, x, m, noise)
        fast = run(f, x, m, noise)
        assert fast.prev_sample.dtype == dtype
        assert_lowp(fast.prev_sample, plain.prev_sample, ref.prev_sample, f"{name} prev_sample t={t}")
        assert_lowp(fast.pred_original_sample, plain.pred_original_sample, ref.pred_original_sample, f"{name} x0 t={t}")


# ------------------------------------------------------------------ layouts and guidance


def _strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in a non-contiguous layout."""
    if kind == "sliced":  # padded rows: samples not contiguous inside
        big = torch.randn(t.shape[:-1] + (t.shape[-1] + 3,), device=t.device, dtype=t.dtype)
        big[..., 1:-2] = t
        return big[..., 1:-2]
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if kind == "batch_strided":  # every other sample of a larger batch
        big = torch.randn((t.shape[0] * 2,) + t.shape[1:], device=t.device, dtype=t.dtype)
        big[::2] = t
        return big[::2]
    raise ValueError(kind)


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("kind", ["sliced", "channels_last", "batch_strided"])
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
def test_non_contiguous_inputs(device, backend, kind, name):
    d, f = _pair(name, dict(clip_sample=False), backend)
    d.set_timesteps(5)
    f.set_timesteps(5)
    kwargs = dict(eta=0.7) if name == "DDIMScheduler" else {}
    for t in d.timesteps:
        x = torch.randn(3, 4, 6, 5, device=device)
        m = torch.randn_like(x)
        xs, ms = _strided(x, kind), _strided(m, "sliced" if kind != "sliced" else "batch_strided")
        assert not xs.is_contiguous() and not ms.is_contiguous()
        out_d = d.step(m, t, x, generator=torch.Generator(device).manual_seed(5), **kwargs)
        out_f = f.step(ms, t, xs, generator=torch.Generator(device).manual_seed(5), **kwargs)
        assert_rel(out_f.prev_sample, out_d.prev_sample, RTOL32, f"{kind} prev t={int(t)}")
        assert_rel(out_f.pred_original_sample, out_d.pred_original_sample, RTOL32, f"{kind} x0 t={int(t)}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
def test_guidance_fused_matches_diffusers_combine(device, backend, name, guidance_rescale):
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    d, f = _pair(name, dict(thresholding=name == "DDPMScheduler", sample_max_value=1.5), backend)
    d.set_timesteps(4)
    f.set_timesteps(4)
    kwargs = dict(eta=1.0) if name == "DDIMScheduler" else {}
    for t in d.timesteps:
        x = torch.randn(2, 3, 5, 7, device=device)
        doubled = torch.randn(4, 3, 5, 7, device=device)
        uncond, cond = doubled.chunk(2)
        guided = uncond + 6.5 * (cond - uncond)
        if guidance_rescale:
            guided = rescale_noise_cfg(guided, cond, guidance_rescale=guidance_rescale)
        out_d = d.step(guided, t, x, generator=torch.Generator(device).manual_seed(2), **kwargs)
        out_f = f.step(
            doubled,
            t,
            x,
            generator=torch.Generator(device).manual_seed(2),
            guidance_scale=6.5,
            guidance_rescale=guidance_rescale,
            **kwargs,
        )
        assert_rel(out_f.prev_sample, out_d.prev_sample, RTOL32, f"guided prev t={int(t)}")


# ------------------------------------------------------------------ add_noise and get_velocity


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", ["DDPMScheduler", "DDIMScheduler"])
@pytest.mark.parametrize("per_sample", [True, False])
@pytest.mark.parametrize("layout", ["contiguous", "sliced"])
def test_add_noise_matches_diffusers(device, backend, name, per_sample, layout):
    d, f = _pair(name, dict(beta_schedule="squaredcos_cap_v2"), backend)
    x = torch.randn(5, 3, 7, 6, device=device)
    noise = torch.randn_like(x)
    ts = torch.randint(0, 1000, (5,) if per_sample else (1,), device=device)
    xs = _strided(x, "sliced") if layout == "sliced" else x
    assert_rel(f.add_noise(xs, noise, ts), d.add_noise(x, noise, ts), RTOL32, "add_noise")
    assert_rel(f.get_velocity(x, noise, ts), d.get_velocity(x, noise, ts), RTOL32, "get_velocity")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_noise_low_precision(device, backend, dtype):
    d, f = _pair("DDPMScheduler", {}, backend)
    x = torch.randn(4, 3, 8, 8, device=device).to(dtype)
    noise = torch.randn_like(x)
    ts = torch.randint(0, 1000, (4,), device=device)
    ref = d.add_noise(x.float(), noise.float(), ts)
    assert_lowp(f.add_noise(x, noise, ts), d.add_noise(x, noise, ts), ref, "add_noise")
