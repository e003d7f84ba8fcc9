"""PNDMScheduler against diffusers, step by step on every backend: the Runge-Kutta warm-up and PLMS for every
config knob, the public state (``counter``, ``ets``, ``cur_sample``, ``cur_model_output``) after each call, the
direct ``step_prk`` / ``step_plms`` calls diffusers' own tests make, low precision, layouts, guidance, errors and
the slot rule that lets a graph replay the loop."""

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
SD15 = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, skip_prk_steps=True, steps_offset=1)

# (config, inference steps): every knob, warm-up and PLMS-only
WALKS = [
    ({}, 5),
    (dict(skip_prk_steps=True), 6),
    (dict(prediction_type="v_prediction"), 4),
    (dict(skip_prk_steps=True, prediction_type="v_prediction", set_alpha_to_one=True), 5),
    (dict(set_alpha_to_one=True, beta_start=0.01), 5),
    (SD15, 7),
    (dict(timestep_spacing="linspace"), 6),
    (dict(timestep_spacing="trailing", skip_prk_steps=True), 5),
    (dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="trailing", steps_offset=3), 5),
    (dict(num_train_timesteps=400, trained_betas=np.linspace(2e-4, 0.04, 400).tolist(), skip_prk_steps=True), 4),
    (dict(num_train_timesteps=100, steps_offset=1), 8),
    (dict(skip_prk_steps=True), 1),
    (dict(skip_prk_steps=True), 2),
]


def _same_state(f, d, what: str) -> None:
    """fastdiff's public state equals diffusers' after a call, bit for bit (what is kept are the inputs
    themselves): counter, ets, cur_sample, cur_model_output."""

    def same(a, b, name):
        assert torch.equal(a, b), f"{what}: {name} differs"

    assert f.counter == d.counter, f"{what}: counter {f.counter} != {d.counter}"
    assert len(f.ets) == len(d.ets), f"{what}: len(ets) {len(f.ets)} != {len(d.ets)}"
    for k, (a, b) in enumerate(zip(f.ets, d.ets)):
        same(a, b, f"ets[{k}]")
    assert (f.cur_sample is None) == (d.cur_sample is None), f"{what}: cur_sample set on one side only"
    if d.cur_sample is not None:
        same(f.cur_sample, d.cur_sample, "cur_sample")
    cmo_f, cmo_d = f.cur_model_output, d.cur_model_output
    assert isinstance(cmo_f, torch.Tensor) == isinstance(cmo_d, torch.Tensor), f"{what}: cur_model_output kind"
    if isinstance(cmo_d, torch.Tensor):
        same(cmo_f, cmo_d, "cur_model_output")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("k", range(len(WALKS)), ids=lambda k: f"walk{k}")
def test_walk_matches_diffusers(device, backend, k):
    """A whole loop of ``step`` calls: prev_sample within 1e-5 of diffusers' (or as close to the float64 truth),
    the reference bit for bit; the public state equal after every call."""
    config, steps = WALKS[k]
    shape = SHAPES[k % len(SHAPES)]
    f = fastdiff.PNDMScheduler(**config, backend=backend)
    d = diffusers.PNDMScheduler(**config)
    d64 = diffusers.PNDMScheduler(**config)  # the truth: diffusers' ops on float64 tensors
    for s in (f, d, d64):
        s.set_timesteps(steps, device=device)
    assert f.timesteps.tolist() == d.timesteps.tolist()
    gen = torch.Generator().manual_seed(k)
    x = torch.randn(shape, generator=gen).to(device)
    x64 = x.double()
    for i, (t_f, t_d) in enumerate(zip(f.timesteps, d.timesteps)):
        m = torch.randn(shape, generator=gen).to(device)
        out_f = f.step(m, t_f, x).prev_sample
        out_d = d.step(m, t_d, x).prev_sample
        truth = d64.step(m.double(), t_d, x64).prev_sample
        what = f"{config} [{backend}] call {i} (t={int(t_d)})"
        if backend == "reference":
            assert torch.equal(out_f, out_d), f"{what}: the reference is not diffusers' op order"
        assert_fp32(out_f, out_d, lambda: truth, RTOL32, what)
        assert f.last_backend == backend
        _same_state(f, d, what)
        x, x64 = out_d, truth


@pytest.mark.parametrize(
    "config",
    [{}, dict(skip_prk_steps=True), SD15, dict(timestep_spacing="linspace"), dict(timestep_spacing="trailing")],
    ids=["prk", "plms", "sd15", "linspace", "trailing"],
)
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 5, 10, 27, 50, 999])
def test_timesteps_match_diffusers(config, steps):
    f, d = fastdiff.PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
    if not config.get("skip_prk_steps") and steps < 4:
        # diffusers fails with numpy's broadcasting error; fastdiff says why
        with pytest.raises(ValueError):
            d.set_timesteps(steps)
        with pytest.raises(ValueError, match=r"`num_inference_steps`=\d is too few for the Runge-Kutta warm-up"):
            f.set_timesteps(steps)
        return
    f.set_timesteps(steps)
    d.set_timesteps(steps)
    assert f.timesteps.dtype == d.timesteps.dtype == torch.int64
    assert f.timesteps.tolist() == d.timesteps.tolist()
    assert f.prk_timesteps.tolist() == d.prk_timesteps.tolist()
    assert f.plms_timesteps.tolist() == d.plms_timesteps.tolist()
    assert f.num_inference_steps == d.num_inference_steps


def test_timesteps_with_steps_offset():
    """diffusers' test_steps_offset numbers."""
    s = fastdiff.PNDMScheduler(steps_offset=1)
    s.set_timesteps(10)
    expected = [901, 851, 851, 801, 801, 751, 751, 701, 701, 651, 651, 601, 601, 501, 401, 301, 201, 101, 1]
    assert s.timesteps.tolist() == expected


# ------------------------------------------------------------------ direct calls and hand-set state


def _dummies(sample):
    residual = 0.1 * sample
    return residual, [residual + 0.2, residual + 0.15, residual + 0.1, residual + 0.05]


def _scenario_diffusers_tests(s, sample, time_step):
    """test_scheduler_pndm's check_over_configs: hand-set ets, one step_prk, then step_plms at counter 1 (the
    4th-order combination of ets alone, which the fused row cannot take: it runs the reference)."""
    residual, ets = _dummies(sample)
    s.set_timesteps(50)
    s.ets = ets[:]
    yield s.step_prk(residual, time_step, sample).prev_sample
    yield s.step_plms(residual, time_step, sample).prev_sample


def _scenario_step_shape(s, sample, _):
    """test_step_shape: two step_prk calls at timesteps 0 and 1, then two step_plms calls."""
    residual, ets = _dummies(sample)
    s.set_timesteps(50)
    s.ets = ets[:]
    for call, t in ((s.step_prk, 0), (s.step_prk, 1), (s.step_plms, 0), (s.step_plms, 1)):
        yield call(residual, t, sample).prev_sample


def _scenario_hand_set_sum(s, sample, _):
    """A warm-up interval whose running sum and starting sample are replaced by hand halfway."""
    s.set_timesteps(6)
    for i, t in enumerate(s.timesteps[:8]):
        if i == 2:
            s.cur_model_output = 0.3 * sample + 0.01
        if i == 6:
            s.cur_sample = sample - 0.2
        yield s.step(torch.sin(sample * (i + 1)), t, sample + 0.01 * i).prev_sample


def _scenario_plms_hand_set_ets(s, sample, _):
    """skip_prk_steps with two outputs set by hand before the first call, then a loop."""
    s.set_timesteps(5)
    s.ets = [0.1 * sample, 0.2 * sample - 0.1]
    for i, t in enumerate(s.timesteps):
        yield s.step(torch.cos(sample + i), t, sample - 0.01 * i).prev_sample


def _scenario_off_schedule(s, sample, _):
    """Timesteps that are not the schedule's (ints, and tensors built by hand)."""
    s.set_timesteps(8)
    for i, t in enumerate([900, 880, torch.tensor(870), 860, 840, torch.tensor(500), 430, 420, 400, 333]):
        yield s.step(torch.sin(sample - i), t, sample * (1 + 0.1 * i)).prev_sample


SCENARIOS = {
    "diffusers_tests": ({}, _scenario_diffusers_tests),
    "step_shape": ({}, _scenario_step_shape),
    "hand_set_sum": ({}, _scenario_hand_set_sum),
    "plms_hand_set_ets": (dict(skip_prk_steps=True), _scenario_plms_hand_set_ets),
    "off_schedule": (dict(prediction_type="v_prediction"), _scenario_off_schedule),
}


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("time_step", [0, 5])
def test_direct_calls_and_hand_set_state_match_diffusers(device, backend, name, time_step):
    """The same calls on both (inputs that do not depend on earlier outputs): outputs within 1e-5, the state bit
    for bit (what is kept are the inputs themselves)."""
    config, scenario = SCENARIOS[name]
    f = fastdiff.PNDMScheduler(**config, backend=backend)
    d = diffusers.PNDMScheduler(**config)
    sample = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(3)).to(device)
    for i, (a, b) in enumerate(zip(scenario(f, sample, time_step), scenario(d, sample, time_step), strict=True)):
        assert_rel(a, b, RTOL32, f"{name} [{backend}] call {i}")
        _same_state(f, d, f"{name} [{backend}] call {i}")


def test_the_fourth_order_step_without_this_output_runs_the_reference():
    """step_plms at counter 1 after a full ets combines four kept outputs and not this step's: one more history
    input than the row has, so that step (and only it) runs the reference, and says so."""
    f = fastdiff.PNDMScheduler(backend="torch")
    sample = torch.rand(2, 3, 4, 4)
    steps = _scenario_diffusers_tests(f, sample, 0)
    next(steps)
    assert f.last_backend == "torch"
    next(steps)
    assert f.last_backend == "reference"


# ------------------------------------------------------------------ precision, layouts, guidance


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("config", [{}, dict(skip_prk_steps=True, prediction_type="v_prediction")], ids=["prk", "plms"])
def test_low_precision_within_twice_plain_pytorch(device, backend, dtype, config):
    fast = fastdiff.PNDMScheduler(**config, backend=backend)
    plain, ref32 = diffusers.PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
    for s in (fast, plain, ref32):
        s.set_timesteps(5, device=device)
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(2, 3, 9, 7, generator=gen).to(device)
    for i, t in enumerate(ref32.timesteps):
        m = torch.randn(2, 3, 9, 7, generator=gen).to(device, dtype)
        x_lp = x.to(dtype)
        a = fast.step(m, fast.timesteps[i], x_lp).prev_sample
        b = plain.step(m, t, x_lp).prev_sample
        r = ref32.step(m.float(), t, x_lp.float()).prev_sample
        assert a.dtype == dtype and fast.last_backend == backend
        assert_lowp(a, b, r, what=f"PNDM {config} [{backend}] call {i}")
        x = r


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_bf16_history_keeps_the_guided_output_rounded_to_nearest(device, backend):
    """The fuzz case (tests/test_fuzz.py, long profile) that found Triton's interpreter truncating float32 ->
    bfloat16 stores: PLMS with v-prediction and guidance 4.5 on one bf16 element. Each kept output must be the
    float32 guided output rounded to nearest even (what torch's ``.to`` gives), bit for bit; truncated, 5.1538
    was kept as 5.125 and the fourth-order step at t=500 erred 2.4e-2 against fp32 where plain PyTorch erred
    3.3e-3. Every step's prev_sample within twice plain PyTorch's error, as the fuzz rule asks."""
    config = dict(skip_prk_steps=True, prediction_type="v_prediction")
    fast = fastdiff.PNDMScheduler(**config, backend=backend)
    plain, ref32 = diffusers.PNDMScheduler(**config), diffusers.PNDMScheduler(**config)
    for s in (fast, plain, ref32):
        s.set_timesteps(8, device=device)
    gen = torch.Generator().manual_seed(15)
    x = torch.randn(1, 1, 1, generator=gen).to(device, torch.bfloat16)
    for i, t in enumerate(ref32.timesteps):
        m = torch.randn(2, 1, 1, generator=gen).to(device, torch.bfloat16)
        uncond, cond = m.chunk(2)
        guided32 = uncond.float() + 4.5 * (cond.float() - uncond.float())
        a = fast.step(m, fast.timesteps[i], x, guidance_scale=4.5).prev_sample
        b = plain.step(uncond + 4.5 * (cond - uncond), t, x).prev_sample
        r = ref32.step(guided32, t, x.float()).prev_sample
        assert fast.last_backend == backend
        if i != 1:  # the Heun call (counter 1) keeps no output
            kept = fast.ets[-1]
            assert kept.dtype == torch.bfloat16
            assert torch.equal(kept, guided32.to(torch.bfloat16)), (
                f"[{backend}] call {i}: kept {kept.flatten().tolist()}, the guided output {guided32.flatten().tolist()}"
                f" rounds to {guided32.to(torch.bfloat16).flatten().tolist()}"
            )
        assert_lowp(a, b, r, what=f"PNDM bf16 guided [{backend}] call {i}")
        x = b


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("shape,seed", [((1, 1, 1), 29), ((2, 3, 5), 0)])
def test_v_prediction_from_a_tiny_alpha_bar_is_float32_accurate(device, backend, shape, seed):
    """v-prediction folds M = sqrt(abar_t) v + sqrt(1 - abar_t) S into S's coefficient, c_s - k sqrt(1 - abar_t):
    at t = 999 of a cosine schedule (abar = 2.4e-9) both terms are about 4,700 and cancel to about 1, so the row
    must form them in float64; from float32 c_s and k the Runge-Kutta stage at t=849 was 1.6e-4 off the float64
    truth (the fuzz case, seed 29, where diffusers happened to be 1.7e-5 off). Every call within 1e-5 of the
    truth: fastdiff's reference on float64 tensors and the float32 schedule's values in float64."""
    config = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing="linspace", prediction_type="v_prediction")
    fast = fastdiff.PNDMScheduler(**config, backend=backend)
    truth = fastdiff.PNDMScheduler(**config, backend="reference")
    for s in (fast, truth):
        s.set_timesteps(5, device=device)
    truth.alphas_cumprod, truth.final_alpha_cumprod = truth.alphas_cumprod.double(), truth.final_alpha_cumprod.double()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen).to(device)
    for i in range(len(fast.timesteps)):
        m = torch.randn(shape, generator=gen).to(device)
        out = fast.step(m, fast.timesteps[i], x).prev_sample
        exp = truth.step(m.double(), truth.timesteps[i], x.double()).prev_sample
        assert fast.last_backend == backend
        assert_rel(out, exp, RTOL32, f"[{backend}] call {i} t={int(fast.timesteps[i])}")
        x = exp.float()


def _strided(t: torch.Tensor, kind: str) -> torch.Tensor:
    """The same values in a non-contiguous layout."""
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
@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_non_contiguous_inputs(device, backend, kind, skip_prk_steps):
    f = fastdiff.PNDMScheduler(skip_prk_steps=skip_prk_steps, backend=backend)
    d = diffusers.PNDMScheduler(skip_prk_steps=skip_prk_steps)
    for s in (f, d):
        s.set_timesteps(5, device=device)
    x = torch.randn(3, 4, 6, 5, device=device)
    for i, t in enumerate(d.timesteps):
        m = torch.randn_like(x)
        xs, ms = _strided(x, kind), _strided(m, "sliced" if kind != "sliced" else "batch_strided")
        assert not xs.is_contiguous() and not ms.is_contiguous()
        out_f = f.step(ms, f.timesteps[i], xs).prev_sample
        out_d = d.step(m, t, x).prev_sample
        assert_rel(out_f, out_d, RTOL32, f"{kind} [{backend}] call {i}")
        x = out_d


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("guidance_rescale", [0.0, 0.7])
@pytest.mark.parametrize("skip_prk_steps", [False, True])
def test_guidance_in_the_step_matches_diffusers(device, backend, guidance_rescale, skip_prk_steps):
    """The doubled batch guided inside the step; the history keeps the guided output, as a pipeline's would."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    f = fastdiff.PNDMScheduler(skip_prk_steps=skip_prk_steps, backend=backend)
    d = diffusers.PNDMScheduler(skip_prk_steps=skip_prk_steps)
    for s in (f, d):
        s.set_timesteps(4, device=device)
    x = torch.randn(2, 3, 5, 7, device=device)
    for i, t in enumerate(d.timesteps):
        doubled = torch.randn(4, 3, 5, 7, device=device)
        uncond, cond = doubled.chunk(2)
        guided = uncond + 6.5 * (cond - uncond)
        if guidance_rescale:
            guided = rescale_noise_cfg(guided, cond, guidance_rescale=guidance_rescale)
        out_d = d.step(guided, t, x).prev_sample
        out_f = f.step(doubled, f.timesteps[i], x, guidance_scale=6.5, guidance_rescale=guidance_rescale).prev_sample
        assert_rel(out_f, out_d, RTOL32, f"guided [{backend}] call {i}")
        x = out_d


# ------------------------------------------------------------------ the graph rule, API, errors


def test_slots_are_a_function_of_the_call_count():
    """A second loop after ``_reset_loop_state`` (what GraphSampler replays) uses the same static buffers at every
    call, and PLMS needs four slots, the warm-up five."""
    for config, slots in (({}, 5), (dict(skip_prk_steps=True), 4)):
        s = fastdiff.PNDMScheduler(**config, backend="torch")
        s.set_timesteps(8)
        runs = []
        for seed in (0, 1):
            s._reset_loop_state()
            gen = torch.Generator().manual_seed(seed)
            x, used = torch.randn(1, 2, 3, 3, generator=gen), []
            for t in s.timesteps:
                x = s.step(torch.randn(x.shape, generator=gen), t, x).prev_sample
                used.append(([e.data_ptr() for e in s.ets], s.cur_sample.data_ptr() if s.cur_sample is not None else 0))
            runs.append(used)
        assert runs[0] == runs[1]
        assert len(s._device_cache[("slots", x.shape, x.dtype, x.device)]) == slots


def test_one_fused_launch_per_step(monkeypatch):
    from fastdiff import ops

    calls = []
    real = ops.fused_step
    monkeypatch.setattr(ops, "fused_step", lambda p, b: calls.append(b) or real(p, b))
    for config in ({}, dict(skip_prk_steps=True)):
        s = fastdiff.PNDMScheduler(**config, backend="torch")
        s.set_timesteps(6)
        x = torch.randn(1, 2, 4, 4)
        calls.clear()
        for t in s.timesteps:
            x = s.step(torch.randn_like(x), t, x).prev_sample
        assert calls == ["torch"] * len(s.timesteps)


def test_api_surface_like_diffusers():
    f, d = fastdiff.PNDMScheduler(), diffusers.PNDMScheduler()
    assert f.timesteps is None and d.timesteps is None and f.prk_timesteps is None and f.num_inference_steps is None
    assert f.init_noise_sigma == d.init_noise_sigma and f.pndm_order == d.pndm_order == 4 and len(f) == 1000
    assert f.counter == 0 and f.ets == [] and f.cur_sample is None and f.cur_model_output == 0
    x = torch.randn(2, 3, 4, 4)
    assert f.scale_model_input(x, 5) is x
    assert torch.equal(f.alphas_cumprod, d.alphas_cumprod) and torch.equal(f.final_alpha_cumprod, d.final_alpha_cumprod)
    for name in ("step", "step_prk", "step_plms"):
        ours = list(inspect.signature(getattr(f, name)).parameters.values())
        theirs = list(inspect.signature(getattr(d, name)).parameters.values())
        assert [(p.name, p.default) for p in ours[: len(theirs)]] == [(p.name, p.default) for p in theirs]
        assert all(p.kind == p.KEYWORD_ONLY for p in ours[len(theirs) :])
    f.set_timesteps(5)
    out = f.step(torch.randn_like(x), f.timesteps[0], x)
    assert list(out.keys()) == ["prev_sample"] and out.pred_original_sample is None
    assert isinstance(f.step(torch.randn_like(x), f.timesteps[1], x, return_dict=False), tuple)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_add_noise_matches_diffusers(backend):
    f, d = (
        fastdiff.PNDMScheduler(beta_schedule="scaled_linear", backend=backend),
        diffusers.PNDMScheduler(beta_schedule="scaled_linear"),
    )
    x, noise = torch.randn(3, 2, 5, 4), torch.randn(3, 2, 5, 4)
    t = torch.tensor([999, 500, 3])
    assert_rel(f.add_noise(x, noise, t), d.add_noise(x, noise, t), RTOL32, "add_noise")
    philox = f.add_noise(x, None, t, noise_seed=[1, 2, 3])  # before set_timesteps, when timesteps is None
    f.set_timesteps(10)
    assert torch.equal(philox, f.add_noise(x, None, t, noise_seed=[1, 2, 3]))


def test_errors_name_the_argument():
    s = fastdiff.PNDMScheduler()
    x = torch.randn(1, 2, 3, 3)
    for call in (s.step, s.step_prk, s.step_plms):
        with pytest.raises(ValueError, match="set_timesteps"):
            call(x, 1, x)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="can only be run after the scheduler has run 12 Runge-Kutta steps"):
        s.step_plms(x, s.timesteps[0], x)
    with pytest.raises(ValueError, match=r"`timestep` must be an integer timestep, got 900.5"):
        s.step(x, 900.5, x)
    with pytest.raises(ValueError, match="`model_output` has shape"):
        s.step(torch.randn(1, 2, 3, 4), s.timesteps[0], x)
    bad = fastdiff.PNDMScheduler(prediction_type="sample")
    bad.set_timesteps(10)
    with pytest.raises(
        ValueError, match=r"`prediction_type` must be one of \['epsilon', 'v_prediction'\], got 'sample'"
    ):
        bad.step(x, bad.timesteps[0], x)
    with pytest.raises(ValueError, match="`timestep_spacing` must be one of"):
        fastdiff.PNDMScheduler(timestep_spacing="middle").set_timesteps(10)
    s.set_timesteps(5)
    for t in s.prk_timesteps:
        x = s.step_prk(torch.randn_like(x), t, x).prev_sample
    with pytest.raises(IndexError, match="past the 12 Runge-Kutta steps"):
        s.step_prk(x, 1, x)
    assert s.counter == 12  # a failed call leaves the state alone
