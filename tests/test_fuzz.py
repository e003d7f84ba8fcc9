"""Differential fuzzing: hypothesis draws a scheduler config (every constructor knob of every registered
scheduler), a step count or custom timesteps, the ``step`` options, a shape (3-D to 5-D, odd sizes, batch 1,
one element), a dtype, strided inputs and classifier-free guidance; then one loop runs on diffusers, on
fastdiff's reference and on every fast backend, step by step on the same inputs.

fp32: within 1e-5 relative of diffusers and of the reference, or, where diffusers' own float32 result is off
the float64 truth (fastdiff's reference in float64 on the same inputs and noise) by more than that, at least
as accurate as diffusers (``helpers.assert_fp32``). fp16/bf16: error against fp32 diffusers within twice
plain PyTorch's (diffusers in that dtype; ``helpers.assert_lowp``).

Profiles (``tests/conftest.py``): ``FASTDIFF_FUZZ=ci`` (the default: few examples, derandomized, bounded
time), ``FASTDIFF_FUZZ=long`` for local runs (``FASTDIFF_FUZZ=long python -m pytest tests/test_fuzz.py -n 2``).
The knob tables live here, not in the library: a test checks that they name every constructor argument and
every ``step`` option of every registered scheduler, so a new knob cannot go unfuzzed.
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import math
from unittest import mock

import numpy as np
import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_lowp, describe_diff, rel_err

import fastdiff.schedulers._base as base
from fastdiff.schedulers import SCHEDULERS

diffusers = pytest.importorskip("diffusers")
hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, note, reject  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RTOL32 = 1e-5
LOWP = (torch.float16, torch.bfloat16)
# the step arguments every scheduler shares; the rest of a `step` signature are the sampler's own options
COMMON_STEP_ARGS = {
    "self",
    "model_output",
    "timestep",
    "sample",
    "generator",
    "variance_noise",
    "return_dict",
    "guidance_scale",
    "guidance_rescale",
    "noise_seed",
}


# ------------------------------------------------------------------ knob tables

_flag = st.booleans()
_spacing = st.sampled_from(["leading", "trailing", "linspace"])
_betas = {
    "num_train_timesteps": st.sampled_from([1000, 1000, 500, 97, 40]),
    "beta_start": st.sampled_from([0.0001, 0.00085]) | st.floats(1e-5, 2e-3),
    "beta_end": st.sampled_from([0.02, 0.012]) | st.floats(5e-3, 0.04),
    "beta_schedule": st.sampled_from(["linear", "scaled_linear", "squaredcos_cap_v2"]),
    # an increasing curve of num_train_timesteps betas (built in _coherent: its length follows the draw above)
    "trained_betas": st.none() | st.floats(1.0, 1.5),
    "timestep_spacing": _spacing,
    "steps_offset": st.sampled_from([0, 1]),
    "rescale_betas_zero_snr": _flag,
}
_clipping = {
    "clip_sample": _flag,
    "clip_sample_range": st.sampled_from([1.0]) | st.floats(0.3, 3.0),
    "thresholding": _flag,
    "dynamic_thresholding_ratio": st.sampled_from([0.995]) | st.floats(0.5, 0.999),
    "sample_max_value": st.sampled_from([1.0]) | st.floats(1.0, 3.0),
}
_sigma_spacing = {
    # at most one is kept (_coherent): diffusers and fastdiff both refuse two, tested in test_sigma_schedulers
    "use_karras_sigmas": _flag,
    "use_exponential_sigmas": _flag,
    "use_beta_sigmas": _flag,
}
KNOBS = {
    "DDPMScheduler": {
        **_betas,
        **_clipping,
        "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction"]),
        "variance_type": st.sampled_from(
            ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range"]
        ),
    },
    "DDIMScheduler": {
        **_betas,
        **_clipping,
        "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction"]),
        "set_alpha_to_one": _flag,
    },
    "EulerDiscreteScheduler": {
        **_betas,
        **_sigma_spacing,
        "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction", "original_sample"]),
        "interpolation_type": st.sampled_from(["linear", "log_linear"]),
        "sigma_min": st.none() | st.floats(0.002, 0.5),
        "sigma_max": st.none() | st.floats(2.0, 80.0),
        "timestep_type": st.sampled_from(["discrete", "continuous"]),
        "final_sigmas_type": st.sampled_from(["zero", "sigma_min"]),
    },
    "EulerAncestralDiscreteScheduler": {
        **_betas,
        # "sample" is refused by both: fastdiff at construction, diffusers 0.42 at the first step
        # (NotImplementedError)
        "prediction_type": st.sampled_from(["epsilon", "v_prediction"]),
    },
    "DPMSolverMultistepScheduler": {
        **_betas,
        **_sigma_spacing,
        "thresholding": _flag,
        "dynamic_thresholding_ratio": _clipping["dynamic_thresholding_ratio"],
        "sample_max_value": _clipping["sample_max_value"],
        "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction"]),
        "solver_order": st.sampled_from([1, 2, 3]),
        # "deis" and "logrho"/"bh1"/"bh2" are other schedulers' names that diffusers maps onto its own
        "algorithm_type": st.sampled_from(["dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver", "deis"]),
        "solver_type": st.sampled_from(["midpoint", "heun", "logrho", "bh2"]),
        "lower_order_final": _flag,
        "euler_at_final": _flag,
        "use_lu_lambdas": _flag,
        "use_flow_sigmas": _flag,
        "flow_shift": st.sampled_from([1.0, 3.0]) | st.floats(0.5, 5.0),
        "use_dynamic_shifting": _flag,  # with flow sigmas: set_timesteps(mu=...) (scheduler_cases draws it)
        "time_shift_type": st.just("exponential"),  # diffusers' set_timesteps(mu=) asserts "exponential"
        "final_sigmas_type": st.sampled_from(["zero", "sigma_min"]),
        "lambda_min_clipped": st.just(-math.inf) | st.floats(-8.0, -1.0),
        "variance_type": st.sampled_from([None, "learned", "learned_range"]),
    },
}
KNOBS["FlowMatchEulerDiscreteScheduler"] = {
    "num_train_timesteps": st.sampled_from([1000, 1000, 500, 97]),
    "shift": st.sampled_from([1.0, 3.0]) | st.floats(0.5, 6.0),
    "use_dynamic_shifting": _flag,  # set_timesteps(mu=...) (scheduler_cases draws it)
    # read only by calculate_shift, which a pipeline calls to get mu
    "base_shift": st.just(0.5),
    "max_shift": st.just(1.15),
    "base_image_seq_len": st.just(256),
    "max_image_seq_len": st.just(4096),
    "invert_sigmas": _flag,
    "shift_terminal": st.none() | st.floats(0.02, 0.3),
    **_sigma_spacing,
    "time_shift_type": st.sampled_from(["exponential", "linear"]),
    "stochastic_sampling": _flag,
}
KNOBS["UniPCMultistepScheduler"] = {
    **_betas,
    **_sigma_spacing,
    "thresholding": _flag,
    "dynamic_thresholding_ratio": _clipping["dynamic_thresholding_ratio"],
    "sample_max_value": _clipping["sample_max_value"],
    "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction"]),
    "solver_order": st.sampled_from([1, 2, 3]),
    "predict_x0": _flag,
    "solver_type": st.sampled_from(["bh1", "bh2"]),
    "lower_order_final": _flag,
    "disable_corrector": st.sampled_from([[], [0], [1, 2]]),
    "solver_p": st.none(),  # another scheduler as the predictor: not a knob of this one's arithmetic
    "use_flow_sigmas": _flag,
    "flow_shift": st.sampled_from([1.0, 3.0]) | st.floats(0.5, 5.0),
    "final_sigmas_type": st.sampled_from(["zero", "sigma_min"]),
    "use_dynamic_shifting": _flag,
    "time_shift_type": st.just("exponential"),
    "sigma_min": st.none(),
    "sigma_max": st.none(),
    "shift_terminal": st.none(),
}
KNOBS["PNDMScheduler"] = {
    **{k: v for k, v in _betas.items() if k != "rescale_betas_zero_snr"},
    "skip_prk_steps": _flag,
    "set_alpha_to_one": _flag,
    "prediction_type": st.sampled_from(["epsilon", "v_prediction"]),
}
KNOBS["LCMScheduler"] = {
    **_betas,
    **_clipping,
    "original_inference_steps": st.sampled_from([50, 50, 12, 7]),
    "set_alpha_to_one": _flag,
    "prediction_type": st.sampled_from(["epsilon", "sample", "v_prediction"]),
    "timestep_scaling": st.sampled_from([10.0]) | st.floats(1.0, 20.0),
}
STEP_KNOBS = {
    "DDPMScheduler": {},
    "DDIMScheduler": {
        "eta": st.sampled_from([0.0, 1.0]) | st.floats(0.0, 1.0),
        "use_clipped_model_output": _flag,
    },
    "EulerDiscreteScheduler": {
        "s_churn": st.sampled_from([0.0]) | st.floats(0.0, 5.0),
        "s_tmin": st.sampled_from([0.0]) | st.floats(0.0, 2.0),
        "s_tmax": st.sampled_from([math.inf]) | st.floats(2.0, 100.0),
        "s_noise": st.sampled_from([1.0]) | st.floats(0.5, 1.5),
    },
    "EulerAncestralDiscreteScheduler": {},
    "DPMSolverMultistepScheduler": {},
    "FlowMatchEulerDiscreteScheduler": {
        "s_churn": st.just(0.0),  # in the signature; diffusers' flow-match step ignores them
        "s_tmin": st.just(0.0),
        "s_tmax": st.just(math.inf),
        "s_noise": st.just(1.0),
        "per_token_timesteps": st.none(),
    },
    "UniPCMultistepScheduler": {},
    "PNDMScheduler": {},
    "LCMScheduler": {},
}
# set_timesteps(timesteps=...) / (sigmas=...) where the scheduler takes them
CUSTOM = {
    "DDPMScheduler": ("timesteps",),
    "DDIMScheduler": ("timesteps",),  # fastdiff's extension: diffusers' DDIM has none (compared with the reference)
    "EulerDiscreteScheduler": ("timesteps", "sigmas"),
    "EulerAncestralDiscreteScheduler": (),
    "DPMSolverMultistepScheduler": ("timesteps",),
    "FlowMatchEulerDiscreteScheduler": ("timesteps", "sigmas"),
    "UniPCMultistepScheduler": ("sigmas",),
    "PNDMScheduler": (),
    "LCMScheduler": ("timesteps",),
}
NAMES = sorted(SCHEDULERS)


def _init_params(cls) -> set:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "backend"}


def _step_options(cls) -> set:
    return set(inspect.signature(cls.step).parameters) - COMMON_STEP_ARGS


def test_knob_tables_name_every_argument():
    """Every registered scheduler has a knob table here naming each constructor argument and step option."""
    for name, cls in SCHEDULERS.items():
        assert name in KNOBS and name in STEP_KNOBS and name in CUSTOM, f"{name}: no fuzz knob table"
        assert set(KNOBS[name]) == _init_params(cls), (
            f"{name}: knob table {sorted(KNOBS[name])} != constructor {sorted(_init_params(cls))}"
        )
        assert set(STEP_KNOBS[name]) == _step_options(cls), f"{name}: step knobs != {sorted(_step_options(cls))}"
        custom = {"timesteps", "sigmas"} & set(inspect.signature(cls.set_timesteps).parameters)
        assert set(CUSTOM[name]) == custom, f"{name}: custom schedules {CUSTOM[name]} != set_timesteps' {custom}"


def _coherent(name: str, cfg: dict) -> dict:
    """Turn a draw into one config: combinations both libraries refuse are mapped to accepted ones."""
    cfg = dict(cfg)
    if cfg.get("trained_betas") is not None:
        T = cfg["num_train_timesteps"]
        cfg["trained_betas"] = (torch.linspace(2e-4, 0.02, T, dtype=torch.float64) ** cfg["trained_betas"]).tolist()
    flags = [k for k in _sigma_spacing if cfg.get(k)]
    for k in flags[1:]:
        cfg[k] = False
    if cfg.get("use_dynamic_shifting") and not _flow(name, cfg):
        cfg["use_dynamic_shifting"] = False  # dynamic shifting moves flow sigmas only
    if cfg.get("rescale_betas_zero_snr") and cfg.get("prediction_type") == "epsilon":
        # zero terminal SNR makes x0 = (x - eps) / sqrt(abar) undefined at abar = 0 (inf in both libraries): it
        # is meant for v-prediction, as diffusers' docs say
        cfg["prediction_type"] = "v_prediction"
    if name == "LCMScheduler":  # LCM's training schedule: every (T // original_inference_steps)-th step
        cfg["original_inference_steps"] = min(cfg["original_inference_steps"], cfg["num_train_timesteps"])
    if name == "DPMSolverMultistepScheduler":
        if cfg["algorithm_type"] in ("dpmsolver", "sde-dpmsolver"):
            cfg["final_sigmas_type"] = "sigma_min"  # required by both (their update divides by sigma = 0)
        if cfg["algorithm_type"] == "sde-dpmsolver":
            cfg["solver_order"] = min(cfg["solver_order"], 2)  # no third-order SDE-DPM-Solver in diffusers
        if cfg["use_lu_lambdas"]:
            for k in _sigma_spacing:
                cfg[k] = False
    if name in ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler") and cfg["use_flow_sigmas"]:
        # these spacings give VP sigmas (up to 157) that diffusers then reads as flow sigmas: alpha = 1 - sigma < 0,
        # NaN from the first step in both libraries (only UniPC's Karras spacing maps to flow, s / (s + 1))
        vp_only = ["use_exponential_sigmas", "use_beta_sigmas", "use_karras_sigmas", "use_lu_lambdas"]
        for k in vp_only[: 2 if name == "UniPCMultistepScheduler" else 4]:
            cfg[k] = False
    if name == "UniPCMultistepScheduler" and cfg["solver_order"] == 3 and not cfg["lower_order_final"]:
        # UniP-3 onto sigma = 0: lambda_t = inf makes both history ratios r_k 0 and R singular (diffusers and the
        # reference raise LinAlgError at the last step); tests/test_unipc.py's "no-lower-order-final" likewise
        cfg["final_sigmas_type"] = "sigma_min"
    return cfg


@st.composite
def scheduler_cases(draw, name: str):
    cfg = _coherent(name, {k: draw(v) for k, v in KNOBS[name].items()})
    step_kwargs = {k: draw(v) for k, v in STEP_KNOBS[name].items()}
    T = cfg["num_train_timesteps"]
    customs = CUSTOM[name]
    if name == "DPMSolverMultistepScheduler" and _flow(name, cfg):
        # refused by both: fastdiff with a ValueError (tests/test_dpmsolver_flow.py), diffusers 0.42 with a TypeError
        # (its flow branch computes num_inference_steps + 1 with num_inference_steps None)
        customs = ()
    custom = draw(st.sampled_from((None,) + customs))
    if custom == "timesteps":
        values = draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=8, unique=True))
        set_kwargs = {"timesteps": sorted(values, reverse=True)}
        if name == "EulerDiscreteScheduler":  # Euler takes float timesteps
            set_kwargs["timesteps"] = [float(v) + draw(st.sampled_from([0.0, 0.5])) * (v < T - 1) for v in values]
            set_kwargs["timesteps"].sort(reverse=True)
    elif custom == "sigmas" and _flow(name, cfg):  # flow sigmas in (0, 1]; the scheduler appends the last
        values = draw(st.lists(st.floats(0.02, 1.0), min_size=1, max_size=8, unique=True))
        set_kwargs = {"sigmas": sorted(values, reverse=True)}
    elif custom == "sigmas":
        values = draw(st.lists(st.floats(0.02, 30.0), min_size=1, max_size=8, unique=True))
        set_kwargs = {"sigmas": sorted(values, reverse=True) + [draw(st.sampled_from([0.0, 0.01]))]}
    else:
        most = min(T, 12, cfg.get("original_inference_steps", T))  # LCM samples from its training schedule
        set_kwargs = {"num_inference_steps": draw(st.integers(1, most))}
    if cfg.get("use_dynamic_shifting"):
        set_kwargs["mu"] = draw(st.floats(0.2, 1.5))  # what calculate_shift gives for 256-4096 tokens
    return cfg, set_kwargs, step_kwargs


def _flow(name: str, cfg: dict) -> bool:
    return name == "FlowMatchEulerDiscreteScheduler" or bool(cfg.get("use_flow_sigmas"))


@st.composite
def tensor_cases(draw):
    ndim = draw(st.integers(3, 5))
    batch = draw(st.sampled_from([1, 1, 2, 3]))
    rest = draw(st.lists(st.integers(1, 7), min_size=ndim - 1, max_size=ndim - 1))
    if draw(st.booleans()):
        rest = [1] * len(rest)  # one element per sample
    layouts = st.sampled_from(["contiguous", "sliced", "permuted", "batch_strided"])
    guidance = draw(st.sampled_from([None, None, 4.5]))
    # guidance_rescale divides by each sample's std: undefined (NaN in diffusers too) for one element per sample
    rescale = draw(st.sampled_from([0.0, 0.7])) if math.prod(rest) > 1 else 0.0
    return dict(
        shape=(batch, *rest),
        dtype=draw(st.sampled_from([torch.float32, torch.float32, torch.float16, torch.bfloat16])),
        x_layout=draw(layouts),
        m_layout=draw(layouts),
        guidance=guidance,
        guidance_rescale=rescale,
        seed=draw(st.integers(0, 2**16)),
    )


# ------------------------------------------------------------------ running one loop everywhere


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` in a non-contiguous layout."""
    if layout == "sliced":  # padded last dimension
        big = torch.randn((*t.shape[:-1], t.shape[-1] + 3), dtype=t.dtype, device=t.device)
        big[..., 1:-2] = t
        return big[..., 1:-2]
    if layout == "permuted":  # dimensions stored in reverse order
        dims = list(range(t.ndim))[::-1]
        return t.permute(dims).contiguous().permute(dims)
    if layout == "batch_strided":  # every other sample of a larger batch
        big = torch.randn((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        big[::2] = t
        return big[::2]
    return t.contiguous()


def _learned(name: str, cfg: dict) -> str | None:
    """The learned-variance type when the model output carries one (doubled channels), else None."""
    vt = cfg.get("variance_type")
    if vt not in ("learned", "learned_range"):
        return None
    if name == "DPMSolverMultistepScheduler" and cfg["prediction_type"] != "epsilon":
        return None  # DPM-Solver reads a variance half only for epsilon prediction, as diffusers does
    return vt


def _for_diffusers(name: str, cfg: dict, m: torch.Tensor, channels: int) -> torch.Tensor:
    """The model output diffusers' step gets. diffusers 0.42's DPM-Solver takes ``model_output[:, :3]`` for a
    learned variance (three channels hard-coded: wrong for C != 3); fastdiff takes the first C. diffusers
    gets the epsilon half with variance_type None, the same computation without that slice."""
    if name == "DPMSolverMultistepScheduler" and _learned(name, cfg):
        return m[:, :channels]
    return m


def _model_output(shape, learned, gen, device) -> torch.Tensor:
    eps = torch.randn(shape, generator=gen).to(device)
    if learned == "learned":  # a predicted variance: positive
        return torch.cat([eps, (torch.rand(shape, generator=gen) * 0.05 + 1e-4).to(device)], dim=1)
    if learned == "learned_range":  # an interpolation weight in [-1, 1]
        return torch.cat([eps, (torch.rand(shape, generator=gen) * 2 - 1).to(device)], dim=1)
    return eps


def _diffusers_config(name: str, cfg: dict) -> dict:
    if cfg.get("variance_type") == "fixed_large_log":
        # diffusers 0.42 adds sqrt(log(beta_t)) noise for it (NaN; test_step_equivalence documents it);
        # fastdiff uses beta_t, fixed_large's variance
        return dict(cfg, variance_type="fixed_large")
    if name == "DPMSolverMultistepScheduler" and _learned(name, cfg):
        return dict(cfg, variance_type=None)  # see _for_diffusers
    return cfg


def _begin(s):
    """Start the loop at the first step, as fastdiff.sample and diffusers' pipelines with a begin index do:
    finding it by value takes the second of repeated timesteps (karras sigmas on a cosine schedule round
    several steps to t=999), and then diffusers and fastdiff alike run past the end of the schedule."""
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(0)
    return s


def _diffusers(name, cfg, set_kwargs, device):
    """diffusers' scheduler with its timesteps set, or None where it has no such schedule (DDIM's custom
    timesteps); an example diffusers refuses is rejected."""
    if name == "DDIMScheduler" and "timesteps" in set_kwargs:
        return None
    if "sigmas" in set_kwargs:
        # as diffusers' pipelines pass them (np.linspace): diffusers 0.42's UniPC computes on the argument as it
        # comes, `flow_shift * sigmas` or `1 / sigmas - 1` (TypeError on a list); fastdiff takes either
        set_kwargs = dict(set_kwargs, sigmas=np.asarray(set_kwargs["sigmas"], dtype=np.float64))
    try:
        d = getattr(diffusers, name)(**_diffusers_config(name, cfg))
        d.set_timesteps(**set_kwargs, device=device)
        _begin(d)
    except (ValueError, NotImplementedError, AssertionError, IndexError) as exc:
        note(f"diffusers refuses the config: {type(exc).__name__}: {exc}")
        reject()
    return d


def _build(name, cfg, set_kwargs, device, backends):
    """(diffusers scheduler or None, {backend: fastdiff scheduler}, float64 truth scheduler)."""
    d = _diffusers(name, cfg, set_kwargs, device)
    fast = {}
    for b in ["reference", *backends, "truth"]:
        try:
            s = SCHEDULERS[name](**cfg, backend="reference" if b == "truth" else b)
            s.set_timesteps(**set_kwargs, device=device)
            _begin(s)
        except ValueError as exc:
            assert "not supported by fastdiff" in str(exc), f"fastdiff refuses a config diffusers accepts: {exc}"
            reject()
        fast[b] = s
    truth = fast.pop("truth")
    for attr in ("alphas_cumprod", "final_alpha_cumprod", "sigmas"):  # the schedule's float32 values, in float64
        if isinstance(getattr(truth, attr, None), torch.Tensor):
            setattr(truth, attr, getattr(truth, attr).double())
    if d is not None:
        for s in fast.values():
            # NaN where diffusers has NaN: shift_terminal on one flow step stretches 1 - sigma = 0 by 0 / 0 in both
            ts, td = s.timesteps.double().cpu(), d.timesteps.double().cpu()
            same = ts.shape == td.shape and bool(((ts == td) | (ts.isnan() & td.isnan())).all())
            assert same, f"timesteps {s.timesteps} != diffusers' {d.timesteps}"
            if hasattr(d, "sigmas"):
                sd = d.sigmas.double().to(device)
                torch.testing.assert_close(s.sigmas.double(), sd, rtol=0, atol=0, equal_nan=True)
    return d, fast, truth


@contextlib.contextmanager
def _fixed_noise(z, diffusers_scheduler):
    """Every Gaussian draw of a step (fastdiff's and diffusers') returns ``z`` in the requested dtype: the
    low-precision rule needs the same noise numbers in the fp32 reference, plain PyTorch and fastdiff."""
    fake = lambda shape, generator=None, device=None, dtype=None, **k: z.to(device=device, dtype=dtype)
    patches = [mock.patch.object(base, "randn_tensor", fake)]
    if diffusers_scheduler is not None:
        module = importlib.import_module(type(diffusers_scheduler).__module__)
        if hasattr(module, "randn_tensor"):
            patches.append(mock.patch.object(module, "randn_tensor", fake))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


@contextlib.contextmanager
def _recording_noise(record: list):
    """Record the Gaussian draws fastdiff's step makes (from the step's generator) for the float64 truth."""
    real = base.randn_tensor

    def recorder(*args, **kwargs):
        z = real(*args, **kwargs)
        record.append(z)
        return z

    with mock.patch.object(base, "randn_tensor", recorder):
        yield


def _guided(m, g, rescale):
    """The guided model output as a diffusers pipeline forms it, for diffusers' step."""
    from diffusers.guiders.guider_utils import rescale_noise_cfg

    uncond, cond = m.chunk(2)
    out = uncond + g * (cond - uncond)
    return rescale_noise_cfg(out, cond, guidance_rescale=rescale) if rescale else out


def assert_fp32(actual, expected, truth_fn, rtol, what, inputs=()):
    """fp32 agreement: within ``rtol`` relative of ``expected``, or at least as accurate against the float64
    truth: error within ``rtol``, within twice ``expected``'s own error, or within 4 float32 ulps of the largest
    input relative to the result (a step that cancels large inputs to a small result, such as Euler ancestral
    from sigma = 4096 on a zero-terminal-SNR schedule, loses that much in any float32 implementation: on
    (4, 4, 16, 16) diffusers errs 6.9-8.7e-5 there, fastdiff 5.2-7.2e-5; on two elements diffusers happened
    to err 5.4e-6 and fastdiff 4.5e-5). ``helpers.assert_fp32`` applies the second branch only where
    ``expected`` is off the truth by more than ``rtol``; fuzzing finds steps where both are within ``rtol`` of
    the truth and still differ by slightly more (1.008e-5, with errors 4.7e-6 and 7.4e-6)."""
    err = rel_err(actual, expected)
    if err <= rtol:
        return
    truth = truth_fn()
    err_fast, err_other = rel_err(actual, truth), rel_err(expected, truth)
    scale = truth.detach().abs().max().item()
    big = max((t.detach().abs().max().item() for t in inputs), default=0.0)
    floor = 4 * torch.finfo(torch.float32).eps * big / scale if scale > 0 else 0.0
    assert err_fast <= max(rtol, 2 * err_other, floor), (
        f"{what}: relative error {err:.3e} > {rtol:.1e}; vs float64 truth: this {err_fast:.3e}, the other "
        f"{err_other:.3e} (conditioning floor {floor:.1e}); {describe_diff(actual, expected)}"
    )


def assert_lowp_finite(actual, plain, ref32, what):
    """``helpers.assert_lowp`` (error against fp32 within twice plain PyTorch's), on the elements both results
    hold; and the result may be non-finite only where plain PyTorch's is too, or where the fp32 value itself does
    not fit the dtype. (At abar = 2.4e-9, the end of a cosine schedule, x0 is about 86,500: past float16's 65,504,
    so diffusers' and the op-by-op reference's float16 results are inf or NaN there, and the fused kernels'
    x0 output is inf too; their float32-computed prev_sample stays finite.)"""
    fits = torch.isfinite(ref32) & (ref32.abs() <= torch.finfo(actual.dtype).max)
    worse = ~torch.isfinite(actual) & torch.isfinite(plain) & fits
    assert not worse.any(), f"{what}: {int(worse.sum())} non-finite values where plain PyTorch is finite"
    both = torch.isfinite(actual) & torch.isfinite(plain) & fits
    if both.all():
        assert_lowp(actual, plain, ref32, what)
    elif both.any():
        assert_lowp(actual[both], plain[both], ref32[both], f"{what} (on the {int(both.sum())} finite values)")


def _step(s, m, t, x, step_kwargs, seed, device, guidance=None, rescale=0.0):
    if hasattr(s, "scale_model_input"):
        s.scale_model_input(x, t)
    kw = dict(step_kwargs)
    if "generator" in inspect.signature(s.step).parameters:  # UniPC's step draws no noise and takes none
        kw["generator"] = torch.Generator(device).manual_seed(seed)
    if guidance is not None:
        kw.update(guidance_scale=guidance, guidance_rescale=rescale)
    return s.step(m, t, x, **kw)


def _x0(out):
    return getattr(out, "pred_original_sample", None)


def run_case(name, cfg, set_kwargs, step_kwargs, case, device, backends):
    """One loop on every implementation, step by step, each step fed the same inputs."""
    d, fast, truth = _build(name, cfg, set_kwargs, device, backends)
    lowp = case["dtype"] in LOWP
    guidance = case["guidance"] if not _learned(name, cfg) else None  # a learned variance is guided before the step
    d_lo = fast_lo = None
    if lowp:  # plain PyTorch at low precision: diffusers, or fastdiff's reference where diffusers has no such loop
        d_lo = _diffusers(name, cfg, set_kwargs, device)
        fast_lo = SCHEDULERS[name](**cfg, backend="reference")
        fast_lo.set_timesteps(**set_kwargs, device=device)
        _begin(fast_lo)
    gen = torch.Generator().manual_seed(case["seed"])
    shape = case["shape"]
    ref_sched = d if d is not None else fast["reference"]
    x = (torch.randn(shape, generator=gen) * float(getattr(ref_sched, "init_noise_sigma", 1.0))).to(device)
    steps = len(ref_sched.timesteps)
    for i in range(steps):
        t_of = lambda s: s.timesteps[i]  # noqa: B023
        mshape = (shape[0] * (2 if guidance is not None else 1), *shape[1:])
        m = _model_output(mshape, _learned(name, cfg), gen, device)
        seed = 1000 + i
        what = f"{name} step {i}/{steps} t={float(t_of(ref_sched)):g}"
        if lowp:
            x = x.to(case["dtype"])
            m = m.to(case["dtype"])
            z = torch.randn(shape, generator=gen).to(device).to(case["dtype"]).float()
            with _fixed_noise(z, d):
                ref_in = m.float() if guidance is None else _guided(m.float(), guidance, case["guidance_rescale"])
                plain_in = m if guidance is None else _guided(m, guidance, case["guidance_rescale"])
                if d is not None:
                    ref_in, plain_in = (_for_diffusers(name, cfg, v, shape[1]) for v in (ref_in, plain_in))
                ref32 = _step(
                    d if d is not None else fast["reference"],
                    ref_in,
                    t_of(ref_sched),
                    x.float(),
                    step_kwargs,
                    seed,
                    device,
                )
                plain = _step(
                    d_lo if d_lo is not None else fast_lo, plain_in, t_of(ref_sched), x, step_kwargs, seed, device
                )
                for b, s in fast.items():
                    if b == "reference" and d is None:
                        continue  # it is the fp32 reference here
                    xs, ms = _laid_out(x, case["x_layout"]), _laid_out(m, case["m_layout"])
                    out = _step(s, ms, t_of(s), xs, step_kwargs, seed, device, guidance, case["guidance_rescale"])
                    assert out.prev_sample.dtype == plain.prev_sample.dtype, f"{what} [{b}]: prev_sample dtype"
                    assert_lowp_finite(
                        out.prev_sample, plain.prev_sample, ref32.prev_sample, f"{what} [{b}] prev_sample"
                    )
                    if _x0(out) is not None and _x0(plain) is not None:
                        assert_lowp_finite(_x0(out), _x0(plain), _x0(ref32), f"{what} [{b}] pred_original_sample")
            # plain PyTorch's trajectory; where it went non-finite, the fp32 one (so later steps still compare)
            x = torch.where(torch.isfinite(plain.prev_sample), plain.prev_sample, ref32.prev_sample.to(x.dtype))
            continue
        noise: list = []
        outs = {}
        for b, s in fast.items():
            xs, ms = _laid_out(x, case["x_layout"]), _laid_out(m, case["m_layout"])
            with _recording_noise(noise if not noise else []):  # the first backend's draws
                outs[b] = _step(s, ms, t_of(s), xs, step_kwargs, seed, device, guidance, case["guidance_rescale"])
            # a config the coefficient row cannot express runs the reference by design (StepPlan.reference_only,
            # e.g. DPM-Solver's noise-prediction algorithms with thresholding)
            assert s.last_backend in (b, "reference"), f"{what}: asked for {b}, ran {s.last_backend}"
        m_plain = m if guidance is None else _guided(m, guidance, case["guidance_rescale"])
        m_d = _for_diffusers(name, cfg, m_plain, shape[1])
        out_d = _step(d, m_d, t_of(d), x, step_kwargs, seed, device) if d is not None else None
        z = noise[0].double() if noise else None
        with mock.patch.object(base, "randn_tensor", lambda *a, **k: z):
            # the truth's multistep history must advance every step, so it runs now
            out_t = _step(truth, m_plain.double(), t_of(truth), x.double(), step_kwargs, seed, device)
        for b, out in outs.items():
            targets = [("diffusers", out_d)] if out_d is not None else []
            targets += [("reference", outs["reference"])] if b != "reference" else []
            for who, exp in targets:
                assert out.prev_sample.shape == exp.prev_sample.shape, f"{what} [{b}]: shape vs {who}"
                assert out.prev_sample.dtype == exp.prev_sample.dtype, f"{what} [{b}]: dtype vs {who}"
                assert_fp32(
                    out.prev_sample,
                    exp.prev_sample,
                    lambda: out_t.prev_sample,  # noqa: B023
                    RTOL32,
                    f"{what} [{b}] prev_sample vs {who}",
                    inputs=(x,),
                )
                if _x0(out) is not None and _x0(exp) is not None:
                    x0_truth = lambda: _x0(out_t)  # noqa: B023, E731
                    assert_fp32(_x0(out), _x0(exp), x0_truth, RTOL32, f"{what} [{b}] x0 vs {who}", inputs=(x,))
        x = (out_d if out_d is not None else outs["reference"]).prev_sample


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_fuzz_matches_diffusers_and_reference(name, device, data):
    cfg, set_kwargs, step_kwargs = data.draw(scheduler_cases(name), label="config")
    case = data.draw(tensor_cases(), label="tensors")
    assume(not (_learned(name, cfg) and len(case["shape"]) < 3))
    run_case(name, cfg, set_kwargs, step_kwargs, case, device, available_backends(device))


def _defaults(name: str) -> dict:
    params = inspect.signature(SCHEDULERS[name].__init__).parameters
    return {k: params[k].default for k in _init_params(SCHEDULERS[name])}


# examples the long profile found, replayed here in every run: (scheduler, config changes, set_timesteps kwargs)
FOUND = {
    # custom flow sigmas as a list: diffusers' UniPC raised TypeError on it (tests must pass an array, see _diffusers)
    "unipc-flow-sigmas-list": (
        "UniPCMultistepScheduler",
        dict(use_flow_sigmas=True, flow_shift=4.4),
        {"sigmas": [0.868, 0.833, 0.746, 0.4, 0.38, 0.227]},
    ),
    "unipc-dynamic-shift-sigmas-list": (
        "UniPCMultistepScheduler",
        dict(use_flow_sigmas=True, use_dynamic_shifting=True),
        {"sigmas": [0.868, 0.4, 0.17], "mu": 1.25},
    ),
    # shift_terminal on a one-step flow schedule: NaN timestep and sigma in both (the steps are NaN alike)
    "flow-shift-terminal-one-step": (
        "FlowMatchEulerDiscreteScheduler",
        dict(shift_terminal=0.25),
        {"num_inference_steps": 1},
    ),
    # VP-spaced sigmas read as flow sigmas: a NaN sample from the first step, which the torch backend's final step
    # (sample term dropped at coefficient 0) turned finite (mapped to plain flow sigmas by _coherent)
    "dpm-flow-beta-sigmas": (
        "DPMSolverMultistepScheduler",
        dict(use_flow_sigmas=True, use_beta_sigmas=True, prediction_type="sample", solver_order=1),
        {"num_inference_steps": 2},
    ),
    # UniP-3 onto sigma = 0 without lower_order_final: singular in both (mapped to sigma_min by _coherent)
    "unipc-order3-no-lower-order-final": (
        "UniPCMultistepScheduler",
        dict(solver_order=3, lower_order_final=False),
        {"num_inference_steps": 3},
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case_id", sorted(FOUND))
def test_fuzz_found_examples(case_id, device):
    name, changes, set_kwargs = FOUND[case_id]
    cfg = _coherent(name, {**_defaults(name), **changes})
    case = dict(
        shape=(1, 4, 2),
        dtype=torch.float32,
        x_layout="contiguous",
        m_layout="contiguous",
        guidance=None,
        guidance_rescale=0.0,
        seed=0,
    )
    run_case(name, cfg, set_kwargs, {}, case, device, available_backends(device))


def test_dpm_flow_sigmas_draw_no_custom_timesteps():
    """Both refuse DPM-Solver's flow sigmas with custom timesteps (diffusers 0.42 with a TypeError, which is not a
    refusal the loop recognizes): the draw leaves them out."""
    from hypothesis import settings

    @settings(max_examples=300, derandomize=True, database=None)
    @given(scheduler_cases("DPMSolverMultistepScheduler"))
    def check(case):
        cfg, set_kwargs, _ = case
        assert not (cfg["use_flow_sigmas"] and "timesteps" in set_kwargs)

    check()
