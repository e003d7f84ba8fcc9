"""Drop-in ``DPMSolverMultistepScheduler`` for DPM-Solver++ ("DPM++ 2M", "DPM++ 2M Karras", "DPM++ 2M SDE"):
orders 1-3, midpoint/heun, lower-order final steps, and flow mode (Sana: ``flow_prediction`` with
``use_flow_sigmas``, where alpha_t = 1 - sigma and sigma_t = sigma); one fused launch per step.

The multistep history (previous x0 predictions) lives in a static device buffer of ``solver_order``
slots written by the kernel itself, and every per-step decision (which order, which slots) is a pure
function of the step index and of how many steps this loop has taken, so a CUDA graph of the whole
loop replays it exactly.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional, Union

import numpy as np
import torch

from .. import coefs, reference
from ..schedules import (
    TIMESTEP_SPACINGS,
    check_choice,
    check_num_inference_steps,
    check_sigma_spacing_flags,
    dpm_schedule,
)
from ._base import SchedulerOutput, StepPlan
from ._predict import flow_x0, vp_x0
from ._registry import register
from ._sigma import SigmaSchedulerBase

ALGORITHMS = ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver")
PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


def _alpha_sigma(s: float, flow: bool = False) -> tuple[float, float]:
    """(alpha_t, sigma_t) of the schedule's sigma: 1 / sqrt(s^2 + 1) and s alpha_t for the VP sigmas of a beta
    schedule; 1 - s and s with flow sigmas (diffusers' ``_sigma_to_alpha_sigma_t``)."""
    if flow:
        return 1.0 - s, s
    a = 1.0 / math.sqrt(s * s + 1.0)
    return a, s * a


def _ratio(a: float, b: float) -> float:
    """a / b, inf (NaN for 0 / 0) where b = 0: repeated sigmas make diffusers' coefficients inf/NaN too."""
    if b != 0:
        return a / b
    return math.nan if a == 0 else math.copysign(math.inf, a)


def _log(a: float) -> float:
    """log(a) as torch.log gives it: -inf at 0, NaN below."""
    return math.log(a) if a > 0 else (-math.inf if a == 0 else math.nan)


def _lam(s: float, flow: bool = False) -> float:
    """lambda = log(alpha_t) - log(sigma_t), the solver's time variable: -log(s) for VP sigmas, log(1 - s) - log(s)
    for flow sigmas; inf at s = 0."""
    if s == 0:
        return math.inf
    return _log(1.0 - s) - math.log(s) if flow else -math.log(s)


def _eps_coefficients(prediction_type: str, alpha: float, sigma: float) -> tuple[float, float, float]:
    """(X_S, A_X, A_M) of the noise prediction eps = X_S (A_X x + A_M m) that DPM-Solver integrates."""
    if prediction_type == "epsilon":
        return 1.0, 0.0, 1.0
    if prediction_type == "sample":
        return 1.0 / sigma, 1.0, -alpha
    return 1.0, sigma, alpha  # v_prediction


def _first_order(algorithm: str, a_t, s_t, a_0, s_0, h) -> tuple[float, float, float]:
    """(c_x, c_d0, std): the first-order update x_t = c_x x + c_d0 D0 + std z of each algorithm."""
    em = 0.0 if math.isinf(h) else math.exp(-h)
    if algorithm == "dpmsolver++":
        return s_t / s_0, -a_t * (em - 1.0), 0.0
    if algorithm == "sde-dpmsolver++":
        return s_t / s_0 * em, a_t * (1.0 - em * em), s_t * math.sqrt(max(1.0 - em * em, 0.0))
    ep = math.exp(h)  # DPM-Solver never steps onto sigma = 0 (final_sigmas_type "sigma_min" is required)
    if algorithm == "dpmsolver":
        return a_t / a_0, -s_t * (ep - 1.0), 0.0
    return a_t / a_0, -2.0 * s_t * (ep - 1.0), s_t * math.sqrt(max(ep * ep - 1.0, 0.0))  # sde-dpmsolver


def _higher_order(algorithm: str, solver_type: str, order: int, a_t, s_t, h) -> tuple[float, float]:
    """(c_d1, c_d2) multiplying the divided differences D1, D2 in a second- or third-order update."""
    if h == 0:
        return 0.0, 0.0  # the h -> 0 limit of every variant
    em, ep = math.exp(-h), math.exp(h)
    heun = order == 3 or solver_type == "heun"
    if algorithm == "dpmsolver++":
        c_d1 = a_t * ((em - 1.0) / h + 1.0) if heun else -0.5 * a_t * (em - 1.0)
        return c_d1, -a_t * ((em - 1.0 + h) / h**2 - 0.5)
    if algorithm == "sde-dpmsolver++":
        c_d1 = a_t * ((1.0 - em * em) / (-2.0 * h) + 1.0) if heun else 0.5 * a_t * (1.0 - em * em)
        return c_d1, a_t * ((1.0 - em * em - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
    if algorithm == "dpmsolver":
        c_d1 = -s_t * ((ep - 1.0) / h - 1.0) if heun else -0.5 * s_t * (ep - 1.0)
        return c_d1, -s_t * ((ep - 1.0 - h) / h**2 - 0.5)
    c_d1 = -2.0 * s_t * ((ep - 1.0) / h - 1.0) if heun else -s_t * (ep - 1.0)  # sde-dpmsolver (orders 1-2)
    return c_d1, math.nan


@register(
    presets={
        "dpm++2m": ({}, {}),
        "dpm++2m-karras": ({"use_karras_sigmas": True}, {}),
        "dpm++2m-sde": ({"algorithm_type": "sde-dpmsolver++"}, {}),
        "dpm++2m-flow": ({"prediction_type": "flow_prediction", "use_flow_sigmas": True}, {}),
    }
)
class DPMSolverMultistepScheduler(SigmaSchedulerBase):
    """DPM-Solver multistep (Lu et al. 2022), as diffusers' ``DPMSolverMultistepScheduler``: ``algorithm_type``
    "dpmsolver++" and "sde-dpmsolver++" (data prediction), and the deprecated "dpmsolver" and "sde-dpmsolver"
    (noise prediction); ``variance_type`` "learned"/"learned_range" takes the epsilon half of a doubled model
    output. Flow mode: ``use_flow_sigmas`` (shifted by ``flow_shift``, or by e^mu from ``set_timesteps(mu=...)``
    with ``use_dynamic_shifting``) and ``prediction_type="flow_prediction"`` (x0 = x - sigma v). Extras in
    ``step``: ``guidance_scale``, ``guidance_rescale``, ``noise_seed``."""

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, list]] = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        algorithm_type: str = "dpmsolver++",
        solver_type: str = "midpoint",
        lower_order_final: bool = True,
        euler_at_final: bool = False,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_lu_lambdas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        final_sigmas_type: str = "zero",
        lambda_min_clipped: float = -float("inf"),
        variance_type: Optional[str] = None,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        *,
        backend: Optional[str] = None,
    ):
        # diffusers maps the options of the schedulers it lets you switch from (DEIS, UniPC) onto its own
        if algorithm_type == "deis":
            algorithm_type = "dpmsolver++"
        if solver_type in ("logrho", "bh1", "bh2"):
            solver_type = "midpoint"
        self._register_config(locals(), backend)
        check_choice("algorithm_type", algorithm_type, ALGORITHMS)
        if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            if final_sigmas_type == "zero":
                raise ValueError(
                    f"`final_sigmas_type`='zero' is not supported for `algorithm_type`={algorithm_type!r} (its update "
                    "divides by sigma = 0 at the end); choose 'sigma_min', as diffusers requires"
                )
            warnings.warn(
                f"algorithm_type {algorithm_type!r} is deprecated in diffusers; choose 'dpmsolver++' or "
                "'sde-dpmsolver++'",
                FutureWarning,
                stacklevel=2,
            )
        if algorithm_type == "sde-dpmsolver" and solver_order == 3:
            raise ValueError(
                "`solver_order`=3 is not defined for `algorithm_type`='sde-dpmsolver' (diffusers has no third-order "
                "SDE-DPM-Solver update and fails at the first third-order step); use solver_order 1 or 2"
            )
        check_choice("solver_type", solver_type, ("midpoint", "heun"))
        check_choice("solver_order", solver_order, (1, 2, 3))
        check_choice("prediction_type", prediction_type, PREDICTIONS)
        if prediction_type == "flow_prediction" and algorithm_type in ("dpmsolver", "sde-dpmsolver"):
            raise ValueError(
                f"`prediction_type`='flow_prediction' is not supported for `algorithm_type`={algorithm_type!r} "
                "(diffusers converts a flow prediction to x0 only, and fails at the first step); use 'dpmsolver++' "
                "or 'sde-dpmsolver++'"
            )
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
        check_sigma_spacing_flags(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self._flow_shift = flow_shift  # e^mu once set_timesteps(mu=...) has run, as diffusers keeps it
        full = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        ts = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self._install(ts, full.numpy().astype(np.float32), None)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, mu=None, timesteps=None):
        """Timesteps and sigmas for ``num_inference_steps`` steps, or custom integer ``timesteps``. ``mu`` (with
        ``use_dynamic_shifting`` and the exponential ``time_shift_type``) sets the flow shift to e^mu, for this and
        later calls, as in diffusers."""
        cfg = self.config
        if mu is not None:
            if not (cfg.use_dynamic_shifting and cfg.time_shift_type == "exponential"):
                raise ValueError(
                    f"`mu`={mu!r} needs use_dynamic_shifting=True and time_shift_type='exponential'; the config has "
                    f"use_dynamic_shifting={cfg.use_dynamic_shifting!r}, time_shift_type={cfg.time_shift_type!r}"
                )
            self._flow_shift = np.exp(mu)
        if (num_inference_steps is None) == (timesteps is None):
            raise ValueError("pass exactly one of `num_inference_steps` or `timesteps`")
        if timesteps is not None and (
            cfg.use_karras_sigmas or cfg.use_lu_lambdas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas
        ):
            raise ValueError("custom `timesteps` cannot be combined with karras/lu/exponential/beta sigmas")
        if timesteps is not None and cfg.use_flow_sigmas:
            raise ValueError(
                "custom `timesteps` cannot be combined with use_flow_sigmas=True (the flow schedule replaces them; "
                "diffusers fails on this combination); pass `num_inference_steps`"
            )
        if num_inference_steps is not None:
            check_num_inference_steps(num_inference_steps, cfg.num_train_timesteps)
        ts, sig = dpm_schedule(
            self.alphas_cumprod,
            num_inference_steps,
            spacing=cfg.timestep_spacing,
            steps_offset=cfg.steps_offset,
            lambda_min_clipped=cfg.lambda_min_clipped,
            use_karras_sigmas=cfg.use_karras_sigmas,
            use_exponential_sigmas=cfg.use_exponential_sigmas,
            use_beta_sigmas=cfg.use_beta_sigmas,
            use_lu_lambdas=cfg.use_lu_lambdas,
            use_flow_sigmas=cfg.use_flow_sigmas,
            flow_shift=self._flow_shift,
            final_sigmas_type=cfg.final_sigmas_type,
            beta_schedule=cfg.beta_schedule,
            timesteps=timesteps,
        )
        self.num_inference_steps = len(ts)
        self._install(ts, sig, device)

    def _reset_loop_state(self) -> None:
        self.lower_order_nums = 0
        self.model_outputs = [None] * self.config.solver_order  # reference backend history
        self._taken = 0  # steps taken in this loop: picks the history slots
        super()._reset_loop_state()

    def _order_at(self, i: int, lower_order_nums: int) -> int:
        cfg = self.config
        n = len(self._timestep_values)
        final = i == n - 1 and (
            cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
        )
        second = i == n - 2 and cfg.lower_order_final and n < 15
        if cfg.solver_order == 1 or lower_order_nums < 1 or final:
            return 1
        if cfg.solver_order == 2 or lower_order_nums < 2 or second:
            return 2
        return 3

    @property
    def _noise_prediction(self) -> bool:
        """DPM-Solver (not ++) integrates the noise prediction: its history holds eps, not x0."""
        return self.config.algorithm_type in ("dpmsolver", "sde-dpmsolver")

    def _channel_factors(self) -> tuple:
        """With a learned variance and epsilon prediction diffusers keeps the output's first channels (it slices 3,
        for DeepFloyd IF's 3-channel samples; here the sample's channel count, which agrees wherever diffusers
        runs): an output of the sample's channels or twice as many."""
        learned = self.config.variance_type in ("learned", "learned_range")
        return (1, 2) if learned and self.config.prediction_type == "epsilon" else (1,)

    def _coef_table(self) -> np.ndarray:
        """Rows [step i, order - 1]: the model output converted at sigma_i (to x0 for DPM-Solver++, to eps
        for DPM-Solver), then the multistep update to sigma_{i+1} (Lu et al. 2022, Algorithms 1-2)."""
        cfg = self.config
        sig = self._sigma_values.astype(np.float64)
        n = len(self._timestep_values)
        table = np.zeros((n, 3, coefs.NCOEF))
        for i in range(n):
            a0, s0 = _alpha_sigma(float(sig[i]), cfg.use_flow_sigmas)
            if self._noise_prediction:
                convert = _eps_coefficients(cfg.prediction_type, a0, s0)
            elif cfg.prediction_type == "flow_prediction":
                convert = flow_x0(float(sig[i]))  # the schedule's own sigma, flow sigmas or not (as diffusers)
            else:
                convert = vp_x0(cfg.prediction_type, a0, s0)
            for order in range(1, min(i + 1, 3) + 1):
                row = table[i, order - 1]
                row[coefs.X_S], row[coefs.A_X], row[coefs.A_M] = convert
                self._fill_update(row, sig, i, order)
        return table

    def _fill_update(self, row, sig, i, order):
        """x_t = C_X x + c_d0 D0 + c_d1 D1 + c_d2 D2 + SIGMA z, with D1, D2 the divided differences of the history
        written out as multiples of m0, m1, m2 (C_0, H_1, H_2)."""
        flow = self.config.use_flow_sigmas
        a_t, s_t = _alpha_sigma(float(sig[i + 1]), flow)
        a_0, s_0 = _alpha_sigma(float(sig[i]), flow)
        lam = [_lam(float(sig[k]), flow) if k >= 0 else math.nan for k in (i + 1, i, i - 1, i - 2)]
        h = lam[0] - lam[1]
        c_x, c_d0, sigma = _first_order(self.config.algorithm_type, a_t, s_t, a_0, s_0, h)
        row[coefs.C_X], row[coefs.SIGMA] = c_x, sigma
        if order == 1:
            row[coefs.C_0] = c_d0
            return
        if math.isinf(h):  # a multistep update onto sigma = 0 divides by r0 = 0; diffusers gives NaN too
            row[coefs.C_0] = row[coefs.H_1] = row[coefs.H_2] = math.nan
            return
        # 1 / r0 = h / h_0 and 1 / r1 = h / h_1: finite when h = 0 (final_sigmas_type="sigma_min" repeats the
        # last sigma), where diffusers' D1 = (1 / r0) (m0 - m1) vanishes and the step returns the sample
        h_0 = lam[1] - lam[2]
        inv_r0 = _ratio(h, h_0)
        c_d1, c_d2 = _higher_order(self.config.algorithm_type, self.config.solver_type, order, a_t, s_t, h)
        if order == 2:  # D1 = (m0 - m1) / r0
            row[coefs.C_0] = c_d0 + c_d1 * inv_r0
            row[coefs.H_1] = -c_d1 * inv_r0
            return
        h_1 = lam[2] - lam[3]
        inv_r1 = _ratio(h, h_1)
        # D1 = (1 + k) D1_0 - k D1_1, D2 = q (D1_0 - D1_1), D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1,
        # with k = r0 / (r0 + r1) = h_0 / (h_0 + h_1) and q = 1 / (r0 + r1) = h / (h_0 + h_1)
        k, q = _ratio(h_0, h_0 + h_1), _ratio(h, h_0 + h_1)
        c10 = c_d1 * (1 + k) + c_d2 * q
        c11 = -c_d1 * k - c_d2 * q
        row[coefs.C_0] = c_d0 + c10 * inv_r0
        row[coefs.H_1] = -c10 * inv_r0 + c11 * inv_r1
        row[coefs.H_2] = -c11 * inv_r1

    def _history(self, shape, dtype, device) -> torch.Tensor:
        """The static (solver_order, *shape) buffer of x0 predictions, allocated once per shape/dtype/device."""
        key = ("history", tuple(shape), dtype, torch.device(device))
        return self._cached(key, lambda: torch.empty((self.config.solver_order, *shape), dtype=dtype, device=device))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        *,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One multistep DPM-Solver++ step. For "sde-dpmsolver++" the noise comes from ``variance_noise``,
        ``generator`` (float32 draws, as diffusers) or Philox with ``noise_seed``. Returns ``prev_sample``
        (``pred_original_sample`` is None, as in diffusers)."""
        self._check_ready()
        return self._step(
            model_output,
            timestep,
            sample,
            {},
            generator=generator,
            variance_noise=variance_noise,
            return_dict=return_dict,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            noise_seed=noise_seed,
        )

    def draws_noise(self, step_kwargs=None) -> bool:
        return self.config.algorithm_type.startswith("sde")

    def _plan(self, i, timestep, model_output, sample, opts) -> StepPlan:
        cfg = self.config
        order = self._order_at(i, self.lower_order_nums)
        n = cfg.solver_order
        m = model_output[:, : sample.shape[1]] if model_output.shape[1] != sample.shape[1] else model_output
        dtype = self._converted_dtype(m, sample)
        hist = self._history(sample.shape, dtype, sample.device)
        return StepPlan(
            i,
            row=(i, order - 1),
            noise_dtype=torch.float32 if cfg.algorithm_type.startswith("sde") else None,
            offset=i,
            model_output=m,
            hist=tuple(hist[(self._taken - k) % n] for k in range(1, order)),
            x0_out=hist[self._taken % n],
            out_dtype=dtype,
            x0_dtype=dtype,
            thresholding=cfg.thresholding,
            # thresholding acts on x0, while DPM-Solver's history holds eps: the kernel row cannot express
            # eps -> x0 -> threshold -> eps, so that rare combination runs the reference step
            reference_only=cfg.thresholding and self._noise_prediction,
            state={"order": order},
        )

    def _converted_dtype(self, m: torch.Tensor, sample: torch.Tensor) -> torch.dtype:
        """The dtype of diffusers' converted model output, which its history holds and its step returns: the
        model output's own where the conversion is the model output itself (x0 from "sample", eps from
        "epsilon"), else promoted with the sample's (a bf16 transformer on float32 latents gives float32)."""
        pred = self.config.prediction_type
        if pred == ("epsilon" if self._noise_prediction else "sample"):
            return m.dtype
        return torch.promote_types(m.dtype, sample.dtype)

    def _advance(self, plan) -> None:
        if self.lower_order_nums < self.config.solver_order:
            self.lower_order_nums += 1
        self._taken += 1
        super()._advance(plan)

    def _output(self, prev, x0, return_dict: bool):
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=None)

    def _reference_step(self, plan, model_output, sample, noise, opts):
        cfg = self.config
        i, order = plan.i, plan.state["order"]
        if noise is not None:
            noise = noise.to(torch.float32)
        convert = reference.dpm_eps if self._noise_prediction else reference.dpm_x0
        m = convert(
            model_output,
            sample,
            self.sigmas[i],
            cfg.prediction_type,
            cfg.thresholding,
            cfg.dynamic_thresholding_ratio,
            cfg.sample_max_value,
            flow=cfg.use_flow_sigmas,
        )
        self.model_outputs = self.model_outputs[1:] + [m]
        sig = [self.sigmas[i + 1], self.sigmas[i]] + [self.sigmas[i - k] for k in range(1, order)]
        prev = reference.dpm_update(
            self.model_outputs,
            sample.to(torch.float32),
            sig,
            order=order,
            algorithm_type=cfg.algorithm_type,
            solver_type=cfg.solver_type,
            noise=noise,
            flow=cfg.use_flow_sigmas,
        )
        return prev.to(m.dtype), None

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return sample

    def _first_index(self, timestep) -> int:
        """diffusers' DPM-Solver rule: a timestep that is not in the schedule starts at the last step."""
        if self._begin_index is None and self.index_for_timestep(timestep) is None:
            return len(self._timestep_values) - 1
        return super()._first_index(timestep)

    def _add_noise_rows(self) -> np.ndarray:
        """(alpha_t, sigma_t) per schedule step: noisy = alpha_t x + sigma_t noise."""
        sig = self._sigma_values.astype(np.float64)
        if self.config.use_flow_sigmas:
            return np.stack([1.0 - sig, sig], axis=1)
        alpha = 1.0 / np.sqrt(sig**2 + 1)
        return np.stack([alpha, sig * alpha], axis=1)

    def _reference_add_noise(self, x, noise, index):
        sigmas = self.sigmas.to(device=x.device, dtype=x.dtype)
        sigma = sigmas[index.to(x.device)].flatten()
        while sigma.ndim < x.ndim:
            sigma = sigma.unsqueeze(-1)
        alpha_t, sigma_t = reference.alpha_sigma(sigma, flow=self.config.use_flow_sigmas)
        return alpha_t * x + sigma_t * noise
