"""Drop-in ``FlowMatchEulerDiscreteScheduler``, the sampler of rectified-flow models (SD3, FLUX.1, HunyuanVideo,
LTX-Video, Qwen-Image, ...): one fused launch per step, diffusers' constructor, API and noise draws.

The sample is x = (1 - sigma) x0 + sigma eps and the model predicts the velocity v = eps - x0. A step moves x along
v to the next sigma, prev = x + (sigma_next - sigma) v; with ``stochastic_sampling`` it noises the x0 estimate
x - sigma v afresh to the next sigma instead. Both are one coefficient row (eps := v).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .. import coefs, reference
from ..schedules import (
    beta_sigmas,
    check_choice,
    check_sigma_spacing_flags,
    exponential_sigmas,
    karras_sigmas,
    shift_sigmas,
    stretch_to_terminal,
    time_shift_exponential,
    time_shift_linear,
)
from ._base import StepPlan
from ._output import BaseOutput
from ._predict import flow_x0
from ._registry import register
from ._sigma import SigmaSchedulerBase

logger = logging.getLogger(__name__)

TIME_SHIFT_TYPES = ("exponential", "linear")


@dataclass
class FlowMatchEulerDiscreteSchedulerOutput(BaseOutput):
    """Output of ``FlowMatchEulerDiscreteScheduler.step``, like diffusers' class of the same name: ``prev_sample``,
    the sample at the next sigma, shaped like ``sample``, in the model output's dtype (float32 with
    ``per_token_timesteps``). There is no x0 field."""

    prev_sample: torch.Tensor


class _NotInSchedule(IndexError, ValueError):
    """A timestep that is not in the schedule: diffusers raises IndexError there, fastdiff's other schedulers
    ValueError; this is both, so code catching either works."""


@register(presets={"flow-euler": ({}, {}), "flow-euler-sde": ({"stochastic_sampling": True}, {})})
class FlowMatchEulerDiscreteScheduler(SigmaSchedulerBase):
    """Euler sampler for flow-matching models, as diffusers' ``FlowMatchEulerDiscreteScheduler``: static ``shift``,
    dynamic shifting (``use_dynamic_shifting``, ``set_timesteps(mu=...)``, see ``fastdiff.schedules.calculate_shift``)
    of ``time_shift_type`` "exponential" or "linear", ``shift_terminal``, Karras / exponential / beta sigmas,
    ``invert_sigmas``, ``stochastic_sampling``, custom ``sigmas`` / ``timesteps``, ``scale_noise`` and
    ``per_token_timesteps``. Extras: ``step(..., guidance_scale=, guidance_rescale=, noise_seed=)`` (see
    ``DDPMScheduler``), ``init_noise_sigma`` (1.0) and ``scale_model_input`` (the identity) for generic loops, and
    ``add_noise`` (the same forward process as ``scale_noise``)."""

    order = 1
    _plain_plans = True  # a plan is a function of the step index, the output dtype and per_token_timesteps
    init_noise_sigma = 1.0  # fastdiff's loops scale the starting noise by it; diffusers' class has no such attribute

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: Optional[float] = 0.5,
        max_shift: Optional[float] = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: Optional[float] = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: str = "exponential",
        stochastic_sampling: bool = False,
        *,
        backend: Optional[str] = None,
    ):
        self._register_config(locals(), backend)
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
            raise ValueError(f"`num_train_timesteps` must be a positive int, got {num_train_timesteps!r}")
        if use_beta_sigmas and importlib.util.find_spec("scipy") is None:
            raise ImportError("`use_beta_sigmas`=True needs scipy: pip install scipy")
        check_sigma_spacing_flags(use_karras_sigmas, use_exponential_sigmas, use_beta_sigmas)
        check_choice("time_shift_type", time_shift_type, TIME_SHIFT_TYPES)
        self._shift = shift
        self.num_inference_steps = None
        # the training schedule: T sigmas from 1 down to 1/T, shifted unless the shift depends on the resolution
        ts = np.linspace(1, num_train_timesteps, num_train_timesteps, dtype=np.float32)[::-1].copy()
        sigmas = torch.from_numpy(ts) / num_train_timesteps
        if not use_dynamic_shifting:
            sigmas = shift_sigmas(sigmas, shift)
        self.sigma_min = sigmas[-1].item()
        self.sigma_max = sigmas[0].item()
        self._install((sigmas * num_train_timesteps).numpy(), sigmas.numpy(), None)

    # ------------------------------------------------------------------ shifts

    @property
    def shift(self) -> float:
        """The static shift ``set_timesteps`` applies (``config.shift`` until ``set_shift``)."""
        return self._shift

    def set_shift(self, shift: float) -> None:
        """Change the static shift of later ``set_timesteps`` calls (the config keeps its value, as in diffusers)."""
        self._shift = shift

    def time_shift(self, mu: float, sigma: float, t):
        """The resolution-dependent shift of ``t`` (array or tensor in (0, 1]) by ``config.time_shift_type``:
        e^mu / (e^mu + (1/t - 1)^sigma) ("exponential") or mu / (mu + (1/t - 1)^sigma) ("linear")."""
        if self.config.time_shift_type == "exponential":
            return time_shift_exponential(mu, sigma, t)
        return time_shift_linear(mu, sigma, t)

    def stretch_shift_to_terminal(self, t):
        """``t`` (descending, array or tensor) stretched so that it ends at ``config.shift_terminal``."""
        return stretch_to_terminal(t, self.config.shift_terminal)

    # ------------------------------------------------------------------ schedule

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        sigmas=None,
        mu: Optional[float] = None,
        timesteps=None,
    ) -> None:
        """Sigmas and timesteps for ``num_inference_steps`` steps, or for custom ``sigmas`` and/or ``timesteps``
        (n values each; custom timesteps are used as given while the sigmas derived from them are shifted).
        ``mu`` is required with ``use_dynamic_shifting``. ``sigmas`` gets a final 0 (1 with ``invert_sigmas``);
        ``timesteps`` are sigma * num_train_timesteps, float32, on ``device`` like ``sigmas``."""
        cfg = self.config
        if cfg.use_dynamic_shifting and mu is None:
            raise ValueError("`mu` must be passed when `use_dynamic_shifting` is set to be `True`")
        n = self._count_steps(num_inference_steps, sigmas, timesteps)
        self.num_inference_steps = n
        # the schedule of a step count (no custom sigmas or timesteps) is a function of it, mu, the shift and the
        # config: a loop calling set_timesteps before each batch gets the last one back without the numpy work
        memo_key = None
        if sigmas is None and timesteps is None and isinstance(mu, (type(None), int, float)):
            memo_key = (n, mu, self._shift)
            last = self.__dict__.get("_schedule_memo")
            if last is not None and last[0] == memo_key and last[1] is cfg:
                self._install_on(*last[2:], device)
                return
        given_ts = None if timesteps is None else np.array(timesteps).astype(np.float32)
        if given_ts is not None and sigmas is None:
            logger.warning(
                "`timesteps` were passed without `sigmas`: the timesteps are used as given, while the sigmas derived "
                "from them are shifted by the scheduler, so the two may disagree; pass `sigmas` too to set both"
            )
        if sigmas is not None:
            sig = np.array(sigmas).astype(np.float32)
        elif given_ts is not None:
            sig = given_ts / cfg.num_train_timesteps
        else:
            T = cfg.num_train_timesteps
            sig = np.linspace(self.sigma_max * T, self.sigma_min * T, n) / T
        sig = self.time_shift(mu, 1.0, sig) if cfg.use_dynamic_shifting else shift_sigmas(sig, self.shift)
        if cfg.shift_terminal:
            sig = self.stretch_shift_to_terminal(sig)
        sig = self._respace(sig, n)
        self._install_flow(torch.from_numpy(np.asarray(sig)).to(torch.float32), given_ts, device)
        if memo_key is not None:
            self._schedule_memo = (memo_key, cfg, self._timestep_values, self._sigma_values)

    def _count_steps(self, num_inference_steps, sigmas, timesteps) -> int:
        """The number of steps, checked against the lengths of custom ``sigmas`` / ``timesteps``."""
        if sigmas is not None and timesteps is not None and len(sigmas) != len(timesteps):
            raise ValueError(
                f"`sigmas` ({len(sigmas)} values) and `timesteps` ({len(timesteps)} values) should have the same length"
            )
        if num_inference_steps is None:
            if sigmas is None and timesteps is None:
                raise ValueError("pass `num_inference_steps`, or custom `sigmas` and/or `timesteps`")
            n = len(sigmas) if sigmas is not None else len(timesteps)
        else:
            n = num_inference_steps
            for name, values in (("sigmas", sigmas), ("timesteps", timesteps)):
                if values is not None and len(values) != n:
                    raise ValueError(
                        f"`{name}` has {len(values)} values; expected `num_inference_steps`={n} (the same length, "
                        "when `num_inference_steps` is given)"
                    )
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"`num_inference_steps` must be a positive int, got {n!r}")
        return int(n)

    def _respace(self, sig: np.ndarray, n: int) -> np.ndarray:
        """Karras, exponential or beta spacing between the shifted schedule's first and last sigma, per the config."""
        cfg = self.config
        lo, hi = float(sig[-1]), float(sig[0])
        if cfg.use_karras_sigmas:
            return karras_sigmas(lo, hi, n)
        if cfg.use_exponential_sigmas:
            return exponential_sigmas(lo, hi, n)
        if cfg.use_beta_sigmas:
            return beta_sigmas(lo, hi, n)
        return sig

    def _install_flow(self, sig: torch.Tensor, given_ts: Optional[np.ndarray], device) -> None:
        """Install float32 sigmas (n,) with their final value appended, and the timesteps: ``given_ts`` or sigma * T
        (of the inverted sigmas with ``invert_sigmas``, Mochi's convention)."""
        T = self.config.num_train_timesteps
        ts = torch.from_numpy(given_ts) if given_ts is not None else sig * T
        if self.config.invert_sigmas:
            sig = 1.0 - sig
            ts = sig * T
            sig = torch.cat([sig, torch.ones(1)])
        else:
            sig = torch.cat([sig, torch.zeros(1)])
        self._install_on(ts.numpy(), sig.numpy(), device)

    def _install_on(self, timesteps: np.ndarray, sigmas: np.ndarray, device) -> None:
        self._install(timesteps, sigmas, device)
        self.sigmas = self.sigmas.to(device)  # diffusers keeps this scheduler's sigmas on the device

    # ------------------------------------------------------------------ step index

    def index_for_timestep(self, timestep, schedule_timesteps=None) -> int:
        """Index of ``timestep`` in ``schedule_timesteps`` (default ``self.timesteps``): the second match when the
        value repeats, as diffusers' rule for a loop entered mid-schedule. Raises (IndexError and ValueError) when
        it is not there. No device sync for an element of ``self.timesteps``."""
        values = (
            self._timestep_values
            if schedule_timesteps is None
            else np.asarray(torch.as_tensor(schedule_timesteps).cpu())
        )
        i = None
        if schedule_timesteps is None and isinstance(timestep, torch.Tensor) and timestep.numel() == 1:
            i = self._element_index(timestep)
        value = values[i] if i is not None else self._timestep_value(timestep)
        if np.issubdtype(values.dtype, np.floating):
            value = values.dtype.type(value)  # compared in the schedule's float32, as a tensor comparison does
        matches = np.flatnonzero(values == value)
        if len(matches) == 0:
            raise _NotInSchedule(str(self._schedule_error(self._timestep_value(timestep))))
        return int(matches[1] if len(matches) > 1 else matches[0])

    # ------------------------------------------------------------------ step

    def scale_model_input(self, sample: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The identity: a flow-matching model takes the sample as it is (for loops written for every scheduler)."""
        return sample

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator=None,
        per_token_timesteps: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        *,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One Euler step to the next sigma (model_output: the velocity, shaped like ``sample``). ``s_churn``,
        ``s_tmin``, ``s_tmax`` and ``s_noise`` are accepted and unused, as in diffusers. With ``stochastic_sampling``
        the step's noise comes from ``generator`` (float32 draws, as diffusers) or Philox with ``noise_seed``.
        ``per_token_timesteps`` (B, S) steps each token of a packed (B, S, C) sample from its own timestep.
        Returns ``FlowMatchEulerDiscreteSchedulerOutput(prev_sample)`` or ``(prev_sample,)``."""
        if isinstance(timestep, int) or isinstance(timestep, (torch.IntTensor, torch.LongTensor)):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to"
                " `FlowMatchEulerDiscreteScheduler.step()` is not supported. Make sure to pass"
                " one of the `scheduler.timesteps` as a timestep."
            )
        return self._step(
            model_output,
            timestep,
            sample,
            {"per_token_timesteps": per_token_timesteps},
            generator=generator,
            return_dict=return_dict,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            noise_seed=noise_seed,
        )

    def draws_noise(self, step_kwargs=None) -> bool:
        return bool(self.config.stochastic_sampling)

    def _coef_table(self) -> np.ndarray:
        """Row i: v at sigma_i, then x + (sigma_{i+1} - sigma_i) v, or with stochastic sampling
        (1 - sigma_{i+1}) x0 + sigma_{i+1} z with x0 = x - sigma_i v. dt and 1 - sigma_{i+1} are rounded to float32
        as diffusers forms them from its float32 sigmas."""
        sig = self._sigma_values  # float32
        sigma, sigma_next = sig[:-1].astype(np.float64), sig[1:].astype(np.float64)
        table = np.zeros((len(sigma), coefs.NCOEF))
        table[:, coefs.X_S], table[:, coefs.A_X], table[:, coefs.A_M] = flow_x0(sigma)
        if self.config.stochastic_sampling:
            table[:, coefs.C_0] = np.float32(1.0) - sig[1:]
            table[:, coefs.SIGMA] = sigma_next
        else:
            table[:, coefs.E_S], table[:, coefs.E_M] = 1.0, 1.0  # eps := v
            table[:, coefs.C_X], table[:, coefs.C_E] = 1.0, sig[1:] - sig[:-1]
        return table

    def _plan(self, i, timestep, model_output, sample, opts) -> StepPlan:
        per_token = opts["per_token_timesteps"]
        if per_token is None:  # a function of the step and the output dtype: made once per schedule
            return self._cached(("plan", i, model_output.dtype), lambda: self._make_plan(i, model_output, None))
        return self._make_plan(i, model_output, per_token)

    def _make_plan(self, i, model_output, per_token) -> StepPlan:
        return StepPlan(
            i,
            row=i,
            noise_dtype=torch.float32 if self.config.stochastic_sampling else None,
            offset=i,
            write_x0=False,
            out_dtype=torch.float32 if per_token is not None else model_output.dtype,
            # each token steps between its own pair of sigmas: coefficients vary within a sample, which one row
            # per step cannot express; that path (LTX-Video conditioning) runs the reference step
            reference_only=per_token is not None,
        )

    def _reference_step(self, plan, model_output, sample, noise, opts):
        per_token = opts["per_token_timesteps"]
        if per_token is not None:
            prev = reference.flow_match_euler_step_per_token(
                model_output,
                sample,
                sigmas=self.sigmas,
                per_token_timesteps=per_token,
                num_train_timesteps=self.config.num_train_timesteps,
                stochastic=self.config.stochastic_sampling,
                noise=noise,
            )
        else:
            prev = reference.flow_match_euler_step(
                model_output,
                sample,
                sigma=self.sigmas[plan.i],
                sigma_next=self.sigmas[plan.i + 1],
                stochastic=self.config.stochastic_sampling,
                noise=noise,
            )
        return prev, None

    def _output(self, prev, x0, return_dict: bool):
        return FlowMatchEulerDiscreteSchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    # ------------------------------------------------------------------ forward process

    def scale_noise(self, sample: torch.Tensor, timestep, noise: Optional[torch.Tensor] = None, *, noise_seed=None):
        """The forward process at ``timestep`` (1 or B schedule timesteps): sigma * noise + (1 - sigma) * sample, one
        ``fastdiff::add_noise`` launch. Which step: ``begin_index`` / ``step_index`` when set (img2img, inpainting),
        else the timestep's value (the second match when it repeats). ``noise_seed``: Philox noise drawn in the
        kernel instead of ``noise``."""
        return self.add_noise(sample, noise, timestep, noise_seed=noise_seed)

    def _add_noise_rows(self) -> np.ndarray:
        """(1 - sigma, sigma) per schedule step, formed in float32 as diffusers does for a float32 sample."""
        sig = self._sigma_values
        return np.stack([np.float32(1.0) - sig, sig], axis=1)

    def _reference_add_noise(self, x, noise, index):
        return reference.scale_noise(self.sigmas, x, noise, index)
