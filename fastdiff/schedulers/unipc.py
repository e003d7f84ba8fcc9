"""Drop-in ``UniPCMultistepScheduler``: the UniPC predictor-corrector (Zhao et al. 2023, arXiv:2302.04867) of
orders 1-3, B(h) variants bh1/bh2, data or noise prediction, VP or flow-matching sigmas (Wan 2.1/2.2); the
corrector (UniC) and the predictor (UniP) of a step in one fused launch.

Each step i of a loop corrects the sample it is given with the new model output (UniC, from the sample the
previous step started from and the history), then predicts the next sample from the corrected one (UniP). In
the coefficient row (``fastdiff.coefs``) that is: x0 the converted model output; the corrector row
``xc = L_L l + L_0 x0 + L_1 h_1 + L_2 h_2 + L_3 h_3`` with ``l`` the previous step's corrected sample and ``h_k``
the converted outputs of the previous k-th step; ``prev = C_0 x0 + C_X xc + H_1 h_1 + H_2 h_2``.

State lives in static device buffers written by the kernel: ``solver_order + 1`` history slots (a step reads up
to three and writes one) taken in turn, and two corrected-sample buffers taken by step parity (a step reads one
as ``l`` and writes the other). Every choice (orders, whether the corrector runs, which slots) is a pure function
of the step index and of how many steps this loop has taken, so a CUDA graph of the loop replays it exactly.
"""

from __future__ import annotations

import warnings
from typing import Optional, Union

import numpy as np
import torch

from .. import coefs, reference
from ..reference.unipc import PREDICTIONS, unipc_alpha_sigma
from ..schedules import (
    TIMESTEP_SPACINGS,
    check_choice,
    check_num_inference_steps,
    check_sigma_spacing_flags,
    stretch_to_terminal,
    time_shift_exponential,
    time_shift_linear,
    unipc_schedule,
)
from ._base import SchedulerOutput, StepPlan
from ._predict import vp_eps, vp_x0
from ._registry import register
from ._sigma import SigmaSchedulerBase

#: the coefficient row holds three history terms: UniC-3 reads x0 of the three previous steps
MAX_FUSED_ORDER = 3
#: solver types of the other multistep solvers that diffusers maps to "bh2" (a config switched from DPM-Solver)
BH2_ALIASES = ("midpoint", "heun", "logrho")


# ---------------------------------------------------------------------------------------------- coefficients


def _alpha_sigma(sig: np.ndarray, flow: bool) -> tuple[np.ndarray, np.ndarray]:
    """(alpha, sigma) of x = alpha x0 + sigma eps, float64: flow (1 - s, s); VP (1 / sqrt(s^2 + 1), s alpha)."""
    if flow:
        return 1.0 - sig, sig
    alpha = 1.0 / np.sqrt(sig * sig + 1.0)
    return alpha, sig * alpha


def _solve(R: np.ndarray, b: np.ndarray) -> np.ndarray:
    """R^-1 b for stacks (m, p, p) and (m, p) in float64; NaN for a system that is singular or not finite (a
    repeated or infinite lambda, where diffusers' float32 solve gives NaN or inf as well)."""
    with np.errstate(all="ignore"):
        try:
            return np.linalg.solve(R, b[..., None])[..., 0]
        except np.linalg.LinAlgError:  # one singular system fails the stack: solve them one by one
            out = np.full(b.shape, np.nan)
            for j in range(len(b)):
                try:
                    out[j] = np.linalg.solve(R[j], b[j])
                except np.linalg.LinAlgError:
                    pass
            return out


def bh_update(lam, alpha, sigma, t, s0, order: int, corrector: bool, predict_x0: bool, bh1: bool):
    """UniP (``corrector`` False) or UniC updates of B(h) form from sigma indices ``s0`` to ``t`` (int arrays of
    m steps), as multiples of the tensors they combine: ``(c_x, c_0, c_hist, c_this)``, float64 arrays (m,),
    (m,), (m, order - 1), (m,), such that

        x_t = c_x x_{s0} + c_0 m_0 + sum_k c_hist[:, k - 1] m_k + c_this m_t

    with m_0 the converted model output at s0, m_k the one k steps older (at s0 - k), m_t the new one at t (the
    corrector only). From the paper's quantities: h = lambda_t - lambda_s0, r_k = (lambda_{s0-k} - lambda_s0) / h,
    the order x order system R rho = b with R[j] = r^j, b[j] = phi_{j+2}(hh) (j + 1)! / B(h), hh = -h for the
    data prediction, B(h) = hh (bh1) or e^hh - 1 (bh2); the update
    x_t = c_x x - scale (e^hh - 1) m_0 - scale B(h) sum_k rho_k D1_k with D1_k = (m_k - m_0) / r_k (and
    D1_t = m_t - m_0 for the corrector). Orders with a closed form in diffusers keep it: rho = 1/2 for UniP-2 and
    UniC-1. An infinite lambda (sigma = 0) or h = 0 gives IEEE inf/NaN, not an exception."""
    m = len(t)
    with np.errstate(all="ignore"):
        h = lam[t] - lam[s0]
        hh = -h if predict_x0 else h
        h_phi_1 = np.expm1(hh)
        b_h = hh if bh1 else np.expm1(hh)
        rks = np.stack([(lam[s0 - k] - lam[s0]) / h for k in range(1, order)] + [np.ones(m)], axis=-1)
        R = np.stack([rks**j for j in range(order)], axis=-2)
        b = np.empty((m, order))
        h_phi_k, factorial = h_phi_1 / hh - 1, 1
        for j in range(1, order + 1):
            b[:, j - 1] = h_phi_k * factorial / b_h
            factorial *= j + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        if corrector:
            rhos = np.full((m, 1), 0.5) if order == 1 else _solve(R, b)
        elif order == 2:
            rhos = np.full((m, 1), 0.5)
        else:
            rhos = _solve(R[:, :-1, :-1], b[:, :-1]) if order > 2 else np.zeros((m, 0))
        if predict_x0:
            c_x, c_0, scale = sigma[t] / sigma[s0], -alpha[t] * h_phi_1, alpha[t]
        else:
            c_x, c_0, scale = alpha[t] / alpha[s0], -sigma[t] * h_phi_1, sigma[t]
        f = scale * b_h
        weights = rhos[:, : order - 1] / rks[:, : order - 1]  # rho_k / r_k: each D1_k = (m_k - m_0) / r_k
        c_hist = -f[:, None] * weights
        if order > 1:  # first order has no difference term (where B(h) is infinite, f * 0 would be NaN)
            c_0 = c_0 + f * weights.sum(axis=1)
        c_this = np.zeros(m)
        if corrector:
            c_this = -f * rhos[:, -1]
            c_0 = c_0 + f * rhos[:, -1]
    return c_x, c_0, c_hist, c_this


def _flow_x0(sig: np.ndarray) -> tuple:
    """(X_S, A_X, A_M) of diffusers' ``flow_prediction`` in UniPC: x0 = x - sigma v with the raw sigma of the
    schedule (whichever sigmas it uses)."""
    return 1.0, 1.0, -sig


def _required(name: str, value, args: tuple, position: int):
    """A keyword argument of diffusers' update methods that may also come positionally (after a deprecated one)."""
    if value is not None:
        return value
    if len(args) > position:
        return args[position]
    raise ValueError(f"missing `{name}` as a required keyword argument")


def _deprecated(name: str) -> None:
    warnings.warn(
        f"Passing `{name}` is deprecated and has no effect as model output conversion is now handled via an "
        "internal counter `self.step_index`",
        FutureWarning,
        stacklevel=3,
    )


# ---------------------------------------------------------------------------------------------- scheduler


@register(presets={"unipc": ({}, {}), "unipc-karras": ({"use_karras_sigmas": True}, {})})
class UniPCMultistepScheduler(SigmaSchedulerBase):
    """UniPC multistep predictor-corrector, as diffusers' ``UniPCMultistepScheduler``: ``solver_order`` 1-3 fused
    (higher orders run the reference step), ``predict_x0``, ``solver_type`` "bh1"/"bh2", ``lower_order_final``,
    ``disable_corrector``, Karras / exponential / beta sigmas, flow matching (``prediction_type="flow_prediction"``,
    ``use_flow_sigmas``, ``flow_shift``, ``use_dynamic_shifting`` with ``set_timesteps(mu=...)``, ``shift_terminal``,
    custom ``sigmas``), ``final_sigmas_type``, dynamic thresholding. ``solver_p`` (another scheduler as the
    predictor) runs the reference step. Extras in ``step``: ``guidance_scale``, ``guidance_rescale``; ``generator``
    and ``noise_seed`` are accepted and unused (UniPC draws no noise)."""

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
        predict_x0: bool = True,
        solver_type: str = "bh2",
        lower_order_final: bool = True,
        disable_corrector: list = [],  # noqa: B006  (diffusers' default, recorded in the config as given)
        solver_p=None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        use_flow_sigmas: bool = False,
        flow_shift: float = 1.0,
        timestep_spacing: str = "linspace",
        steps_offset: int = 0,
        final_sigmas_type: str = "zero",
        rescale_betas_zero_snr: bool = False,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        shift_terminal: Optional[float] = None,
        *,
        backend: Optional[str] = None,
    ):
        if solver_type in BH2_ALIASES:  # diffusers maps the other multistep solvers' types onto its own
            solver_type = "bh2"
        self._register_config(locals(), backend)
        self._check_options()
        self._init_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.alpha_t = torch.sqrt(self.alphas_cumprod)
        self.sigma_t = torch.sqrt(1 - self.alphas_cumprod)
        self.lambda_t = torch.log(self.alpha_t) - torch.log(self.sigma_t)
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.disable_corrector = disable_corrector
        self.solver_p = solver_p
        full = ((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5
        ts = np.linspace(0, num_train_timesteps - 1, num_train_timesteps, dtype=np.float32)[::-1].copy()
        self._install(ts, full.numpy().astype(np.float32), None)

    def _check_options(self) -> None:
        """Refuse at construction what diffusers refuses at construction or, later, at the first step."""
        cfg = self.config
        order = cfg.solver_order
        if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order < 1:
            raise ValueError(f"`solver_order` must be a positive int, got {order!r}")
        check_choice("solver_type", cfg.solver_type, ("bh1", "bh2", *BH2_ALIASES))
        check_choice("prediction_type", cfg.prediction_type, PREDICTIONS)
        if cfg.prediction_type == "flow_prediction" and not cfg.predict_x0:
            raise ValueError(
                "`prediction_type`='flow_prediction' needs `predict_x0`=True (UniPC converts a velocity to x0 only); "
                "diffusers fails at the first step"
            )
        check_choice("timestep_spacing", cfg.timestep_spacing, TIMESTEP_SPACINGS)
        check_choice("final_sigmas_type", cfg.final_sigmas_type, ("zero", "sigma_min"))
        check_sigma_spacing_flags(cfg.use_karras_sigmas, cfg.use_exponential_sigmas, cfg.use_beta_sigmas)
        if cfg.shift_terminal is not None and not cfg.use_flow_sigmas:
            raise ValueError(
                f"`shift_terminal`={cfg.shift_terminal!r} is only supported when `use_flow_sigmas`=True, got False"
            )
        if cfg.use_beta_sigmas:
            try:
                import scipy.stats  # noqa: F401
            except ImportError:
                raise ImportError("`use_beta_sigmas`=True needs scipy: pip install scipy") from None

    @property
    def predict_x0(self) -> bool:
        """Whether the solver integrates the data prediction x0 (else the noise prediction): ``config.predict_x0``."""
        return self.config.predict_x0

    # ------------------------------------------------------------------ schedule

    def set_timesteps(
        self, num_inference_steps: Optional[int] = None, device=None, sigmas=None, mu: Optional[float] = None
    ):
        """Timesteps and sigmas for ``num_inference_steps`` steps, or for custom flow ``sigmas`` (one per step,
        ``use_flow_sigmas`` only); ``mu`` is the dynamic shift (required with ``use_dynamic_shifting``)."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        if sigmas is not None:
            if not cfg.use_flow_sigmas:
                raise ValueError(
                    "Passing `sigmas` is only supported when `use_flow_sigmas=True`. "
                    "Please set `use_flow_sigmas=True` during scheduler initialization."
                )
            sigmas = np.asarray(sigmas.cpu() if isinstance(sigmas, torch.Tensor) else sigmas)
            if sigmas.ndim != 1 or len(sigmas) == 0:
                raise ValueError(f"`sigmas` must be a non-empty 1-d sequence, got shape {sigmas.shape}")
            num_inference_steps = len(sigmas)
        if num_inference_steps is None:
            raise ValueError("pass `num_inference_steps` or `sigmas`")
        respaced = cfg.use_karras_sigmas or cfg.use_exponential_sigmas or cfg.use_beta_sigmas or cfg.use_flow_sigmas
        # more steps than training timesteps repeat the spaced timesteps and their sigmas (h = 0: diffusers' step is
        # NaN); respaced and flow sigmas never repeat, so any count is allowed there
        check_num_inference_steps(num_inference_steps, np.iinfo(np.int64).max if respaced else cfg.num_train_timesteps)
        ts, sig = unipc_schedule(
            self.alphas_cumprod,
            int(num_inference_steps),
            spacing=cfg.timestep_spacing,
            steps_offset=cfg.steps_offset,
            use_karras_sigmas=cfg.use_karras_sigmas,
            use_exponential_sigmas=cfg.use_exponential_sigmas,
            use_beta_sigmas=cfg.use_beta_sigmas,
            use_flow_sigmas=cfg.use_flow_sigmas,
            flow_shift=cfg.flow_shift,
            mu=mu if cfg.use_dynamic_shifting else None,
            time_shift_type=cfg.time_shift_type,
            shift_terminal=cfg.shift_terminal,
            sigma_min=cfg.sigma_min,
            sigma_max=cfg.sigma_max,
            final_sigmas_type=cfg.final_sigmas_type,
            sigmas=sigmas,
        )
        self.num_inference_steps = len(ts)
        self._install(ts, sig, device)
        if self.solver_p is not None:
            self.solver_p.set_timesteps(self.num_inference_steps, device=device)

    def _reset_loop_state(self) -> None:
        n = self.config.solver_order
        self.model_outputs = [None] * n  # reference backend history (diffusers' attribute)
        self.timestep_list = [None] * n
        self.lower_order_nums = 0
        self.last_sample = None
        self._taken = 0  # steps taken in this loop: picks the orders and the buffer slots
        super()._reset_loop_state()

    def _first_index(self, timestep) -> int:
        """diffusers' multistep rule: a timestep that is not in the schedule starts at the last step."""
        if self._begin_index is None and self.index_for_timestep(timestep) is None:
            return len(self._timestep_values) - 1
        return super()._first_index(timestep)

    # ------------------------------------------------------------------ per-step choices (pure functions)

    def _order_at(self, i: int, taken: int) -> int:
        """UniP's order at step ``i`` after ``taken`` steps of this loop: warm-up from 1, and with
        ``lower_order_final`` at most the number of steps left (diffusers applies it for any step count)."""
        cfg = self.config
        order = min(cfg.solver_order, len(self._timestep_values) - i) if cfg.lower_order_final else cfg.solver_order
        return min(order, min(taken, cfg.solver_order) + 1)

    def _corrector_order_at(self, i: int, taken: int) -> int:
        """UniC's order at step ``i`` (the previous step's UniP order), 0 where the corrector does not run: the
        loop's first step, and after a step listed in ``disable_corrector``."""
        if taken == 0 or i == 0 or (i - 1) in self.disable_corrector:
            return 0
        return self._order_at(i - 1, taken - 1)

    def _reference_reason(self) -> Optional[str]:
        """Why this configuration runs the reference step instead of one fused row, or None."""
        if self.solver_p is not None:
            return "`solver_p`: the predictor is another scheduler's step, not a coefficient row"
        if self.config.solver_order > MAX_FUSED_ORDER:
            return f"`solver_order`={self.config.solver_order}: the row has {MAX_FUSED_ORDER} history terms"
        return None

    # ------------------------------------------------------------------ coefficient table

    def _coef_table(self) -> np.ndarray:
        """Rows [step i, UniP order - 1, UniC order (0: no corrector)]: the model output converted at sigma_i, the
        corrector from sigma_{i-1} to sigma_i, the predictor from sigma_i to sigma_{i+1} (``bh_update``)."""
        cfg = self.config
        sig = self._sigma_values.astype(np.float64)
        n = len(self._timestep_values)
        alpha, sigma = _alpha_sigma(sig, cfg.use_flow_sigmas)
        with np.errstate(divide="ignore"):
            lam = np.log(alpha) - np.log(sigma)
        top = min(cfg.solver_order, MAX_FUSED_ORDER)
        table = np.zeros((n, top, top + 1, coefs.NCOEF))
        convert = self._convert_coefficients(sig[:n], alpha[:n], sigma[:n])
        for k, values in zip((coefs.X_S, coefs.A_X, coefs.A_M), convert):
            table[..., k] = np.reshape(values, (-1, 1, 1)) if np.ndim(values) else values
        args = (lam, alpha, sigma)
        flags = dict(predict_x0=cfg.predict_x0, bh1=cfg.solver_type == "bh1")
        for q in range(1, top + 1):  # UniP-q from sigma_i to sigma_{i+1}, for the steps with q - 1 older outputs
            i = np.arange(q - 1, n)
            c_x, c_0, c_hist, _ = bh_update(*args, i + 1, i, q, corrector=False, **flags)
            rows = table[q - 1 :, q - 1]
            rows[..., coefs.C_X], rows[..., coefs.C_0] = c_x[:, None], c_0[:, None]
            for k, c in zip((coefs.H_1, coefs.H_2), c_hist.T):
                rows[..., k] = c[:, None]
        for p in range(1, top + 1):  # UniC-p from sigma_{i-1} to sigma_i, for the steps with p older outputs
            i = np.arange(p, n)
            l_x, l_1, l_hist, l_0 = bh_update(*args, i, i - 1, p, corrector=True, **flags)
            rows = table[p:, :, p]
            rows[..., coefs.L_L], rows[..., coefs.L_0], rows[..., coefs.L_1] = l_x[:, None], l_0[:, None], l_1[:, None]
            for k, c in zip((coefs.L_2, coefs.L_3), l_hist.T):
                rows[..., k] = c[:, None]
        return table

    def _convert_coefficients(self, sig, alpha, sigma) -> tuple:
        """(X_S, A_X, A_M) per step: the model output as x0 (``predict_x0``) or as eps (float64 arrays or floats)."""
        cfg = self.config
        if not cfg.predict_x0:
            return vp_eps(cfg.prediction_type, alpha, sigma)
        if cfg.prediction_type == "flow_prediction":
            return _flow_x0(sig)
        return vp_x0(cfg.prediction_type, alpha, sigma)

    # ------------------------------------------------------------------ buffers

    def _buffers(self, shape, hist_dtype, sample_dtype, device) -> tuple:
        """(history slots, corrected-sample buffers), static per shape/dtypes/device: ``solver_order + 1`` slots of
        converted model outputs (a step reads up to ``solver_order`` and writes one) and two samples."""
        key = ("unipc-buffers", tuple(shape), hist_dtype, sample_dtype, torch.device(device))
        slots = min(self.config.solver_order, MAX_FUSED_ORDER) + 1
        return self._cached(
            key,
            lambda: (
                torch.empty((slots, *shape), dtype=hist_dtype, device=device),
                torch.empty((2, *shape), dtype=sample_dtype, device=device),
            ),
        )

    # ------------------------------------------------------------------ step

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        return_dict: bool = True,
        *,
        generator=None,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One UniPC step: the corrector on ``sample`` with this model output (from the second step of a loop on,
        unless disabled), then the predictor to the next sigma. Returns ``prev_sample`` (``pred_original_sample`` is
        None, as in diffusers)."""
        self._check_ready()
        return self._step(
            model_output,
            timestep,
            sample,
            {},
            generator=generator,
            return_dict=return_dict,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            noise_seed=noise_seed,
        )

    def _plan(self, i, timestep, model_output, sample, opts) -> StepPlan:
        taken = self._taken
        order, corrector = self._order_at(i, taken), self._corrector_order_at(i, taken)
        state = {"order": order, "corrector": corrector, "timestep": timestep}
        if self._reference_reason() is not None:
            return StepPlan(i, reference_only=True, write_x0=False, out_dtype=sample.dtype, state=state)
        hist_dtype = torch.promote_types(sample.dtype, model_output.dtype)  # diffusers' converted output dtype
        hist, corr = self._buffers(sample.shape, hist_dtype, sample.dtype, sample.device)
        slots = len(hist)
        reads = max(corrector, order - 1)
        return StepPlan(
            i,
            row=(i, order - 1, corrector),
            hist=tuple(hist[(taken - k) % slots] for k in range(1, reads + 1)),
            x0_out=hist[taken % slots],
            last=corr[(taken - 1) % 2] if corrector else None,
            corr_out=corr[taken % 2],
            out_dtype=sample.dtype,
            x0_dtype=hist_dtype,
            thresholding=self.config.thresholding and self.config.predict_x0,
            state=state,
        )

    def _advance(self, plan) -> None:
        self.this_order = plan.state["order"]
        self.lower_order_nums = min(self.lower_order_nums + 1, self.config.solver_order)
        self._taken += 1
        super()._advance(plan)

    def _output(self, prev, x0, return_dict: bool):
        if not return_dict:
            return (prev,)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=None)

    def _reference_step(self, plan, model_output, sample, noise, opts):
        """diffusers' step op by op: convert, correct (UniC), push the history, predict (UniP or ``solver_p``)."""
        cfg = self.config
        i, order, corrector = plan.i, plan.state["order"], plan.state["corrector"]
        solver = dict(predict_x0=cfg.predict_x0, solver_type=cfg.solver_type, flow=cfg.use_flow_sigmas)
        x0 = reference.unipc_convert(
            model_output,
            sample,
            self.sigmas[i],
            cfg.prediction_type,
            predict_x0=cfg.predict_x0,
            flow=cfg.use_flow_sigmas,
            thresholding=cfg.thresholding,
            ratio=cfg.dynamic_thresholding_ratio,
            max_value=cfg.sample_max_value,
        )
        if corrector:
            sigmas = [self.sigmas[i - k] for k in range(corrector + 1)]
            sample = reference.unipc_correct(
                x0, self.model_outputs, self.last_sample, sample, sigmas, order=corrector, **solver
            )
        self.model_outputs = self.model_outputs[1:] + [x0]
        self.timestep_list = self.timestep_list[1:] + [plan.state["timestep"]]
        self.last_sample = sample
        if self.solver_p is not None:
            return self.solver_p.step(model_output, plan.state["timestep"], sample).prev_sample, None
        sigmas = [self.sigmas[i + 1 - k] for k in range(order + 1)]
        return reference.unipc_predict(self.model_outputs, sample, sigmas, order=order, **solver), None

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """UniPC's model input is the sample itself."""
        return sample

    # ------------------------------------------------------------------ diffusers' public pieces of a step
    # (op by op, on the reference history ``model_outputs``; ``step`` itself runs the fused kernel)

    def convert_model_output(self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, **kwargs):
        """The model output as the solver integrates it (x0 with ``predict_x0``, thresholded when configured;
        else eps) at the current ``step_index``. A positional or keyword ``timestep`` is deprecated and unused."""
        timestep = args[0] if len(args) > 0 else kwargs.pop("timestep", None)
        sample = _required("sample", sample, args, 1)
        if timestep is not None:
            _deprecated("timesteps")
        cfg = self.config
        return reference.unipc_convert(
            model_output,
            sample,
            self.sigmas[self.step_index],
            cfg.prediction_type,
            predict_x0=cfg.predict_x0,
            flow=cfg.use_flow_sigmas,
            thresholding=cfg.thresholding,
            ratio=cfg.dynamic_thresholding_ratio,
            max_value=cfg.sample_max_value,
        )

    def multistep_uni_p_bh_update(
        self, model_output: torch.Tensor, *args, sample: torch.Tensor = None, order: int = None, **kwargs
    ) -> torch.Tensor:
        """UniP-``order`` from ``sample`` at the current step to the next sigma, with ``model_outputs`` as the
        history (or ``solver_p``'s step on the raw ``model_output``). ``prev_timestep`` is deprecated and unused."""
        prev_timestep = args[0] if len(args) > 0 else kwargs.pop("prev_timestep", None)
        sample = _required("sample", sample, args, 1)
        order = _required("order", order, args, 2)
        if prev_timestep is not None:
            _deprecated("prev_timestep")
        if self.solver_p is not None:
            return self.solver_p.step(model_output, self.timestep_list[-1], sample).prev_sample
        i, cfg = self.step_index, self.config
        return reference.unipc_predict(
            self.model_outputs,
            sample,
            [self.sigmas[i + 1 - k] for k in range(order + 1)],
            order=order,
            predict_x0=cfg.predict_x0,
            solver_type=cfg.solver_type,
            flow=cfg.use_flow_sigmas,
        )

    def multistep_uni_c_bh_update(
        self,
        this_model_output: torch.Tensor,
        *args,
        last_sample: torch.Tensor = None,
        this_sample: torch.Tensor = None,
        order: int = None,
        **kwargs,
    ) -> torch.Tensor:
        """UniC-``order``: ``this_sample`` at the current step corrected with its converted model output, from
        ``last_sample`` at the previous step and ``model_outputs``. ``this_timestep`` is deprecated and unused."""
        this_timestep = args[0] if len(args) > 0 else kwargs.pop("this_timestep", None)
        last_sample = _required("last_sample", last_sample, args, 1)
        this_sample = _required("this_sample", this_sample, args, 2)
        order = _required("order", order, args, 3)
        if this_timestep is not None:
            _deprecated("this_timestep")
        i, cfg = self.step_index, self.config
        return reference.unipc_correct(
            this_model_output,
            self.model_outputs,
            last_sample,
            this_sample,
            [self.sigmas[i - k] for k in range(order + 1)],
            order=order,
            predict_x0=cfg.predict_x0,
            solver_type=cfg.solver_type,
            flow=cfg.use_flow_sigmas,
        )

    def time_shift(self, mu: float, sigma: float, t):
        """The dynamic shift of flow sigmas ``t`` (``time_shift_type`` "exponential" or "linear")."""
        check_choice("time_shift_type", self.config.time_shift_type, ("exponential", "linear"))
        if self.config.time_shift_type == "exponential":
            return time_shift_exponential(mu, sigma, t)
        return time_shift_linear(mu, sigma, t)

    def stretch_shift_to_terminal(self, t):
        """Stretch a descending schedule ``t`` to end at ``config.shift_terminal``."""
        return stretch_to_terminal(t, self.config.shift_terminal)

    # ------------------------------------------------------------------ forward noising

    def _add_noise_rows(self) -> np.ndarray:
        alpha, sigma = _alpha_sigma(self._sigma_values.astype(np.float64), self.config.use_flow_sigmas)
        return np.stack([alpha, sigma], axis=1)

    def _reference_add_noise(self, x, noise, index):
        sigmas = self.sigmas.to(device=x.device, dtype=x.dtype)
        sigma = sigmas[index.to(x.device)].flatten()
        while sigma.ndim < x.ndim:
            sigma = sigma.unsqueeze(-1)
        alpha_t, sigma_t = unipc_alpha_sigma(sigma, self.config.use_flow_sigmas)
        return alpha_t * x + sigma_t * noise
