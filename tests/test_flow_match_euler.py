"""FlowMatchEulerDiscreteScheduler against diffusers' class: schedules bit for bit, then every step of a loop for
every config knob on every backend (fp32 within 1e-5, or at least as accurate as diffusers against float64;
fp16/bf16 within twice plain PyTorch's error), odd, packed, 5-D and non-contiguous shapes, batch 1 and > 1;
``scale_noise``, ``per_token_timesteps``, guidance, the public helpers and the errors."""

import math

import numpy as np
import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_fp32, assert_lowp, assert_rel

import fastdiff
from fastdiff.schedules import calculate_shift

diffusers = pytest.importorskip("diffusers")

NAME = "FlowMatchEulerDiscreteScheduler"
RTOL32 = 1e-5
BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]
FAST_CASES = [(d, b) for d in DEVICES for b in available_backends(d)]

# (config, set_timesteps kwargs): every knob of diffusers 0.42.1's class
CONFIGS = [
    ({}, {}),
    (dict(shift=3.0), {}),  # SD3
    (dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15), dict(mu=1.15)),  # FLUX.1-dev at 1024 px
    (dict(use_dynamic_shifting=True, time_shift_type="linear"), dict(mu=2.5)),
    (dict(shift=2.0, shift_terminal=0.1), {}),  # LTX-Video
    (dict(use_dynamic_shifting=True, shift_terminal=0.05), dict(mu=0.7)),
    (dict(shift=3.0, use_karras_sigmas=True), {}),
    (dict(shift=3.0, use_exponential_sigmas=True), {}),
    (dict(use_beta_sigmas=True), {}),
    (dict(invert_sigmas=True, shift=2.0), {}),  # Mochi
    (dict(stochastic_sampling=True), {}),
    (dict(stochastic_sampling=True, shift=3.0, use_karras_sigmas=True), {}),
    (dict(num_train_timesteps=500, shift=1.5), {}),
]
CUSTOM = [
    dict(sigmas=[1.0, 0.83, 0.6, 0.31, 0.12]),  # FLUX pipelines pass their own linspace sigmas
    dict(timesteps=[1000.0, 812.5, 400.0, 90.25]),
    dict(sigmas=[0.95, 0.5, 0.2], timesteps=[950.0, 500.0, 200.0]),
    dict(num_inference_steps=3, sigmas=[0.9, 0.4, 0.1]),
]


def _pair(config, backend, set_kwargs, device="cpu"):
    d = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    f = fastdiff.FlowMatchEulerDiscreteScheduler(**config, backend=backend)
    for s in (d, f):
        s.set_timesteps(**set_kwargs, device=device)
    return d, f


def _truth(x, m, sigma, sigma_next, z, stochastic):
    """The step in float64 from the same inputs and the float32 sigmas."""
    x, m = x.double(), m.double()
    if stochastic:
        return (1 - sigma_next) * (x - sigma * m) + sigma_next * z.double()
    return x + (sigma_next - sigma) * m


def _walk(config, set_kwargs, device, backend, shape=(2, 3, 7, 9), make=None):
    """Yield (i, fastdiff output, diffusers output, truth_fn) for every step, fresh random velocities, both on
    diffusers' trajectory, the noise of each step from one seed."""
    make = make or (lambda: torch.randn(shape, device=device))
    d, f = _pair(config, backend, set_kwargs, device)
    torch.testing.assert_close(f.timesteps, d.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(f.sigmas, d.sigmas, rtol=0, atol=0)
    x = make()
    for i, (t_d, t_f) in enumerate(zip(d.timesteps, f.timesteps)):
        m = make()
        seed = 100 + i
        out_d = d.step(m, t_d, x, generator=torch.Generator(device).manual_seed(seed))
        out_f = f.step(m, t_f, x, generator=torch.Generator(device).manual_seed(seed))
        z = torch.randn(x.shape, generator=torch.Generator(device).manual_seed(seed), device=device)
        sig = d.sigmas.double()
        truth = _truth(x, m, sig[i], sig[i + 1], z, d.config.stochastic_sampling)
        yield i, out_f, out_d, (lambda truth=truth: truth)
        x = out_d.prev_sample


def _check(out_f, out_d, truth, what):
    assert type(out_f).__name__ == type(out_d).__name__ == "FlowMatchEulerDiscreteSchedulerOutput"
    assert list(out_f.keys()) == list(out_d.keys()) == ["prev_sample"]
    assert out_f.prev_sample.dtype == out_d.prev_sample.dtype
    assert_fp32(out_f.prev_sample, out_d.prev_sample, truth, RTOL32, what)


# ---------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("steps", [1, 4, 28, 50])
@pytest.mark.parametrize("config,set_kwargs", CONFIGS)
def test_schedule_matches_diffusers(config, set_kwargs, steps):
    d, f = _pair(config, "reference", dict(set_kwargs, num_inference_steps=steps))
    assert f.timesteps.dtype == d.timesteps.dtype == torch.float32
    # bitwise equal; NaN where diffusers has NaN (one step with shift_terminal divides 0 by 0 in both)
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(f.timesteps, d.timesteps, **exact, msg=f"timesteps {f.timesteps} != {d.timesteps}")
    torch.testing.assert_close(f.sigmas, d.sigmas, **exact, msg=f"sigmas {f.sigmas} != {d.sigmas}")
    if steps == 1 and config.get("shift_terminal"):
        assert f.timesteps.isnan().all() and f.sigmas[:1].isnan().all()
    assert f.num_inference_steps == d.num_inference_steps == steps
    assert (f.sigma_min, f.sigma_max, f.shift) == (d.sigma_min, d.sigma_max, d.shift)


@pytest.mark.parametrize("set_kwargs", CUSTOM)
@pytest.mark.parametrize("config", [{}, dict(shift=3.0), dict(use_dynamic_shifting=True), dict(invert_sigmas=True)])
def test_custom_schedule_matches_diffusers(config, set_kwargs):
    if config.get("use_dynamic_shifting"):
        set_kwargs = dict(set_kwargs, mu=0.9)
    d, f = _pair(config, "reference", set_kwargs)
    assert torch.equal(f.timesteps, d.timesteps) and torch.equal(f.sigmas, d.sigmas)


def test_init_schedule_and_attributes_match_diffusers():
    for config in ({}, dict(shift=3.0), dict(use_dynamic_shifting=True, shift=3.0), dict(num_train_timesteps=77)):
        d = diffusers.FlowMatchEulerDiscreteScheduler(**config)
        f = fastdiff.FlowMatchEulerDiscreteScheduler(**config)
        assert torch.equal(f.timesteps, d.timesteps) and torch.equal(f.sigmas, d.sigmas)
        assert (f.sigma_min, f.sigma_max, f.shift, len(f), f.order) == (
            d.sigma_min,
            d.sigma_max,
            d.shift,
            len(d),
            d.order,
        )
        assert f.step_index is d.step_index is None and f.begin_index is d.begin_index is None
        assert f.sigmas.device == d.sigmas.device


def test_sigmas_live_on_the_device_like_diffusers():
    d, f = _pair({}, "reference", dict(num_inference_steps=4), device="meta")
    assert f.sigmas.device == d.sigmas.device == f.timesteps.device == torch.device("meta")


# ---------------------------------------------------------------------------------------------- steps


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("config,set_kwargs", CONFIGS)
def test_steps_match_diffusers(device, backend, config, set_kwargs):
    steps = dict(set_kwargs, num_inference_steps=6)
    for i, out_f, out_d, truth in _walk(config, steps, device, backend):
        _check(out_f, out_d, truth, f"{config} step {i}")
    assert fastdiff.FlowMatchEulerDiscreteScheduler(**config).draws_noise() == bool(config.get("stochastic_sampling"))


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("set_kwargs", CUSTOM)
def test_custom_schedule_steps_match_diffusers(device, backend, set_kwargs):
    for i, out_f, out_d, truth in _walk(dict(shift=3.0), set_kwargs, device, backend):
        _check(out_f, out_d, truth, f"{set_kwargs} step {i}")


def _non_contiguous(shape, device):
    return torch.randn(tuple(reversed(shape)), device=device).permute(*reversed(range(len(shape))))


SHAPES = {
    "batch1-packed": lambda d: torch.randn(1, 13, 5, device=d),  # FLUX's packed (B, tokens, channels)
    "batch3-odd": lambda d: torch.randn(3, 5, 11, 7, device=d),
    "video-5d": lambda d: torch.randn(2, 4, 3, 5, 6, device=d),  # (B, C, F, H, W) like Wan / HunyuanVideo
    "non-contiguous": lambda d: _non_contiguous((2, 3, 7, 9), d),
    "channels-last": lambda d: torch.randn(2, 3, 7, 9, device=d).to(memory_format=torch.channels_last),
}


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("stochastic", [False, True])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes_and_layouts(device, backend, shape, stochastic):
    config = dict(shift=3.0, stochastic_sampling=stochastic)
    for i, out_f, out_d, truth in _walk(
        config, dict(num_inference_steps=4), device, backend, make=lambda: SHAPES[shape](device)
    ):
        _check(out_f, out_d, truth, f"{shape} step {i}")


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [dict(shift=3.0), dict(stochastic_sampling=True, use_karras_sigmas=True)])
def test_low_precision_within_twice_pytorch(device, backend, dtype, config):
    """diffusers in fp32 is the reference, diffusers in ``dtype`` plain PyTorch; all see the same low-precision
    inputs (diffusers' own low-precision trajectory) and the same noise."""
    d32 = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    dlo = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    f = fastdiff.FlowMatchEulerDiscreteScheduler(**config, backend=backend)
    for s in (d32, dlo, f):
        s.set_timesteps(6, device=device)
    x = torch.randn(2, 3, 9, 7, device=device).to(dtype)
    for i, (t_32, t_lo, t_f) in enumerate(zip(d32.timesteps, dlo.timesteps, f.timesteps)):
        m = torch.randn(2, 3, 9, 7, device=device).to(dtype)
        gen = lambda: torch.Generator(device).manual_seed(7 + i)  # noqa: E731
        ref = d32.step(m.float(), t_32, x.float(), generator=gen()).prev_sample
        plain = dlo.step(m, t_lo, x, generator=gen()).prev_sample
        fast = f.step(m, t_f, x, generator=gen()).prev_sample
        assert fast.dtype == plain.dtype == dtype and f.last_backend == backend
        assert_lowp(fast, plain, ref, f"{config} step {i}")
        x = plain


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_fused_steps_equal_the_reference_with_philox_noise(device, backend, stochastic):
    """In-kernel Philox noise (``noise_seed``) draws what the reference draws for the same seeds."""
    fast = fastdiff.FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic, shift=3.0, backend=backend)
    ref = fastdiff.FlowMatchEulerDiscreteScheduler(stochastic_sampling=stochastic, shift=3.0, backend="reference")
    for s in (fast, ref):
        s.set_timesteps(5, device=device)
    x = torch.randn(2, 3, 5, 7, device=device)
    for t_a, t_b in zip(fast.timesteps, ref.timesteps):
        m = torch.randn_like(x)
        a = fast.step(m, t_a, x, noise_seed=[3, 4]).prev_sample
        b = ref.step(m, t_b, x, noise_seed=[3, 4]).prev_sample
        assert_rel(a, b, RTOL32, f"Philox step at t={float(t_b)}")
        x = b


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_guidance_in_the_step_equals_diffusers_on_the_guided_output(device, backend):
    d, f = _pair(dict(shift=3.0), backend, dict(num_inference_steps=3), device)
    x = torch.randn(2, 4, 6, 5, device=device)
    for t_d, t_f in zip(d.timesteps, f.timesteps):
        doubled = torch.randn(4, 4, 6, 5, device=device)
        uncond, cond = doubled.chunk(2)
        want = d.step(uncond + 4.5 * (cond - uncond), t_d, x).prev_sample
        got = f.step(doubled, t_f, x, guidance_scale=4.5).prev_sample
        assert_rel(got, want, RTOL32, "guided step")
        x = want


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_per_token_timesteps_match_diffusers(device, backend, stochastic):
    """LTX-Video's conditioning path: each token of a packed sample at its own timestep (run by the reference
    step: one coefficient row cannot hold per-token sigmas), float32 out."""
    d, f = _pair(dict(shift=2.0, stochastic_sampling=stochastic), backend, dict(num_inference_steps=5), device)
    x = torch.randn(2, 9, 4, device=device, dtype=torch.float16)
    for i, (t_d, t_f) in enumerate(zip(d.timesteps, f.timesteps)):
        m = torch.randn(2, 9, 4, device=device, dtype=torch.float16)
        per_token = t_d.float().expand(2, 9).clone()
        per_token[:, :3] = 0.0  # conditioning tokens, already clean
        gen = lambda: torch.Generator(device).manual_seed(i)  # noqa: E731
        want = d.step(m, t_d, x, per_token_timesteps=per_token, generator=gen()).prev_sample
        got = f.step(m, t_f, x, per_token_timesteps=per_token, generator=gen())
        assert got.prev_sample.dtype == want.dtype == torch.float32 and f.last_backend == "reference"
        torch.testing.assert_close(got.prev_sample, want, rtol=0, atol=0)
        x = want.half()


def test_step_index_and_begin_index_like_diffusers():
    d, f = _pair(dict(shift=3.0), "reference", dict(num_inference_steps=8))
    x = torch.randn(1, 2, 3, 3)
    for s in (d, f):
        s.set_begin_index(3)
    for t_d, t_f in zip(d.timesteps[3:5], f.timesteps[3:5]):
        assert_rel(f.step(x, t_f, x).prev_sample, d.step(x, t_d, x).prev_sample, RTOL32, "from begin_index")
    assert f.step_index == d.step_index == 5 and f.begin_index == d.begin_index == 3
    # without begin_index, a loop entered mid-schedule finds its first timestep by value
    d, f = _pair({}, "reference", dict(num_inference_steps=8))
    f.step(x, f.timesteps[2], x)
    d.step(x, d.timesteps[2], x)
    assert f.step_index == d.step_index == 3
    # a repeated value: the second match, as diffusers (img2img never skips a sigma)
    d, f = _pair({}, "reference", dict(sigmas=[0.9, 0.6, 0.6, 0.2]))
    assert f.index_for_timestep(f.timesteps[1]) == d.index_for_timestep(d.timesteps[1]) == 2
    assert f.index_for_timestep(600.0) == 2 and f.index_for_timestep(torch.tensor(900.0)) == 0
    with pytest.raises(IndexError):
        d.index_for_timestep(123.0)
    with pytest.raises(IndexError, match=r"`timestep`=123.0 is not in the schedule"):
        f.index_for_timestep(123.0)
    with pytest.raises(ValueError, match="not in the schedule"):  # also a ValueError, like fastdiff's others
        f.step(x, torch.tensor(123.0), x)


# ---------------------------------------------------------------------------------------------- forward process


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_scale_noise_matches_diffusers(device, backend):
    d, f = _pair(dict(shift=3.0), backend, dict(num_inference_steps=10), device)
    x = torch.randn(4, 3, 5, 6, device=device)
    noise = torch.randn_like(x)
    pick = [0, 3, 9, 5]
    for ts_f, ts_d in ((f.timesteps[pick], d.timesteps[pick]), (f.timesteps[4:5], d.timesteps[4:5])):
        assert_rel(f.scale_noise(x, ts_f, noise), d.scale_noise(x, ts_d, noise), RTOL32, "scale_noise by value")
    assert f.last_backend == backend
    # img2img: begin_index set, before and after the first step
    for s in (d, f):
        s.set_begin_index(4)
    t_f, t_d = f.timesteps[4:5].repeat(4), d.timesteps[4:5].repeat(4)
    assert_rel(f.scale_noise(x, t_f, noise), d.scale_noise(x, t_d, noise), RTOL32, "scale_noise at begin_index")
    f.step(x, f.timesteps[4], x)
    d.step(x, d.timesteps[4], x)
    assert_rel(f.scale_noise(x, t_f, noise), d.scale_noise(x, t_d, noise), RTOL32, "scale_noise at step_index")
    # low precision: the same formula in the sample's dtype
    xh, nh = x.half(), noise.half()
    got, want = f.scale_noise(xh, t_f, nh), d.scale_noise(xh, t_d, nh)
    assert got.dtype == torch.float16
    assert_lowp(got, want, d.scale_noise(xh.float(), t_d, nh.float()), "fp16 scale_noise")
    # add_noise is the same forward process (a fastdiff extra: diffusers' class has scale_noise only)
    assert torch.equal(f.add_noise(x, noise, t_f), f.scale_noise(x, t_f, noise))


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_scale_noise_philox_equals_the_reference(device, backend):
    fast = fastdiff.FlowMatchEulerDiscreteScheduler(backend=backend)
    ref = fastdiff.FlowMatchEulerDiscreteScheduler(backend="reference")
    for s in (fast, ref):
        s.set_timesteps(6, device=device)
    x = torch.randn(3, 2, 5, 5, device=device)
    ts = fast.timesteps[[1, 2, 4]]
    assert_rel(fast.scale_noise(x, ts, noise_seed=[5, 6, 7]), ref.scale_noise(x, ts, noise_seed=[5, 6, 7]), RTOL32)


# ---------------------------------------------------------------------------------------------- helpers, errors


def test_time_shift_helpers_match_diffusers():
    t = torch.linspace(1.0, 0.05, 9)
    for time_shift_type in ("exponential", "linear"):
        d = diffusers.FlowMatchEulerDiscreteScheduler(time_shift_type=time_shift_type, shift_terminal=0.2)
        f = fastdiff.FlowMatchEulerDiscreteScheduler(time_shift_type=time_shift_type, shift_terminal=0.2)
        assert torch.equal(f.time_shift(0.8, 1.0, t), d.time_shift(0.8, 1.0, t))
        assert np.array_equal(f.time_shift(1.3, 2.0, t.numpy()), d.time_shift(1.3, 2.0, t.numpy()))
        assert torch.equal(f.stretch_shift_to_terminal(t), d.stretch_shift_to_terminal(t))
    f.set_shift(5.0)
    d.set_shift(5.0)
    assert f.shift == d.shift == 5.0 and f.config.shift == d.config.shift == 1.0
    for s in (f, d):
        s.set_timesteps(4)
    assert torch.equal(f.sigmas, d.sigmas), "set_shift applies to later set_timesteps"


def _pipeline_function(module: str, name: str):
    """A module-level function of a diffusers pipeline file, without importing the pipeline (which needs
    transformers): its source is read from the installed file and run alone."""
    import ast
    import importlib.util

    path = importlib.util.find_spec(module).origin
    tree = ast.parse(open(path).read())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = {}
    exec(compile(ast.Module([node], type_ignores=[]), path, "exec"), scope)
    return scope[name]


def test_calculate_shift_is_the_pipelines():
    flux_calculate_shift = _pipeline_function("diffusers.pipelines.flux.pipeline_flux", "calculate_shift")
    for seq_len in (256, 1024, 4096, 4321):
        assert calculate_shift(seq_len) == flux_calculate_shift(seq_len)
        assert calculate_shift(seq_len, 256, 8192, 0.3, 1.4) == flux_calculate_shift(seq_len, 256, 8192, 0.3, 1.4)
    assert math.isclose(calculate_shift(4096), 1.15)


def test_errors():
    F = fastdiff.FlowMatchEulerDiscreteScheduler
    with pytest.raises(ValueError, match="`mu` must be passed"):
        F(use_dynamic_shifting=True).set_timesteps(4)
    with pytest.raises(ValueError, match="`time_shift_type` must be one of .* got 'cubic'"):
        F(time_shift_type="cubic")
    with pytest.raises(ValueError, match="only one of `use_karras_sigmas`"):
        F(use_karras_sigmas=True, use_exponential_sigmas=True)
    s = F()
    with pytest.raises(ValueError, match=r"`sigmas` \(2 values\) and `timesteps` \(3 values\)"):
        s.set_timesteps(sigmas=[0.9, 0.5], timesteps=[900.0, 500.0, 100.0])
    with pytest.raises(ValueError, match=r"`sigmas` has 2 values; expected `num_inference_steps`=3"):
        s.set_timesteps(3, sigmas=[0.9, 0.5])
    with pytest.raises(ValueError, match="pass `num_inference_steps`, or custom"):
        s.set_timesteps()
    s.set_timesteps(4)
    x = torch.randn(1, 2, 3, 3)
    for t in (3, torch.tensor(3), torch.tensor(3, dtype=torch.int32)):
        with pytest.raises(ValueError, match="integer indices"):
            s.step(x, t, x)
    with pytest.raises(ValueError, match=r"`model_output` has shape \(1, 2, 3, 4\)"):
        s.step(torch.randn(1, 2, 3, 4), s.timesteps[0], x)
    with pytest.raises(ValueError, match="`noise` is required"):
        s.scale_noise(x, s.timesteps[:1])
