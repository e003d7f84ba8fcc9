"""LCMScheduler against diffusers, step by step on every backend: every config knob and ``set_timesteps`` option
(original_inference_steps, custom timesteps, strength), ``prev_sample`` and ``denoised``, noise from a generator as
diffusers draws it or Philox, step-index rules, low precision, layouts, guidance and errors."""

import inspect

import numpy as np
import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_fp32, assert_lowp, assert_rel

import fastdiff

diffusers = pytest.importorskip("diffusers")

RTOL32 = 1e-5
BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]
FAST_CASES = [(d, b) for d in DEVICES for b in available_backends(d)]
SHAPES = [(2, 3, 5, 7), (1, 4, 9), (3, 2, 37)]

# (config, set_timesteps kwargs)
WALKS = [
    ({}, dict(num_inference_steps=4)),
    (
        dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, beta_schedule="linear"),
        dict(num_inference_steps=4),
    ),
    (dict(prediction_type="sample", clip_sample=True), dict(num_inference_steps=4)),
    (dict(clip_sample=True, clip_sample_range=1.5), dict(num_inference_steps=6)),
    (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.4), dict(num_inference_steps=4)),
    (dict(thresholding=True, prediction_type="v_prediction", sample_max_value=2.0), dict(num_inference_steps=3)),
    (dict(original_inference_steps=20, timestep_scaling=5.0, set_alpha_to_one=False), dict(num_inference_steps=5)),
    (dict(beta_schedule="squaredcos_cap_v2", clip_sample=True), dict(num_inference_steps=8)),
    (
        dict(num_train_timesteps=500, trained_betas=np.linspace(1e-4, 0.03, 500).tolist(), beta_schedule="linear"),
        dict(num_inference_steps=4),
    ),
    ({}, dict(num_inference_steps=4, original_inference_steps=30)),
    ({}, dict(timesteps=[999, 759, 499, 259])),
    (dict(clip_sample=True), dict(timesteps=[999, 759, 499, 259, 19], strength=0.6)),
    ({}, dict(num_inference_steps=4, strength=0.5)),
    ({}, dict(num_inference_steps=1)),
    (dict(timestep_spacing="trailing", steps_offset=2), dict(num_inference_steps=4)),  # no effect in diffusers
]


def _truth(f, t, prev_t, m, x, noise):
    """The reference step with float64 tensors (float32 schedule scalars, as both fp32 paths have them)."""
    cfg = f.config
    return fastdiff.reference.lcm_step(
        m.double(),
        t,
        x.double(),
        alphas_cumprod=f.alphas_cumprod,
        final_alpha_cumprod=f.final_alpha_cumprod,
        prev_t=prev_t,
        timestep_scaling=cfg.timestep_scaling,
        prediction_type=cfg.prediction_type,
        clip_sample=cfg.clip_sample,
        clip_sample_range=cfg.clip_sample_range,
        thresholding=cfg.thresholding,
        dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
        sample_max_value=cfg.sample_max_value,
        noise=None if noise is None else noise.double(),
    )


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("k", range(len(WALKS)), ids=lambda k: f"walk{k}")
def test_walk_matches_diffusers(device, backend, k):
    """A whole loop with noise from per-step generators: prev_sample and denoised within 1e-5 of diffusers' (or as
    close to the float64 truth), the reference bit for bit."""
    config, set_kwargs = WALKS[k]
    shape = SHAPES[k % len(SHAPES)]
    f = fastdiff.LCMScheduler(**config, backend=backend)
    d = diffusers.LCMScheduler(**config)
    for s in (f, d):
        s.set_timesteps(device=device, **set_kwargs)
    assert f.timesteps.tolist() == d.timesteps.tolist() and f.num_inference_steps == d.num_inference_steps
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(shape, generator=gen).to(device)
    for i, (t_f, t_d) in enumerate(zip(f.timesteps, d.timesteps)):
        m = torch.randn(shape, generator=gen).to(device)
        out_f = f.step(m, t_f, x, generator=torch.Generator(device).manual_seed(100 + i))
        out_d = d.step(m, t_d, x, generator=torch.Generator(device).manual_seed(100 + i))
        noisy = i != d.num_inference_steps - 1
        noise = torch.randn(shape, generator=torch.Generator(device).manual_seed(100 + i), device=device)
        prev_t = int(d.timesteps[i + 1]) if i + 1 < len(d.timesteps) else int(t_d)
        truth = _truth(f, t_d, prev_t, m, x, noise if noisy else None)
        what = f"{config} {set_kwargs} [{backend}] step {i} (t={int(t_d)})"
        for j, name in enumerate(("prev_sample", "denoised")):
            a, b = out_f[name], out_d[name]
            if backend == "reference":
                assert torch.equal(a, b), f"{what}: {name}: the reference is not diffusers' op order"
            assert_fp32(a, b, lambda j=j: truth[j], RTOL32, f"{what}: {name}")
        assert f.last_backend == backend and f.step_index == d.step_index
        x = out_d.prev_sample


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("config", [{}, dict(clip_sample=True)], ids=["folded", "corrector"])
def test_philox_noise_is_the_same_on_every_backend(device, backend, config):
    """noise_seed: the kernels' in-place Philox draws, reproduced by the reference; per-sample seeds."""
    outs = {}
    for b in ("reference", backend):
        s = fastdiff.LCMScheduler(**config, backend=b)
        s.set_timesteps(4, device=device)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(2, 3, 6, 5, generator=gen).to(device)
        for t in s.timesteps:
            x = s.step(torch.randn(x.shape, generator=gen).to(device), t, x, noise_seed=[5, 6]).prev_sample
        outs[b] = x
    assert_rel(outs[backend], outs["reference"], RTOL32, f"Philox walk [{backend}]")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_inference_steps=n, original_inference_steps=o, strength=st)
        for n in (1, 2, 4, 8, 26, 50, 51)
        for o in (None, 10, 100, 1001)
        for st in (1.0, 0.5, 0.25)
    ]
    + [
        dict(timesteps=[100, 87, 50, 1, 0]),
        dict(timesteps=[999, 759, 499, 259, 19], strength=0.5),
        dict(timesteps=np.array([899, 500, 101])),
        dict(timesteps=[100, 87, 50, 51, 0]),
        dict(timesteps=[1000]),
        dict(timesteps=[999, 2], num_inference_steps=2),
        dict(),
    ],
)
def test_set_timesteps_matches_diffusers(kwargs):
    """The same timesteps and num_inference_steps, or a ValueError where diffusers raises one."""
    f, d = fastdiff.LCMScheduler(), diffusers.LCMScheduler()
    try:
        d.set_timesteps(**kwargs)
    except ValueError:
        with pytest.raises(ValueError):
            f.set_timesteps(**kwargs)
        return
    f.set_timesteps(**kwargs)
    assert f.timesteps.dtype == d.timesteps.dtype == torch.int64
    assert f.timesteps.tolist() == d.timesteps.tolist()
    assert (f.num_inference_steps, f.custom_timesteps) == (d.num_inference_steps, d.custom_timesteps)
    for t in d.timesteps:
        assert int(f.previous_timestep(t)) == int(d.previous_timestep(t))


def test_custom_timesteps_warn_like_diffusers(caplog):
    s = fastdiff.LCMScheduler()
    with caplog.at_level("WARNING", logger="fastdiff.schedulers.lcm"):
        s.set_timesteps(timesteps=[900, 87, 50])
    text = caplog.text
    assert "first timestep on the custom timestep schedule is 900" in text and "[87, 50]" in text


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_step_index_rules_match_diffusers(device, backend):
    """A loop that starts mid-schedule (by value, and with set_begin_index), and a step taken at a timestep other
    than its index's (diffusers computes with the given one)."""
    for start in ("value", "begin_index", "other_timestep"):
        f, d = fastdiff.LCMScheduler(backend=backend), diffusers.LCMScheduler()
        for s in (f, d):
            s.set_timesteps(6, device=device)
            if start != "value":
                s.set_begin_index(2)
        x = torch.randn(2, 3, 4, 4, device=device)
        ts = d.timesteps[2:] if start != "other_timestep" else d.timesteps[3:]
        for i, t in enumerate(ts):
            m = torch.randn_like(x)
            out_f = f.step(m, t, x, generator=torch.Generator(device).manual_seed(i))
            out_d = d.step(m, t, x, generator=torch.Generator(device).manual_seed(i))
            assert f.step_index == d.step_index
            assert_rel(out_f.prev_sample, out_d.prev_sample, RTOL32, f"{start} [{backend}] step {i}")
            assert_rel(out_f.denoised, out_d.denoised, RTOL32, f"{start} [{backend}] denoised {i}")
            x = out_d.prev_sample


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_one_step_draws_no_noise_and_returns_denoised(device, backend):
    s = fastdiff.LCMScheduler(backend=backend)
    s.set_timesteps(1, device=device)
    x, gen = torch.randn(2, 4, 3, 3, device=device), torch.Generator(device).manual_seed(0)
    state = gen.get_state()
    prev, denoised = s.step(torch.randn_like(x), s.timesteps[0], x, generator=gen, return_dict=False)
    assert torch.equal(gen.get_state(), state)
    assert torch.equal(prev, denoised)


# ------------------------------------------------------------------ precision, layouts, guidance


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "config",
    [dict(prediction_type="v_prediction"), dict(clip_sample=True), dict(thresholding=True, sample_max_value=1.5)],
    ids=["v", "clip", "threshold"],
)
def test_low_precision_within_twice_plain_pytorch(device, backend, dtype, config):
    """fp16/bf16 against the float32 reference from the same (rounded) inputs and Philox noise: within twice the
    error of the reference run in the same low precision."""
    fast = fastdiff.LCMScheduler(**config, backend=backend)
    plain, ref32 = (fastdiff.LCMScheduler(**config, backend="reference") for _ in range(2))
    for s in (fast, plain, ref32):
        s.set_timesteps(4, device=device)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(2, 3, 9, 7, generator=gen).to(device)
    for i in range(4):
        m = torch.randn(2, 3, 9, 7, generator=gen).to(device, dtype)
        x_lp, seed = x.to(dtype), torch.tensor([3, 4], device=device)
        a = fast.step(m, fast.timesteps[i], x_lp, noise_seed=seed)
        b = plain.step(m, plain.timesteps[i], x_lp, noise_seed=seed)
        r = ref32.step(m.float(), ref32.timesteps[i], x_lp.float(), noise_seed=seed)
        assert a.prev_sample.dtype == a.denoised.dtype == dtype and fast.last_backend == backend
        for name in ("prev_sample", "denoised"):
            assert_lowp(a[name], b[name], r[name], what=f"LCM {config} [{backend}] {name} step {i}")
        x = r.prev_sample


def _strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sliced":
        big = torch.randn(t.shape[:-1] + (t.shape[-1] + 3,), device=t.device, dtype=t.dtype)
        big[..., 1:-2] = t
        return big[..., 1:-2]
    if kind == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    big = torch.randn((t.shape[0] * 2,) + t.shape[1:], device=t.device, dtype=t.dtype)
    big[::2] = t
    return big[::2]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("kind", ["sliced", "channels_last", "batch_strided"])
@pytest.mark.parametrize("config", [{}, dict(clip_sample=True)], ids=["folded", "corrector"])
def test_non_contiguous_inputs(device, backend, kind, config):
    f, d = fastdiff.LCMScheduler(**config, backend=backend), diffusers.LCMScheduler(**config)
    for s in (f, d):
        s.set_timesteps(4, device=device)
    x = torch.randn(3, 4, 6, 5, device=device)
    for i, t in enumerate(d.timesteps):
        m = torch.randn_like(x)
        xs, ms = _strided(x, kind), _strided(m, "sliced" if kind != "sliced" else "batch_strided")
        assert not xs.is_contiguous() and not ms.is_contiguous()
        out_f = f.step(ms, f.timesteps[i], xs, generator=torch.Generator(device).manual_seed(i))
        out_d = d.step(m, t, x, generator=torch.Generator(device).manual_seed(i))
        assert_rel(out_f.prev_sample, out_d.prev_sample, RTOL32, f"{kind} [{backend}] step {i}")
        assert_rel(out_f.denoised, out_d.denoised, RTOL32, f"{kind} [{backend}] denoised {i}")
        x = out_d.prev_sample


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
@pytest.mark.parametrize("config", [{}, dict(thresholding=True, sample_max_value=1.5)], ids=["folded", "corrector"])
def test_guidance_in_the_step_matches_diffusers(device, backend, guidance_rescale, config):
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    f, d = fastdiff.LCMScheduler(**config, backend=backend), diffusers.LCMScheduler(**config)
    for s in (f, d):
        s.set_timesteps(3, device=device)
    x = torch.randn(2, 3, 5, 7, device=device)
    for i, t in enumerate(d.timesteps):
        doubled = torch.randn(4, 3, 5, 7, device=device)
        uncond, cond = doubled.chunk(2)
        guided = uncond + 6.5 * (cond - uncond)
        if guidance_rescale:
            guided = rescale_noise_cfg(guided, cond, guidance_rescale=guidance_rescale)
        out_d = d.step(guided, t, x, generator=torch.Generator(device).manual_seed(i))
        out_f = f.step(
            doubled,
            f.timesteps[i],
            x,
            generator=torch.Generator(device).manual_seed(i),
            guidance_scale=6.5,
            guidance_rescale=guidance_rescale,
        )
        assert_rel(out_f.prev_sample, out_d.prev_sample, RTOL32, f"guided [{backend}] step {i}")
        assert_rel(out_f.denoised, out_d.denoised, RTOL32, f"guided [{backend}] denoised {i}")
        x = out_d.prev_sample


# ------------------------------------------------------------------ API and errors


def test_one_fused_launch_per_step(monkeypatch):
    from fastdiff import ops

    calls = []
    real = ops.fused_step
    monkeypatch.setattr(ops, "fused_step", lambda p, b: calls.append(b) or real(p, b))
    for config in ({}, dict(clip_sample=True)):
        s = fastdiff.LCMScheduler(**config, backend="torch")
        s.set_timesteps(4)
        x = torch.randn(1, 2, 4, 4)
        calls.clear()
        for t in s.timesteps:
            x = s.step(torch.randn_like(x), t, x).prev_sample
        assert calls == ["torch"] * 4


def test_api_surface_like_diffusers():
    f, d = fastdiff.LCMScheduler(), diffusers.LCMScheduler()
    assert f.timesteps.tolist() == d.timesteps.tolist() and f.num_inference_steps is None and not f.custom_timesteps
    assert f.step_index is None and f.begin_index is None and f.init_noise_sigma == d.init_noise_sigma
    assert torch.equal(f.alphas_cumprod, d.alphas_cumprod) and torch.equal(f.final_alpha_cumprod, d.final_alpha_cumprod)
    ours = list(inspect.signature(f.step).parameters.values())
    theirs = list(inspect.signature(d.step).parameters.values())
    assert [(p.name, p.default) for p in ours[: len(theirs)]] == [(p.name, p.default) for p in theirs]
    assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(theirs) :])
    assert int(f.previous_timestep(torch.tensor(500))) == int(d.previous_timestep(torch.tensor(500))) == 499
    for t in (0, 19, 999, torch.tensor(259)):
        a, b = f.get_scalings_for_boundary_condition_discrete(t), d.get_scalings_for_boundary_condition_discrete(t)
        assert [float(v) for v in a] == [float(v) for v in b] and type(a[0]) is type(b[0])
    assert f.sigma_data == 0.5
    x = torch.randn(2, 3, 4, 4)
    assert f.scale_model_input(x, 5) is x
    f.set_timesteps(4)
    out = f.step(torch.randn_like(x), f.timesteps[0], x)
    assert type(out).__name__ == "LCMSchedulerOutput" and list(out.keys()) == ["prev_sample", "denoised"]


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_add_noise_and_velocity_match_diffusers(backend):
    f, d = fastdiff.LCMScheduler(backend=backend), diffusers.LCMScheduler()
    x, noise = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    t = torch.tensor([999, 500, 3])
    assert_rel(f.add_noise(x, noise, t), d.add_noise(x, noise, t), RTOL32, "add_noise")
    assert_rel(f.get_velocity(x, noise, t), d.get_velocity(x, noise, t), RTOL32, "get_velocity")


def test_errors_name_the_argument():
    s = fastdiff.LCMScheduler()
    x = torch.randn(1, 2, 3, 3)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(x, 999, x)
    bad = fastdiff.LCMScheduler(prediction_type="flow")
    bad.set_timesteps(4)
    with pytest.raises(ValueError, match=r"`prediction_type` must be one of .*got 'flow'"):
        bad.step(x, bad.timesteps[0], x)
    s.set_timesteps(2)
    for t in s.timesteps:
        x = s.step(torch.randn_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="past the last of 2 inference steps"):
        s.step(x, s.timesteps[-1], x)
    with pytest.raises(ValueError, match="`timestep`=123 is not in the schedule"):
        s.set_timesteps(2)
        s.step(x, 123, x)
