"""diffusers' own scheduler full-loop regression numbers, reproduced with diffusers and with fastdiff.

diffusers' test suite (tests/schedulers/test_scheduler_*.py) runs each scheduler through a short
deterministic loop with a toy "model" and asserts hard-coded sum(|x|) / mean(|x|) of the final sample.
This file rebuilds the same setups with its own fixtures and loops (nothing imported from diffusers'
tests, which are not installed), checks the fixtures against diffusers' own classes
(``test_regression_numbers_with_diffusers``) and then asks fastdiff's drop-in classes for the same
numbers on every backend (``test_regression_numbers_with_fastdiff``).

The expected numbers are facts taken from diffusers' test files (commit noted per case); cases marked
"computed" are loops diffusers runs without asserting numbers (it only checks for NaN), whose numbers
were recorded with diffusers 0.42.1 and are checked against it by the first test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

import fastdiff
from fastdiff import ops

diffusers = pytest.importorskip("diffusers")

# ---------------------------------------------------------------------------------------------------------
# Fixtures equivalent to diffusers' SchedulerCommonTest.dummy_model / dummy_sample_deter / dummy_noise_deter
# (tests/schedulers/test_schedulers.py): a (4, 3, 8, 8) ramp laid out channels-last in memory and viewed as
# NCHW, so the tensors are *not* contiguous, exactly like diffusers'.

BATCH, CHANNELS, HEIGHT, WIDTH = 4, 3, 8, 8


def _ramp(descending: bool) -> torch.Tensor:
    n = BATCH * CHANNELS * HEIGHT * WIDTH
    values = torch.arange(n, dtype=torch.float32)
    if descending:
        values = (n - 1) - values
    # fill memory in (C, H, W, B) order, then view as (B, C, H, W)
    return (values / n).reshape(CHANNELS, HEIGHT, WIDTH, BATCH).permute(3, 0, 1, 2)


def deterministic_sample() -> torch.Tensor:
    """k / N for k = 0..N-1 in (C, H, W, B) memory order, viewed as (B, C, H, W)."""
    return _ramp(descending=False)


def deterministic_noise() -> torch.Tensor:
    """The same ramp reversed: (N - 1 - k) / N."""
    return _ramp(descending=True)


def toy_model(x: torch.Tensor, t) -> torch.Tensor:
    """The stand-in "network" of diffusers' scheduler tests: x * t / (t + 1), same operation order."""
    return x * t / (t + 1)


# ---------------------------------------------------------------------------------------------------------
# Base configs of each diffusers test class (get_scheduler_config)

DDPM_BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    variance_type="fixed_small",
    clip_sample=True,
)
DDIM_BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    clip_sample=True,
)
EULER_BASE = dict(num_train_timesteps=1100, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
DPM_BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    solver_order=2,
    prediction_type="epsilon",
    thresholding=False,
    sample_max_value=1.0,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=False,
    euler_at_final=False,
    lambda_min_clipped=-float("inf"),
    variance_type=None,
    final_sigmas_type="sigma_min",
)

UNIPC_BASE = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    solver_order=2,
    solver_type="bh2",
    final_sigmas_type="sigma_min",
)

SRC = "huggingface/diffusers tests/schedulers/"
SRC_DDPM = SRC + "test_scheduler_ddpm.py @95ff471"
SRC_DDIM = SRC + "test_scheduler_ddim.py @1cf1528"
SRC_EULER = SRC + "test_scheduler_euler.py @18dcab7"
# test_full_loop_with_noise was added later (the version importing torch_device from ..testing_utils)
SRC_EULER_NOISE = SRC + "test_scheduler_euler.py (..testing_utils version)"
SRC_EULER_A = SRC + "test_scheduler_euler_ancestral.py @4004496"
SRC_DPM = SRC + "test_scheduler_dpm_multi.py @9519ffc"
SRC_UNIPC = SRC + "test_scheduler_unipc.py @b530968"
COMPUTED = "computed with diffusers 0.42.1; diffusers' test_solver_order_and_type only asserts no NaN"


@dataclass(frozen=True)
class Case:
    """One full-loop regression case.

    loop:
      "train"    every training timestep, reversed, as Python ints, without set_timesteps (DDPM tests);
      "sample"   set_timesteps(steps) and the whole schedule from dummy_sample_deter * init_noise_sigma;
      "img2img"  add dummy_noise_deter at timesteps[t_start * order] and run the rest of the schedule
                 (diffusers' test_full_loop_with_noise; DDPM uses its default 1000-step schedule; flow matching
                 noises with scale_noise, its forward process).
    """

    id: str
    cls: str
    config: dict
    loop: str
    expected_mean: float
    expected_sum: Optional[float]
    source: str
    steps: Optional[int] = 10
    t_start: Optional[int] = None
    step_args: tuple = ()  # positional step arguments after `sample` (DDIM's eta)
    generator: bool = True  # step(..., generator=torch.manual_seed(0)-equivalent)
    device: Optional[str] = None  # set_timesteps(..., device=device): the *_device variants
    via: tuple = ()  # diffusers classes the config passes through first (DPM test_switch)
    sum_tol: float = 1e-2  # diffusers' tolerances: |sum - expected| < 1e-2, |mean - expected| < 1e-3
    mean_tol: float = 1e-3
    sigma_scheduler: bool = False  # multiply by init_noise_sigma, scale_model_input each step (Euler family)
    mu: Optional[float] = None  # set_timesteps(steps, mu=mu): dynamic shifting (flow matching)


def _dpm(id, overrides=None, **kw):
    return Case(id=id, cls="DPMSolverMultistepScheduler", config={**DPM_BASE, **(overrides or {})}, **kw)


def _unipc(id, overrides=None, **kw):
    return Case(id=id, cls="UniPCMultistepScheduler", config={**UNIPC_BASE, **(overrides or {})}, **kw)


def _euler(id, cls, overrides=None, **kw):
    return Case(id=id, cls=cls, config={**EULER_BASE, **(overrides or {})}, sigma_scheduler=True, **kw)


CASES = [
    # ---- DDPM: 1000 training steps, noise from the seeded generator at every t > 0
    Case("ddpm-no-noise", "DDPMScheduler", DDPM_BASE, "train", 0.3372, 258.9606, SRC_DDPM, steps=None),
    Case(
        "ddpm-v-prediction",
        "DDPMScheduler",
        {**DDPM_BASE, "prediction_type": "v_prediction"},
        "train",
        0.2631,
        202.0296,
        SRC_DDPM,
        steps=None,
    ),
    # default schedule (no set_timesteps): t_start = 998 leaves t = 1, 0
    Case(
        "ddpm-with-noise",
        "DDPMScheduler",
        DDPM_BASE,
        "img2img",
        0.5051,
        387.9466,
        SRC_DDPM,
        steps=None,
        t_start=998,
    ),
    # ---- DDIM: 10 steps, eta=0.0 passed positionally, no generator
    Case(
        "ddim-no-noise",
        "DDIMScheduler",
        DDIM_BASE,
        "sample",
        0.223967,
        172.0067,
        SRC_DDIM,
        step_args=(0.0,),
        generator=False,
    ),
    Case(
        "ddim-v-prediction",
        "DDIMScheduler",
        {**DDIM_BASE, "prediction_type": "v_prediction"},
        "sample",
        0.0684,
        52.5302,
        SRC_DDIM,
        step_args=(0.0,),
        generator=False,
    ),
    Case(
        "ddim-set-alpha-to-one",
        "DDIMScheduler",
        {**DDIM_BASE, "set_alpha_to_one": True, "beta_start": 0.01},
        "sample",
        0.1951,
        149.8295,
        SRC_DDIM,
        step_args=(0.0,),
        generator=False,
    ),
    Case(
        "ddim-no-set-alpha-to-one",
        "DDIMScheduler",
        {**DDIM_BASE, "set_alpha_to_one": False, "beta_start": 0.01},
        "sample",
        0.1941,
        149.0784,
        SRC_DDIM,
        step_args=(0.0,),
        generator=False,
    ),
    Case(
        "ddim-with-noise",
        "DDIMScheduler",
        DDIM_BASE,
        "img2img",
        0.4616,
        354.5418,
        SRC_DDIM,
        t_start=8,
        step_args=(0.0,),
        generator=False,
    ),
    # ---- Euler: 10 steps from dummy_sample_deter * init_noise_sigma, scale_model_input, seeded generator
    _euler(
        "euler-no-noise",
        "EulerDiscreteScheduler",
        None,
        loop="sample",
        expected_mean=0.0131,
        expected_sum=10.0807,
        source=SRC_EULER,
    ),
    _euler(
        "euler-v-prediction",
        "EulerDiscreteScheduler",
        {"prediction_type": "v_prediction"},
        loop="sample",
        expected_mean=2.2676e-06,
        expected_sum=0.0002,
        source=SRC_EULER,
    ),
    _euler(
        "euler-device",
        "EulerDiscreteScheduler",
        None,
        loop="sample",
        expected_mean=0.0131,
        expected_sum=10.0807,
        source=SRC_EULER,
        device="cpu",
    ),
    _euler(
        "euler-device-karras-sigmas",
        "EulerDiscreteScheduler",
        {"use_karras_sigmas": True},
        loop="sample",
        expected_mean=0.16213932633399963,
        expected_sum=124.52299499511719,
        source=SRC_EULER,
        device="cpu",
    ),
    _euler(
        "euler-with-noise",
        "EulerDiscreteScheduler",
        None,
        loop="img2img",
        expected_mean=74.3007,
        expected_sum=57062.9297,
        source=SRC_EULER_NOISE,
        t_start=8,
    ),
    # ---- Euler ancestral: noise from the seeded generator every step
    _euler(
        "euler-a-no-noise",
        "EulerAncestralDiscreteScheduler",
        None,
        loop="sample",
        expected_mean=0.1983,
        expected_sum=152.3192,
        source=SRC_EULER_A,
    ),
    _euler(
        "euler-a-v-prediction",
        "EulerAncestralDiscreteScheduler",
        {"prediction_type": "v_prediction"},
        loop="sample",
        expected_mean=0.1412,
        expected_sum=108.4439,
        source=SRC_EULER_A,
    ),
    _euler(
        "euler-a-device",
        "EulerAncestralDiscreteScheduler",
        None,
        loop="sample",
        expected_mean=0.1983,
        expected_sum=152.3192,
        source=SRC_EULER_A,
        device="cpu",
    ),
    _euler(
        "euler-a-with-noise",
        "EulerAncestralDiscreteScheduler",
        None,
        loop="img2img",
        expected_mean=73.1290,
        expected_sum=56163.0508,
        source=SRC_EULER_A,
        t_start=8,
    ),
    # ---- DPM-Solver multistep: 10 steps from dummy_sample_deter (most diffusers cases assert the mean only)
    _dpm("dpm-no-noise", loop="sample", expected_mean=0.3301, expected_sum=None, source=SRC_DPM),
    _dpm(
        "dpm-with-noise",
        loop="img2img",
        expected_mean=0.4146,
        expected_sum=318.4111,
        source=SRC_DPM,
        t_start=5,
        generator=False,
    ),
    _dpm(
        "dpm-no-noise-thresholding",
        {"thresholding": True, "dynamic_thresholding_ratio": 0.87, "sample_max_value": 0.5},
        loop="sample",
        expected_mean=1.1364,
        expected_sum=None,
        source=SRC_DPM,
    ),
    _dpm(
        "dpm-v-prediction",
        {"prediction_type": "v_prediction"},
        loop="sample",
        expected_mean=0.2251,
        expected_sum=None,
        source=SRC_DPM,
    ),
    _dpm(
        "dpm-karras-v-prediction",
        {"prediction_type": "v_prediction", "use_karras_sigmas": True},
        loop="sample",
        expected_mean=0.2096,
        expected_sum=None,
        source=SRC_DPM,
    ),
    _dpm(
        "dpm-lu-lambdas-v-prediction",
        {"prediction_type": "v_prediction", "use_lu_lambdas": True},
        loop="sample",
        expected_mean=0.1554,
        expected_sum=None,
        source=SRC_DPM,
    ),
    # test_switch: the config round-trips through the other multistep solvers' from_config first; diffusers'
    # DPMSolverMultistepScheduler maps their algorithm_type "deis" -> "dpmsolver++" and solver_type
    # "logrho"/"bh1"/"bh2" -> "midpoint"
    _dpm(
        "dpm-switch",
        loop="sample",
        expected_mean=0.3301,
        expected_sum=None,
        source=SRC_DPM + " (test_switch)",
        via=("DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler"),
    ),
]

# ---- UniPC multistep: 10 steps from dummy_sample_deter, no generator (UniPC draws no noise)
CASES += [
    _unipc("unipc-no-noise", loop="sample", expected_mean=0.2464, expected_sum=None, source=SRC_UNIPC, generator=False),
    _unipc(
        "unipc-karras",
        {"use_karras_sigmas": True},
        loop="sample",
        expected_mean=0.2925,
        expected_sum=None,
        source=SRC_UNIPC,
        generator=False,
    ),
    _unipc(
        "unipc-v-prediction",
        {"prediction_type": "v_prediction"},
        loop="sample",
        expected_mean=0.1014,
        expected_sum=None,
        source=SRC_UNIPC,
        generator=False,
    ),
    _unipc(
        "unipc-karras-v-prediction",
        {"prediction_type": "v_prediction", "use_karras_sigmas": True},
        loop="sample",
        expected_mean=0.1966,
        expected_sum=None,
        source=SRC_UNIPC,
        generator=False,
    ),
    _unipc(
        "unipc-with-noise",
        loop="img2img",
        expected_mean=0.4109,
        expected_sum=315.5757,
        source=SRC_UNIPC,
        t_start=8,
        generator=False,
    ),
    # test_switch: through diffusers' DPMSolverSinglestep, DEIS and DPMSolverMultistep configs and back
    _unipc(
        "unipc-switch",
        loop="sample",
        expected_mean=0.2464,
        expected_sum=None,
        source=SRC_UNIPC + " (test_switch)",
        generator=False,
        via=("DPMSolverSinglestepScheduler", "DEISMultistepScheduler", "DPMSolverMultistepScheduler"),
    ),
]

# test_solver_order_and_type: diffusers runs full_loop for every (algorithm, solver_type, order, prediction)
# and only checks for NaN (order 3 is skipped for the SDE variants). Numbers recorded with diffusers 0.42.1:
# (algorithm, solver_type, order, prediction_type) -> (sum, mean)
SOLVER_VARIANTS = {
    ("dpmsolver", "midpoint", 1, "epsilon"): (172.2642, 0.224302),
    ("dpmsolver", "midpoint", 1, "sample"): (677.6078, 0.882302),
    ("dpmsolver", "midpoint", 2, "epsilon"): (223.586, 0.291128),
    ("dpmsolver", "midpoint", 2, "sample"): (783.4581, 1.020128),
    ("dpmsolver", "midpoint", 3, "epsilon"): (204.9882, 0.266912),
    ("dpmsolver", "midpoint", 3, "sample"): (751.4036, 0.97839),
    ("dpmsolver", "heun", 1, "epsilon"): (172.2642, 0.224302),
    ("dpmsolver", "heun", 1, "sample"): (677.6078, 0.882302),
    ("dpmsolver", "heun", 2, "epsilon"): (203.604, 0.265109),
    ("dpmsolver", "heun", 2, "sample"): (747.775, 0.973665),
    ("dpmsolver", "heun", 3, "epsilon"): (205.0089, 0.266939),
    ("dpmsolver", "heun", 3, "sample"): (751.3967, 0.978381),
    ("dpmsolver++", "midpoint", 1, "epsilon"): (172.2642, 0.224302),
    ("dpmsolver++", "midpoint", 1, "sample"): (677.6077, 0.882302),
    ("dpmsolver++", "midpoint", 2, "epsilon"): (253.5514, 0.330145),  # = dpm-no-noise (0.3301)
    ("dpmsolver++", "midpoint", 2, "sample"): (847.0432, 1.102921),
    ("dpmsolver++", "midpoint", 3, "epsilon"): (176.9651, 0.230423),
    ("dpmsolver++", "midpoint", 3, "sample"): (683.3215, 0.889742),
    ("dpmsolver++", "heun", 1, "epsilon"): (172.2642, 0.224302),
    ("dpmsolver++", "heun", 1, "sample"): (677.6077, 0.882302),
    ("dpmsolver++", "heun", 2, "epsilon"): (292.1283, 0.380375),
    ("dpmsolver++", "heun", 2, "sample"): (923.3271, 1.202249),
    ("dpmsolver++", "heun", 3, "epsilon"): (176.9436, 0.230395),
    ("dpmsolver++", "heun", 3, "sample"): (683.3311, 0.889754),
    ("sde-dpmsolver", "midpoint", 1, "epsilon"): (284.1624, 0.370003),
    ("sde-dpmsolver", "midpoint", 1, "sample"): (954.4143, 1.242727),
    ("sde-dpmsolver", "midpoint", 2, "epsilon"): (5015.4561, 6.530542),
    ("sde-dpmsolver", "midpoint", 2, "sample"): (1067.5356, 1.39002),
    ("sde-dpmsolver", "heun", 1, "epsilon"): (284.1624, 0.370003),
    ("sde-dpmsolver", "heun", 1, "sample"): (954.4143, 1.242727),
    ("sde-dpmsolver", "heun", 2, "epsilon"): (1314.8943, 1.712102),
    ("sde-dpmsolver", "heun", 2, "sample"): (982.9601, 1.279896),
    ("sde-dpmsolver++", "midpoint", 1, "epsilon"): (232.8767, 0.303225),
    ("sde-dpmsolver++", "midpoint", 1, "sample"): (797.5503, 1.038477),
    ("sde-dpmsolver++", "midpoint", 2, "epsilon"): (525.9483, 0.684829),
    ("sde-dpmsolver++", "midpoint", 2, "sample"): (1303.0377, 1.696664),
    ("sde-dpmsolver++", "heun", 1, "epsilon"): (232.8767, 0.303225),
    ("sde-dpmsolver++", "heun", 1, "sample"): (797.5503, 1.038477),
    ("sde-dpmsolver++", "heun", 2, "epsilon"): (774.767, 1.008811),
    ("sde-dpmsolver++", "heun", 2, "sample"): (1788.3427, 2.328571),
}

for (_alg, _solver, _order, _pred), (_sum, _mean) in SOLVER_VARIANTS.items():
    CASES.append(
        _dpm(
            f"dpm-{_alg}-{_solver}-order{_order}-{_pred}",
            {
                "algorithm_type": _alg,
                "solver_type": _solver,
                "solver_order": _order,
                "prediction_type": _pred,
            },
            loop="sample",
            expected_mean=_mean,
            expected_sum=_sum,
            source=COMPUTED,
        )
    )

# SDE-DPM-Solver++ from a noised sample (diffusers' test_full_loop_with_noise setup, but with the seeded
# generator passed to step so the SDE noise is reproducible), plain and with Karras sigmas. Recorded with
# diffusers 0.42.1.
COMPUTED_SDE = "computed with diffusers 0.42.1; test_full_loop_with_noise setup with an SDE solver"
CASES += [
    _dpm(
        "dpm-sde-dpmsolver++-with-noise",
        {"algorithm_type": "sde-dpmsolver++"},
        loop="img2img",
        t_start=5,
        expected_mean=0.671775,
        expected_sum=515.9235,
        source=COMPUTED_SDE,
    ),
    _dpm(
        "dpm-sde-dpmsolver++-karras-with-noise",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
        loop="img2img",
        t_start=5,
        expected_mean=0.444418,
        expected_sum=341.3133,
        source=COMPUTED_SDE,
    ),
]

# FlowMatchEulerDiscreteScheduler: diffusers 0.42 ships no test file for it (only unmerged pull requests add one),
# so these full loops (dummy_sample_deter, the toy model at the float timesteps, the seeded generator) were recorded
# with diffusers 0.42.1 for every knob, and are checked against it by test_regression_numbers_with_diffusers.
COMPUTED_FLOW = "computed with diffusers 0.42.1; diffusers has no FlowMatchEulerDiscreteScheduler test file"
FLOW = "FlowMatchEulerDiscreteScheduler"
CASES += [
    Case("flow-euler-no-noise", FLOW, {}, "sample", 0.173648, 133.362, COMPUTED_FLOW),
    Case("flow-euler-shift3", FLOW, {"shift": 3.0}, "sample", 0.168424, 129.3495, COMPUTED_FLOW),
    Case(
        "flow-euler-dynamic", FLOW, {"use_dynamic_shifting": True}, "sample", 0.167575, 128.6978, COMPUTED_FLOW, mu=1.15
    ),
    Case(
        "flow-euler-dynamic-linear",
        FLOW,
        {"use_dynamic_shifting": True, "time_shift_type": "linear"},
        "sample",
        0.171614,
        131.7999,
        COMPUTED_FLOW,
        mu=2.0,
    ),
    Case(
        "flow-euler-shift-terminal",
        FLOW,
        {"shift": 3.0, "shift_terminal": 0.1},
        "sample",
        0.17033,
        130.8134,
        COMPUTED_FLOW,
    ),
    Case(
        "flow-euler-karras", FLOW, {"shift": 3.0, "use_karras_sigmas": True}, "sample", 0.16311, 125.2684, COMPUTED_FLOW
    ),
    Case(
        "flow-euler-exponential",
        FLOW,
        {"shift": 3.0, "use_exponential_sigmas": True},
        "sample",
        0.156033,
        119.8333,
        COMPUTED_FLOW,
    ),
    Case("flow-euler-beta", FLOW, {"shift": 3.0, "use_beta_sigmas": True}, "sample", 0.172473, 132.4592, COMPUTED_FLOW),
    Case("flow-euler-invert", FLOW, {"invert_sigmas": True}, "sample", 1.157425, 888.9026, COMPUTED_FLOW),
    Case("flow-euler-stochastic", FLOW, {"stochastic_sampling": True}, "sample", 0.164227, 126.1261, COMPUTED_FLOW),
    Case("flow-euler-with-noise", FLOW, {"shift": 3.0}, "img2img", 0.227792, 174.9444, COMPUTED_FLOW, t_start=5),
]

# DPM-Solver++ in flow mode (Sana's config: flow_prediction, use_flow_sigmas, flow_shift=3.0, final sigma 0, lower-order
# final steps): diffusers' test file has no flow case, so these were recorded with diffusers 0.42.1.
COMPUTED_DPM_FLOW = "computed with diffusers 0.42.1; diffusers' DPM test file has no flow-mode case"
SANA = {
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
    "final_sigmas_type": "zero",
    "lower_order_final": True,
}
CASES += [
    _dpm("dpm-flow-sana", SANA, loop="sample", expected_mean=0.178753, expected_sum=137.2821, source=COMPUTED_DPM_FLOW),
    _dpm(
        "dpm-flow-order3",
        {**SANA, "solver_order": 3},
        loop="sample",
        expected_mean=0.17914,
        expected_sum=137.5792,
        source=COMPUTED_DPM_FLOW,
    ),
    _dpm(
        "dpm-flow-heun",
        {**SANA, "solver_type": "heun"},
        loop="sample",
        expected_mean=0.179788,
        expected_sum=138.077,
        source=COMPUTED_DPM_FLOW,
    ),
    _dpm(
        "dpm-flow-sde",
        {**SANA, "algorithm_type": "sde-dpmsolver++"},
        loop="sample",
        expected_mean=0.263582,
        expected_sum=202.4309,
        source=COMPUTED_DPM_FLOW,
    ),
    _dpm(
        "dpm-flow-dynamic",
        {**SANA, "use_dynamic_shifting": True},
        loop="sample",
        expected_mean=0.181693,
        expected_sum=139.5403,
        source=COMPUTED_DPM_FLOW,
        mu=0.8,
    ),
    _dpm(
        "dpm-flow-sigma-min",
        {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
        loop="sample",
        expected_mean=0.217062,
        expected_sum=166.7038,
        source=COMPUTED_DPM_FLOW,
    ),
    _dpm(
        "dpm-flow-with-noise",
        SANA,
        loop="img2img",
        t_start=5,
        expected_mean=0.229297,
        expected_sum=176.1001,
        source=COMPUTED_DPM_FLOW,
    ),
]

# Not covered: diffusers' test_custom_timesteps / test_custom_sigmas compare two loops with each other (no
# numbers), and DPM test_fp16_support only checks the output dtype.

# ---------------------------------------------------------------------------------------------------------
# The loop


def _seeded_generator() -> torch.Generator:
    """diffusers' tests pass torch.manual_seed(0) (the reseeded global CPU generator); a fresh CPU generator
    seeded with 0 yields the same stream without touching the global RNG."""
    return torch.Generator().manual_seed(0)


def _diffusers_config(case: Case) -> dict:
    """The case's config; for ``via`` cases, the config of a diffusers scheduler built from it and passed
    through ``from_config`` of each class in ``via`` in turn."""
    config = dict(case.config)
    if case.via:
        config = dict(getattr(diffusers, case.cls)(**config).config)
        for name in case.via:
            config = dict(getattr(diffusers, name).from_config(config).config)
    return config


def run_loop(scheduler, case: Case) -> torch.Tensor:
    generator = _seeded_generator() if case.generator else None
    kwargs = {"generator": generator} if case.generator else {}
    sample = deterministic_sample()

    if case.loop == "train":
        timesteps = list(reversed(range(scheduler.config.num_train_timesteps)))
    else:
        if case.steps is not None:
            kwargs_set = {"mu": case.mu} if case.mu is not None else {}
            if case.device is not None:
                scheduler.set_timesteps(case.steps, device=case.device, **kwargs_set)
            else:
                scheduler.set_timesteps(case.steps, **kwargs_set)
        if case.sigma_scheduler:
            sample = sample * scheduler.init_noise_sigma
        timesteps = scheduler.timesteps
        if case.loop == "img2img":
            timesteps = timesteps[case.t_start * scheduler.order :]
            if hasattr(scheduler, "scale_noise"):  # flow matching's forward process (diffusers' class has no add_noise)
                sample = scheduler.scale_noise(sample, timesteps[:1], deterministic_noise())
            else:
                sample = scheduler.add_noise(sample, deterministic_noise(), timesteps[:1])
        elif case.loop != "sample":
            raise AssertionError(f"unknown loop kind {case.loop!r}")

    for t in timesteps:
        if case.sigma_scheduler:
            sample = scheduler.scale_model_input(sample, t)
        residual = toy_model(sample, t)
        sample = scheduler.step(residual, t, sample, *case.step_args, **kwargs).prev_sample
    return sample


def _check_numbers(sample: torch.Tensor, case: Case, who: str) -> None:
    assert not torch.isnan(sample).any(), f"{who}: NaN in the final sample"
    result_sum = sample.abs().sum().item()
    result_mean = sample.abs().mean().item()
    detail = (
        f"{who} [{case.id}]: sum {result_sum:.6f} (expected {case.expected_sum}), "
        f"mean {result_mean:.6g} (expected {case.expected_mean}); source: {case.source}"
    )
    if case.expected_sum is not None:
        assert abs(result_sum - case.expected_sum) < case.sum_tol, detail
    assert abs(result_mean - case.expected_mean) < case.mean_tol, detail


# ---------------------------------------------------------------------------------------------------------
# Tests

REGRESSION_CLASSES = (
    "DDPMScheduler",
    "DDIMScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "FlowMatchEulerDiscreteScheduler",
)


def test_fixtures_match_diffusers_layout():
    sample, noise = deterministic_sample(), deterministic_noise()
    assert sample.shape == noise.shape == (BATCH, CHANNELS, HEIGHT, WIDTH)
    assert not sample.is_contiguous(), "diffusers' dummy_sample_deter is a permuted (non-contiguous) view"
    n = sample.numel()
    # memory order (C, H, W, B): batch is the fastest-moving index
    ramp = torch.arange(n, dtype=torch.float64) / n
    assert torch.equal(sample.permute(1, 2, 3, 0).reshape(-1), ramp.float())
    assert torch.equal(noise.permute(1, 2, 3, 0).reshape(-1), ramp.flip(0).float())
    torch.testing.assert_close(sample + noise, torch.full_like(sample, (n - 1) / n), rtol=0, atol=1e-7)


@pytest.mark.filterwarnings("ignore:.*algorithm_types? dpmsolver and sde-dpmsolver.*:FutureWarning")
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_regression_numbers_with_diffusers(case):
    scheduler = getattr(diffusers, case.cls).from_config(_diffusers_config(case))
    _check_numbers(run_loop(scheduler, case), case, f"diffusers {diffusers.__version__}")


FASTDIFF_CASES = [
    pytest.param(case, backend, id=f"{case.id}-{backend}")
    for case in CASES
    if hasattr(fastdiff, case.cls)
    for backend in ("reference", "triton")
]


@pytest.mark.filterwarnings("ignore:algorithm_type .* is deprecated:FutureWarning")
@pytest.mark.parametrize("case,backend", FASTDIFF_CASES)
def test_regression_numbers_with_fastdiff(case, backend):
    reason = ops.unavailable(backend, torch.device("cpu"))
    if reason is not None:
        pytest.skip(f"backend {backend!r} cannot run on the CPU here: {reason}")
    cls = getattr(fastdiff, case.cls)
    scheduler = cls.from_config(_diffusers_config(case), backend=backend)
    sample = run_loop(scheduler, case)
    assert scheduler.last_backend == backend
    _check_numbers(sample, case, f"fastdiff {backend}")


def test_all_regression_classes_exist():
    """Every scheduler with diffusers regression cases above has a fastdiff drop-in, so none of the cases is
    silently left out of test_regression_numbers_with_fastdiff."""
    missing = [name for name in REGRESSION_CLASSES if not hasattr(fastdiff, name)]
    assert not missing, f"fastdiff lacks {missing}: their diffusers regression cases are not run"
    assert {c.cls for c in CASES} <= set(REGRESSION_CLASSES)
