"""UniPCMultistepScheduler against diffusers: schedules, every config knob step by step on every backend (fp32
within 1e-5 relative or as accurate as diffusers against a float64 truth; fp16/bf16 within twice plain PyTorch's
error), shapes (odd, 5-D video latents, batch 1 and > 1, non-contiguous), the per-step choices and static buffers a
CUDA graph relies on, the configurations that run the reference step, diffusers' public methods, errors and the
documented departures."""

import numpy as np
import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_fp32, assert_lowp, rel_err

import fastdiff

diffusers = pytest.importorskip("diffusers")

RTOL32 = 1e-5
BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]
FAST_CASES = [(d, b) for d in DEVICES for b in available_backends(d)]
PREDICTIONS = ("epsilon", "sample", "v_prediction")
#: Wan 2.1 / 2.2's scheduler (tests/fixtures/scheduler_configs/wan21_unipc.json)
WAN = dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _grid() -> dict:
    """Orders 1-3 x predict_x0 x bh1/bh2, the prediction type rotating through the three VP ones. bh1 and the noise
    prediction step onto sigma_min: diffusers' bh1 step onto sigma = 0 is NaN (fastdiff departs, see
    test_bh1_final_step_onto_zero_is_finite) and so is a noise-prediction step onto 0 (sigma_t (e^h - 1) = 0 * inf,
    in both)."""
    grid = {}
    for order in (1, 2, 3):
        for k, predict_x0 in enumerate((True, False)):
            for j, solver_type in enumerate(("bh1", "bh2")):
                pred = PREDICTIONS[(order + k + j) % 3]
                final = "sigma_min" if solver_type == "bh1" or not predict_x0 else "zero"
                name = f"order{order}-{'x0' if predict_x0 else 'eps'}-{solver_type}-{pred}"
                grid[name] = (
                    dict(
                        solver_order=order,
                        predict_x0=predict_x0,
                        solver_type=solver_type,
                        prediction_type=pred,
                        final_sigmas_type=final,
                    ),
                    {},
                )
    return grid


KNOBS = {
    **_grid(),
    "no-lower-order-final": (dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min"), {}),
    "disable-corrector": (dict(solver_order=3, disable_corrector=[0, 2, 3]), {}),
    "karras": (dict(use_karras_sigmas=True), {}),
    "karras-sigma-min-final": (dict(use_karras_sigmas=True, solver_order=3, final_sigmas_type="sigma_min"), {}),
    "karras-bounds": (dict(use_karras_sigmas=True, sigma_min=0.1, sigma_max=20.0), {}),
    "exponential": (dict(use_exponential_sigmas=True, prediction_type="v_prediction"), {}),
    "beta": (dict(use_beta_sigmas=True), {}),
    "thresholding": (dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5), {}),
    "thresholding-sample-order3": (
        dict(thresholding=True, prediction_type="sample", solver_order=3, sample_max_value=2.0),
        {},
    ),
    "thresholding-eps-unused": (dict(thresholding=True, predict_x0=False), {}),
    "leading": (dict(timestep_spacing="leading", steps_offset=1), {}),
    "trailing-zero-snr": (
        dict(timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
        {},
    ),
    "scaled-linear": (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), {}),
    "cosine-order3": (dict(beta_schedule="squaredcos_cap_v2", solver_order=3), {}),
    "wan": (WAN, {}),
    "wan-order3-bh1": (dict(WAN, solver_order=3, solver_type="bh1", final_sigmas_type="sigma_min"), {}),
    "wan-predict-eps-flow-sigmas": (dict(use_flow_sigmas=True, flow_shift=3.0, predict_x0=False), {}),
    "flow-prediction-vp-sigmas": (dict(prediction_type="flow_prediction"), {}),
    "flow-karras": (dict(WAN, use_karras_sigmas=True, sigma_min=0.01, sigma_max=200.0), {}),
    "flow-shift-terminal": (dict(WAN, flow_shift=5.0, shift_terminal=0.1), {}),
    "flow-dynamic-exponential": (dict(WAN, use_dynamic_shifting=True), {"mu": 0.8}),
    "flow-dynamic-linear": (dict(WAN, use_dynamic_shifting=True, time_shift_type="linear"), {"mu": 1.3}),
    "flow-custom-sigmas": (WAN, {"sigmas": np.array([1.0, 0.8, 0.55, 0.3, 0.12, 0.05])}),
}


def _schedulers(config, backend, device, steps, set_kwargs):
    """(diffusers, fastdiff on ``backend``, fastdiff's reference in float64) with the same schedule."""
    d = diffusers.UniPCMultistepScheduler(**config)
    f = fastdiff.UniPCMultistepScheduler(**config, backend=backend)
    r = fastdiff.UniPCMultistepScheduler(**config, backend="reference")
    args = {"num_inference_steps": steps} if "sigmas" not in set_kwargs else {}
    for s in (d, f, r):
        s.set_timesteps(**args, **set_kwargs, device=device)
    torch.testing.assert_close(f.timesteps, d.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(f.sigmas, d.sigmas, rtol=0, atol=0)
    r.sigmas = r.sigmas.double()  # the truth: every scalar and tensor in float64 from diffusers' float32 sigmas
    return d, f, r


def _walk(config, device, backend, steps=6, shape=(2, 3, 5, 4), set_kwargs=None):
    """Yield (i, fastdiff prev, diffusers prev, truth prev) for every step of a loop on fresh random model outputs,
    each step starting from diffusers' previous sample so every step sees the same input."""
    d, f, r = _schedulers(config, backend, device, steps, set_kwargs or {})
    x = torch.randn(shape, device=device)
    for i, (t_d, t_f) in enumerate(zip(d.timesteps, f.timesteps)):
        m = torch.randn(shape, device=device)
        want = d.step(m, t_d, x).prev_sample
        got = f.step(m, t_f, x).prev_sample
        truth = r.step(m.double(), r.timesteps[i], x.double()).prev_sample
        assert f.last_backend == backend
        yield i, got, want, truth
        x = want


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("knob", list(KNOBS))
def test_step_by_step_matches_diffusers(knob, device, backend):
    config, set_kwargs = KNOBS[knob]
    for i, got, want, truth in _walk(config, device, backend, set_kwargs=set_kwargs):
        assert got.dtype == want.dtype and got.shape == want.shape
        assert_fp32(got, want, lambda: truth, RTOL32, f"{knob} [{backend}] step {i}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("knob", ["order3-x0-bh2-sample", "order3-eps-bh2-v_prediction"])
def test_many_steps_as_accurate_as_diffusers(knob, device, backend):
    """100 steps: diffusers' float32 coefficients (lambda differences of small h, float32 solves) drift from the
    float64 truth by up to 4e-4 relative (order 3, noise prediction, step 97); fastdiff's float64 rows stay within
    3e-5 of it, so assert_fp32 takes the truth's side."""
    config, set_kwargs = KNOBS[knob]
    for i, got, want, truth in _walk(config, device, backend, steps=100, shape=(1, 2, 3, 3), set_kwargs=set_kwargs):
        assert_fp32(got, want, lambda: truth, RTOL32, f"{knob} [{backend}] step {i}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize(
    "shape,layout",
    [
        ((1, 4, 3, 6, 5), "contiguous"),  # Wan's 5-D video latents (B, C, F, H, W), batch 1
        ((2, 4, 3, 6, 5), "frames-first"),  # (B, F, C, H, W) memory viewed as (B, C, F, H, W)
        ((3, 5, 7), "contiguous"),  # odd sizes
        ((2, 3, 9, 7), "channels-last"),
        ((3, 2, 5, 5), "strided"),  # every other element of a wider tensor
    ],
)
def test_shapes_and_layouts(shape, layout, device, backend):
    """Wan's flow config (order 3, so every history slot is read) on odd, 5-D and non-contiguous inputs."""
    d, f, _ = _schedulers(dict(WAN, solver_order=3), backend, device, 5, {})

    def make():
        if layout == "frames-first":
            return torch.randn(shape[0], shape[2], shape[1], *shape[3:], device=device).transpose(1, 2)
        if layout == "channels-last":
            return torch.randn(shape, device=device).contiguous(memory_format=torch.channels_last)
        if layout == "strided":
            return torch.randn(*shape[:-1], 2 * shape[-1], device=device)[..., ::2]
        return torch.randn(shape, device=device)

    x = make()
    assert layout == "contiguous" or not x.is_contiguous()
    for i, (t_d, t_f) in enumerate(zip(d.timesteps, f.timesteps)):
        m = make()
        want = d.step(m, t_d, x).prev_sample
        got = f.step(m, t_f, x).prev_sample
        assert rel_err(got, want) <= RTOL32, f"{layout} {shape} [{backend}] step {i}: {rel_err(got, want):.2e}"
        x = want


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_guidance_in_the_step(device, backend):
    """``guidance_scale`` / ``guidance_rescale`` on a doubled batch: the same as diffusers stepping on the output a
    pipeline guides op by op."""
    from fastdiff import reference

    d, f, _ = _schedulers(dict(WAN, solver_order=3), backend, device, 5, {})
    x = torch.randn(2, 3, 4, 5, device=device)
    for t_d, t_f in zip(d.timesteps, f.timesteps):
        m = torch.randn(4, 3, 4, 5, device=device)
        guided = reference.rescale_noise_cfg(reference.apply_guidance(m, 4.0), m.chunk(2)[1], 0.5)
        want = d.step(guided, t_d, x).prev_sample
        got = f.step(m, t_f, x, guidance_scale=4.0, guidance_rescale=0.5).prev_sample
        assert rel_err(got, want) <= RTOL32
        x = want


LOWP_KNOBS = [
    "wan",
    "order3-x0-bh1-epsilon",
    "order3-eps-bh2-v_prediction",
    "order2-eps-bh2-sample",
    "thresholding",
    "karras",
]


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("knob", LOWP_KNOBS)
def test_low_precision_within_twice_pytorch(knob, dtype, device, backend):
    """Each fused step in fp16/bf16 within twice plain PyTorch's error (the reference in the same precision)
    against the float32 reference, from the same inputs."""
    config, set_kwargs = KNOBS[knob]
    shape = (2, 3, 9, 7)
    fast, plain, ref32 = (
        fastdiff.UniPCMultistepScheduler(**config, backend=b) for b in (backend, "reference", "reference")
    )
    for s in (fast, plain, ref32):
        s.set_timesteps(6, device=device, **set_kwargs)
    x = torch.randn(shape, device=device)
    for i in range(6):
        m = torch.randn(shape, device=device)
        x_lp, m_lp = x.to(dtype), m.to(dtype)
        a = fast.step(m_lp, fast.timesteps[i], x_lp).prev_sample
        b = plain.step(m_lp, plain.timesteps[i], x_lp).prev_sample
        r = ref32.step(m_lp.float(), ref32.timesteps[i], x_lp.float()).prev_sample
        assert a.dtype == dtype and fast.last_backend == backend
        assert_lowp(a, b, r, what=f"{knob} [{backend}] step {i}")
        x = r


# ---------------------------------------------------------------------------------------------- schedules


SCHEDULES = [({}, {"num_inference_steps": n}) for n in (1, 2, 3, 10, 999, 1000)] + [
    ({"timestep_spacing": "leading", "steps_offset": 1}, {"num_inference_steps": 7}),
    ({"timestep_spacing": "trailing"}, {"num_inference_steps": 7}),
    ({"final_sigmas_type": "sigma_min"}, {"num_inference_steps": 7}),
    ({"use_karras_sigmas": True}, {"num_inference_steps": 25}),
    ({"use_karras_sigmas": True, "final_sigmas_type": "sigma_min"}, {"num_inference_steps": 25}),
    ({"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, {"num_inference_steps": 9}),
    ({"use_exponential_sigmas": True}, {"num_inference_steps": 25}),
    ({"use_beta_sigmas": True}, {"num_inference_steps": 25}),
    ({"rescale_betas_zero_snr": True}, {"num_inference_steps": 10}),
    (WAN, {"num_inference_steps": 50}),
    (dict(WAN, final_sigmas_type="sigma_min"), {"num_inference_steps": 4}),
    (dict(WAN, use_karras_sigmas=True, sigma_min=0.01, sigma_max=200.0), {"num_inference_steps": 5}),
    (dict(WAN, use_exponential_sigmas=True), {"num_inference_steps": 5}),
    (dict(WAN, use_beta_sigmas=True), {"num_inference_steps": 5}),
    (dict(WAN, shift_terminal=0.05), {"num_inference_steps": 8}),
    (dict(WAN, use_dynamic_shifting=True), {"num_inference_steps": 8, "mu": 1.1}),
    (dict(WAN, use_dynamic_shifting=True, time_shift_type="linear"), {"num_inference_steps": 8, "mu": 1.1}),
    (WAN, {"sigmas": np.array([0.9, 0.5, 0.2])}),
    (dict(WAN, use_karras_sigmas=True), {"sigmas": np.array([0.9, 0.5, 0.2, 0.1])}),
]


@pytest.mark.parametrize("config,kwargs", SCHEDULES, ids=lambda v: str(v)[:60])
def test_schedule_matches_diffusers(config, kwargs):
    f, d = fastdiff.UniPCMultistepScheduler(**config), diffusers.UniPCMultistepScheduler(**config)
    f.set_timesteps(**kwargs)
    d.set_timesteps(**kwargs)
    assert f.timesteps.dtype == d.timesteps.dtype == torch.int64
    torch.testing.assert_close(f.timesteps, d.timesteps, rtol=0, atol=0)
    torch.testing.assert_close(f.sigmas, d.sigmas, rtol=0, atol=0)
    assert f.num_inference_steps == d.num_inference_steps


def test_schedule_before_set_timesteps_and_attributes():
    f, d = (
        fastdiff.UniPCMultistepScheduler(rescale_betas_zero_snr=True),
        diffusers.UniPCMultistepScheduler(rescale_betas_zero_snr=True),
    )
    for name in ("timesteps", "sigmas", "betas", "alphas_cumprod", "alpha_t", "sigma_t", "lambda_t"):
        torch.testing.assert_close(getattr(f, name), getattr(d, name), rtol=0, atol=0, msg=name)
    assert f.init_noise_sigma == d.init_noise_sigma == 1.0
    assert f.order == d.order == 1 and f.predict_x0 is True and f.disable_corrector == []


# ---------------------------------------------------------------------------------------------- per-step state


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_orders_and_corrector_follow_diffusers(order, lower_order_final, steps):
    """UniP's order at each step (diffusers' ``this_order``) and whether UniC ran, as pure functions of the
    step index and the steps taken, also for a loop that starts in the middle (``set_begin_index``)."""
    config = dict(solver_order=order, lower_order_final=lower_order_final, disable_corrector=[1])
    f = fastdiff.UniPCMultistepScheduler(**config, final_sigmas_type="sigma_min", backend="reference")
    d = diffusers.UniPCMultistepScheduler(**config, final_sigmas_type="sigma_min")
    for begin in (0, steps // 2):
        f.set_timesteps(steps)
        d.set_timesteps(steps)
        f.set_begin_index(begin)
        d.set_begin_index(begin)
        x = torch.randn(1, 2, 3)
        for k, (t_f, t_d) in enumerate(zip(f.timesteps[begin:], d.timesteps[begin:])):
            i = begin + k
            corrector = d.step_index is not None and i > 0 and (i - 1) not in d.disable_corrector
            m = torch.randn_like(x)
            d.step(m, t_d, x)
            assert f._corrector_order_at(i, k) == (f._order_at(i - 1, k - 1) if corrector else 0)
            f.step(m, t_f, x)
            assert f.this_order == d.this_order, f"step {i}: order {f.this_order}, diffusers {d.this_order}"
            assert f.step_index == d.step_index and f.lower_order_nums == d.lower_order_nums


@pytest.mark.parametrize("order", [1, 2, 3])
def test_static_buffers_and_slots(order):
    """One history and one corrected-sample buffer per schedule, reused by every step and every loop; a step never
    reads the buffer it writes; the slots of a step are the same in every loop (a graph replays them)."""
    s = fastdiff.UniPCMultistepScheduler(solver_order=order, backend="torch")
    s.set_timesteps(7)
    x = torch.randn(2, 3, 4)
    loops = []
    for _ in range(2):
        s._reset_loop_state()
        s.set_begin_index(0)
        plans = []
        for t in s.timesteps:
            plan = s._plan(s._locate(t), t, x, x, {})
            writes = {plan.x0_out.data_ptr(), plan.corr_out.data_ptr()}
            reads = {h.data_ptr() for h in plan.hist} | ({plan.last.data_ptr()} if plan.last is not None else set())
            assert not writes & reads, "a step reads a buffer it writes"
            plans.append(
                (plan.row, [h.data_ptr() for h in plan.hist], plan.x0_out.data_ptr(), plan.corr_out.data_ptr())
            )
            s.step(torch.randn_like(x), t, x)
        loops.append(plans)
    assert loops[0] == loops[1]
    assert len([k for k in s._device_cache if k[0] == "unipc-buffers"]) == 1


# ------------------------------------------------------------------------------------- reference-only configurations


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_order_four_runs_the_reference_step(backend):
    """The row has three history terms; solver_order 4 runs the reference step (and still matches diffusers)."""
    f = fastdiff.UniPCMultistepScheduler(solver_order=4, final_sigmas_type="sigma_min", backend=backend)
    d = diffusers.UniPCMultistepScheduler(solver_order=4, final_sigmas_type="sigma_min")
    f.set_timesteps(8)
    d.set_timesteps(8)
    x = torch.randn(2, 3, 4, 4)
    for t_f, t_d in zip(f.timesteps, d.timesteps):
        m = torch.randn_like(x)
        got, want = f.step(m, t_f, x).prev_sample, d.step(m, t_d, x).prev_sample
        assert f.last_backend == "reference"
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        x = want


def test_solver_p_runs_the_reference_step():
    """``solver_p`` (another scheduler as UniP) with UniC: through the reference step, like diffusers."""
    f = fastdiff.UniPCMultistepScheduler(solver_p=fastdiff.DDIMScheduler(), backend="torch")
    d = diffusers.UniPCMultistepScheduler(solver_p=diffusers.DDIMScheduler())
    f.set_timesteps(6)
    d.set_timesteps(6)
    x = torch.randn(2, 3, 4, 4)
    for t_f, t_d in zip(f.timesteps, d.timesteps):
        m = torch.randn_like(x)
        got, want = f.step(m, t_f, x).prev_sample, d.step(m, t_d, x).prev_sample
        assert f.last_backend == "reference"
        assert rel_err(got, want) <= RTOL32
        x = want


# ---------------------------------------------------------------------------------------------- API


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("config", [{}, WAN], ids=["vp", "flow"])
def test_img2img_add_noise_and_begin_index(config, device, backend):
    """add_noise at a mid-schedule timestep, then the rest of the loop from set_begin_index (diffusers' img2img)."""
    f = fastdiff.UniPCMultistepScheduler(**config, backend=backend)
    d = diffusers.UniPCMultistepScheduler(**config)
    for s in (f, d):
        s.set_timesteps(10, device=device)
        s.set_begin_index(4)
    x0, noise = torch.randn(2, 3, 6, 5, device=device), torch.randn(2, 3, 6, 5, device=device)
    x_f = f.add_noise(x0, noise, f.timesteps[4:5])
    x_d = d.add_noise(x0, noise, d.timesteps[4:5])
    assert rel_err(x_f, x_d) <= RTOL32
    assert f.begin_index == d.begin_index == 4 and f.step_index is None
    for t_f, t_d in zip(f.timesteps[4:], d.timesteps[4:]):
        m = torch.randn_like(x0)
        got, want = f.step(m, t_f, x_d).prev_sample, d.step(m, t_d, x_d).prev_sample
        assert rel_err(got, want) <= RTOL32 and f.step_index == d.step_index
        x_d = want


@pytest.mark.parametrize("config", [{}, WAN], ids=["vp", "flow"])
def test_add_noise_per_sample_timesteps(config):
    f, d = fastdiff.UniPCMultistepScheduler(**config), diffusers.UniPCMultistepScheduler(**config)
    f.set_timesteps(10)
    d.set_timesteps(10)
    x0, noise = torch.randn(3, 2, 4), torch.randn(3, 2, 4)
    t = f.timesteps[[0, 5, 9]]
    torch.testing.assert_close(f.add_noise(x0, noise, t), d.add_noise(x0, noise, t), rtol=1e-6, atol=1e-6)


def test_first_timestep_outside_the_schedule_starts_at_the_last_step():
    f, d = fastdiff.UniPCMultistepScheduler(), diffusers.UniPCMultistepScheduler()
    f.set_timesteps(10)
    d.set_timesteps(10)
    x, m = torch.randn(1, 2, 3), torch.randn(1, 2, 3)
    torch.testing.assert_close(f.step(m, 3, x).prev_sample, d.step(m, 3, x).prev_sample, rtol=1e-5, atol=1e-6)
    assert f.step_index == d.step_index == 10


def test_public_update_methods_match_diffusers():
    """convert_model_output, multistep_uni_c_bh_update and multistep_uni_p_bh_update on the same state."""
    f = fastdiff.UniPCMultistepScheduler(solver_order=3, backend="reference")
    d = diffusers.UniPCMultistepScheduler(solver_order=3)
    f.set_timesteps(8)
    d.set_timesteps(8)
    x = torch.randn(2, 3, 4)
    for t_f, t_d in zip(f.timesteps[:4], d.timesteps[:4]):
        m = torch.randn_like(x)
        f.step(m, t_f, x)
        x = d.step(m, t_d, x).prev_sample
    m = torch.randn_like(x)
    conv_f, conv_d = f.convert_model_output(m, sample=x), d.convert_model_output(m, sample=x)
    torch.testing.assert_close(conv_f, conv_d, rtol=0, atol=0)
    last = torch.randn_like(x)
    torch.testing.assert_close(
        f.multistep_uni_c_bh_update(this_model_output=conv_f, last_sample=last, this_sample=x, order=3),
        d.multistep_uni_c_bh_update(this_model_output=conv_d, last_sample=last, this_sample=x, order=3),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        f.multistep_uni_p_bh_update(m, sample=x, order=2),
        d.multistep_uni_p_bh_update(m, sample=x, order=2),
        rtol=0,
        atol=0,
    )
    with pytest.warns(FutureWarning, match="deprecated"):
        f.convert_model_output(m, f.timesteps[0], x)
    with pytest.raises(ValueError, match="missing `sample`"):
        f.convert_model_output(m)
    with pytest.raises(ValueError, match="missing `order`"):
        f.multistep_uni_p_bh_update(m, sample=x)
    with pytest.raises(ValueError, match="missing `last_sample`"):
        f.multistep_uni_c_bh_update(m, this_sample=x, order=1)


def test_time_shift_and_stretch_match_diffusers():
    for kind in ("exponential", "linear"):
        f = fastdiff.UniPCMultistepScheduler(time_shift_type=kind, use_flow_sigmas=True, shift_terminal=0.1)
        d = diffusers.UniPCMultistepScheduler(time_shift_type=kind, use_flow_sigmas=True, shift_terminal=0.1)
        t = np.linspace(1, 0.05, 7)
        np.testing.assert_array_equal(f.time_shift(1.2, 1.0, t), d.time_shift(1.2, 1.0, t))
        np.testing.assert_array_equal(f.stretch_shift_to_terminal(t), d.stretch_shift_to_terminal(t))


def test_switching_configs_like_diffusers():
    """A config passed through DPM-Solver keeps UniPC's options; DPM-Solver's solver types map to bh2."""
    cfg = fastdiff.UniPCMultistepScheduler(solver_order=3, solver_type="bh1", predict_x0=False).config
    back = fastdiff.UniPCMultistepScheduler.from_config(fastdiff.DPMSolverMultistepScheduler.from_config(cfg).config)
    assert back.config.solver_order == 3 and back.config.predict_x0 is False
    assert back.config.solver_type == "bh2"  # DPM-Solver maps bh1 -> midpoint, UniPC midpoint -> bh2, as diffusers
    want = diffusers.UniPCMultistepScheduler.from_config(diffusers.DPMSolverMultistepScheduler.from_config(cfg).config)
    assert want.config.solver_type == back.config.solver_type
    assert fastdiff.UniPCMultistepScheduler(solver_type="heun").config.solver_type == "bh2"


def test_step_output_contract():
    s = fastdiff.UniPCMultistepScheduler()
    s.set_timesteps(3)
    x = torch.randn(1, 2, 3)
    out = s.step(torch.randn_like(x), s.timesteps[0], x)
    assert out.pred_original_sample is None and list(out.keys()) == ["prev_sample"]
    tup = s.step(torch.randn_like(x), s.timesteps[1], x, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and tup[0].shape == x.shape
    assert s.scale_model_input(x, s.timesteps[0]) is x
    assert not s.draws_noise({})


# ---------------------------------------------------------------------------------------------- errors and departures


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(use_karras_sigmas=True, use_beta_sigmas=True), ValueError, "only one of"),
        (dict(shift_terminal=0.1), ValueError, r"`shift_terminal`=0.1 is only supported when `use_flow_sigmas`"),
        (dict(solver_type="bh3"), ValueError, r"`solver_type` must be one of .*'bh3'"),
        (dict(prediction_type="flow"), ValueError, r"`prediction_type` must be one of .*'flow'"),
        (dict(solver_order=0), ValueError, r"`solver_order` must be a positive int, got 0"),
        (dict(beta_schedule="sigmoid"), ValueError, r"`beta_schedule` must be one of"),
        (dict(final_sigmas_type="max"), ValueError, r"`final_sigmas_type` must be one of"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        fastdiff.UniPCMultistepScheduler(**kwargs)


def test_set_timesteps_and_step_errors():
    s = fastdiff.UniPCMultistepScheduler(use_dynamic_shifting=True, use_flow_sigmas=True)
    with pytest.raises(ValueError, match="`mu` must be passed"):
        s.set_timesteps(5)
    with pytest.raises(ValueError, match="only supported when `use_flow_sigmas=True`"):
        fastdiff.UniPCMultistepScheduler().set_timesteps(sigmas=[0.5, 0.2])
    with pytest.raises(ValueError, match="`time_shift_type` must be one of"):
        fastdiff.UniPCMultistepScheduler(
            use_flow_sigmas=True, use_dynamic_shifting=True, time_shift_type="cubic"
        ).set_timesteps(4, mu=1.0)
    with pytest.raises(ValueError, match="Number of inference steps is 'None'"):
        fastdiff.UniPCMultistepScheduler().step(torch.randn(1, 2), 10, torch.randn(1, 2))
    s = fastdiff.UniPCMultistepScheduler()
    s.set_timesteps(2)
    x = torch.randn(1, 2)
    for t in s.timesteps:
        x = s.step(torch.randn_like(x), t, x).prev_sample
    with pytest.raises(ValueError, match="past the last of 2 inference steps"):
        s.step(torch.randn_like(x), s.timesteps[-1], x)


def test_noise_prediction_step_onto_zero_is_nan_like_diffusers():
    """Kept as diffusers has it: with predict_x0=False the step onto sigma = 0 multiplies sigma_t = 0 by
    e^h - 1 = inf (NaN); DPM-Solver's noise prediction refuses final_sigmas_type "zero" for the same reason."""
    config = dict(predict_x0=False)
    d, f = diffusers.UniPCMultistepScheduler(**config), fastdiff.UniPCMultistepScheduler(**config)
    d.set_timesteps(3)
    f.set_timesteps(3)
    x = torch.randn(1, 2, 3)
    for t_f, t_d in zip(f.timesteps, d.timesteps):
        m = torch.randn_like(x)
        got, x = f.step(m, t_f, x).prev_sample, d.step(m, t_d, x).prev_sample
    assert x.isnan().all() and got.isnan().all()
