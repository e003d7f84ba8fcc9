"""Drop-in ``LCMScheduler``: latent consistency models' multistep sampling with diffusers' constructor, API,
step-index rules and noise draws; one fused launch per step.

A step is the consistency function's estimate ``denoised = c_out * x0 + c_skip * x`` (x0 the model output
converted, clipped or thresholded) and, on every step but the last, forward noising to the next timestep:
``prev = sqrt(abar_prev) * denoised + sqrt(1 - abar_prev) * z``. Without clipping or thresholding ``denoised``
is linear in x and the model output, so it is the row's x0 (read x, m; write prev, denoised). With them, x0 is
the clipped estimate and ``denoised`` the corrector output from the sample itself (L_L = c_skip, L_0 = c_out).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch

from .. import coefs, reference
from ..reference.lcm import lcm_scalings, lcm_step
from ..schedules import alphas_cumprod_from_betas, make_betas
from ._base import StepPlan
from ._output import BaseOutput
from ._registry import register
from ._sigma import SIGMA_BETA_SCHEDULES, SigmaSchedulerBase
from .ddpm import _as_timestep_tensor, add_noise_train_timesteps, x0_coefficients
from .pndm import integer_timestep

logger = logging.getLogger(__name__)


@dataclass
class LCMSchedulerOutput(BaseOutput):
    """Output of ``LCMScheduler.step``: prev_sample (x at the next timestep, the input of the next model call)
    and denoised (the consistency function's x0 estimate at this timestep), both shaped like the sample."""

    prev_sample: torch.Tensor
    denoised: Optional[torch.Tensor] = None


@register(presets={"lcm": ({}, {})})
class LCMScheduler(SigmaSchedulerBase):
    """Latent consistency models (Luo et al. 2023), as diffusers' ``LCMScheduler``: the timesteps are
    ``num_inference_steps`` evenly spaced indices into the ``original_inference_steps``-step distillation
    schedule (or custom ``timesteps``, or a ``strength``-shortened one for img2img), and every step but the last
    adds fresh noise: from ``generator`` exactly as diffusers draws it, the global RNG, or in-kernel Philox with
    ``noise_seed``. Extras in ``step``: ``guidance_scale``, ``guidance_rescale``, ``noise_seed``."""

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: Optional[Union[np.ndarray, list]] = None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        *,
        backend: Optional[str] = None,
    ):
        self._register_config(locals(), backend)
        self.betas = make_betas(
            num_train_timesteps,
            beta_start,
            beta_end,
            beta_schedule,
            trained_betas,
            rescale_betas_zero_snr,
            schedules=SIGMA_BETA_SCHEDULES,
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        self._begin_index = None
        self._denoised = None
        self._set_schedule(np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64), None)

    # ------------------------------------------------------------------ schedule

    def set_timesteps(
        self,
        num_inference_steps: Optional[int] = None,
        device=None,
        original_inference_steps: Optional[int] = None,
        timesteps: Optional[list] = None,
        strength: float = 1.0,
    ) -> None:
        """``num_inference_steps`` timesteps at evenly spaced indices of the distillation schedule
        (``original_inference_steps`` steps k * i - 1, k = num_train_timesteps // original steps, of which the
        first ``strength`` fraction), or custom descending ``timesteps`` (cut to the last ``strength`` fraction).
        Resets the step index and the begin index."""
        if num_inference_steps is None and timesteps is None:
            raise ValueError("Must pass exactly one of `num_inference_steps` or `custom_timesteps`.")
        if num_inference_steps is not None and timesteps is not None:
            raise ValueError("Can only pass one of `num_inference_steps` or `custom_timesteps`.")
        T = self.config.num_train_timesteps
        original = (
            original_inference_steps if original_inference_steps is not None else self.config.original_inference_steps
        )
        if original > T:
            raise ValueError(
                f"`original_steps`: {original} cannot be larger than `self.config.train_timesteps`: {T} as the unet "
                f"model trained with this scheduler can only handle maximal {T} timesteps."
            )
        k = T // original  # the skipping step of the paper
        origin = np.asarray(list(range(1, int(original * strength) + 1))) * k - 1
        if timesteps is not None:
            ts = self._custom_timesteps(timesteps, origin, original, strength)
        else:
            ts = self._spaced_timesteps(num_inference_steps, origin, original, strength)
        # the tables read the timesteps, num_inference_steps (the last step's noise) and the config
        self._set_schedule(ts.astype(np.int64), device, fingerprint=repr(self.num_inference_steps).encode())
        self._begin_index = None

    def _custom_timesteps(self, timesteps, origin: np.ndarray, original: int, strength: float) -> np.ndarray:
        """Validate a descending custom schedule (warning about timesteps off the distillation schedule, as
        diffusers does) and cut it to its last ``strength`` fraction."""
        T = self.config.num_train_timesteps
        timesteps = list(timesteps.tolist() if isinstance(timesteps, (np.ndarray, torch.Tensor)) else timesteps)
        train = set(origin.tolist())
        off = []
        for i in range(1, len(timesteps)):
            if timesteps[i] >= timesteps[i - 1]:
                raise ValueError("`custom_timesteps` must be in descending order.")
            if timesteps[i] not in train:
                off.append(timesteps[i])
        if timesteps[0] >= T:
            raise ValueError(f"`timesteps` must start before `self.config.train_timesteps`: {T}.")
        if strength == 1.0 and timesteps[0] != T - 1:
            logger.warning(
                "The first timestep on the custom timestep schedule is %s, not `self.config.num_train_timesteps - "
                "1`: %s. You may get unexpected results when using this timestep schedule.",
                timesteps[0],
                T - 1,
            )
        if off:
            logger.warning(
                "The custom timestep schedule contains the following timesteps which are not on the original "
                "training/distillation timestep schedule: %s. You may get unexpected results when using this "
                "timestep schedule.",
                off,
            )
        if len(timesteps) > original:
            logger.warning(
                "The number of timesteps in the custom timestep schedule is %d, which exceeds the length of the "
                "timestep schedule used for training: %d. You may get some unexpected results when using this "
                "timestep schedule.",
                len(timesteps),
                original,
            )
        ts = np.array(timesteps, dtype=np.int64)
        n = len(ts)
        self.num_inference_steps = n  # the uncut length, as diffusers: the last step of a cut schedule is noised
        self.custom_timesteps = True
        init = min(int(n * strength), n)
        return ts[max(n - init, 0) * self.order :]

    def _spaced_timesteps(self, num_inference_steps: int, origin: np.ndarray, original: int, strength: float):
        T = self.config.num_train_timesteps
        if num_inference_steps > T:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `self.config.train_timesteps`: "
                f"{T} as the unet model trained with this scheduler can only handle maximal {T} timesteps."
            )
        if len(origin) // num_inference_steps < 1:
            raise ValueError(
                f"The combination of `original_steps x strength`: {original} x {strength} is smaller than "
                f"`num_inference_steps`: {num_inference_steps}. Make sure to either reduce `num_inference_steps` to "
                f"a value smaller than {int(original * strength)} or increase `strength` to a value higher than "
                f"{float(num_inference_steps / original)}."
            )
        self.num_inference_steps = num_inference_steps
        if num_inference_steps > original:
            raise ValueError(
                f"`num_inference_steps`: {num_inference_steps} cannot be larger than `original_inference_steps`: "
                f"{original} because the final timestep schedule will be a subset of the "
                "`original_inference_steps`-sized initial timestep schedule."
            )
        self.custom_timesteps = False
        origin = origin[::-1].copy()
        picks = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        return origin[picks]

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the schedule (-1 after the last), or ``timestep - 1`` before
        ``set_timesteps``, as a tensor like diffusers."""
        if self.custom_timesteps or self.num_inference_steps:
            value = self._timestep_value(timestep)
            matches = np.flatnonzero(self._timestep_values == value)
            if not len(matches):
                raise self._schedule_error(value)
            i = int(matches[0])
            return torch.tensor(-1) if i == len(self._timestep_values) - 1 else self.timesteps[i + 1]
        return timestep - 1

    def get_scalings_for_boundary_condition_discrete(self, timestep) -> tuple:
        """(c_skip, c_out) of the consistency boundary condition at ``timestep`` (scaled by
        ``config.timestep_scaling``; sigma_data 0.5): Python floats for an int, float32 tensors for a tensor."""
        self.sigma_data = 0.5
        return lcm_scalings(timestep, self.config.timestep_scaling)

    # ------------------------------------------------------------------ coefficients

    @property
    def _folded(self) -> bool:
        """Without clipping or thresholding, denoised is linear in x and m: the row's x0 itself."""
        return not (self.config.clip_sample or self.config.thresholding)

    def _coef_rows(self, t: np.ndarray, prev_t: np.ndarray, noisy: np.ndarray) -> np.ndarray:
        """One row per step from timestep ``t`` to ``prev_t`` (integer arrays; ``noisy``: whether noise is
        added), with the float32 scalars formed as diffusers forms them."""
        acp = self.alphas_cumprod.cpu()
        t_idx = torch.from_numpy(np.asarray(t, dtype=np.int64))
        prev_idx = torch.from_numpy(np.asarray(prev_t, dtype=np.int64))
        a = acp[t_idx]
        a_p = torch.where(prev_idx >= 0, acp[prev_idx.clamp(min=0)], self.final_alpha_cumprod.cpu())
        c_skip, c_out = (v.double().numpy() for v in lcm_scalings(t_idx, self.config.timestep_scaling))
        x_s, a_x, a_m = x0_coefficients(self.config.prediction_type, a.double().numpy())
        rows = np.zeros((len(t), coefs.NCOEF))
        rows[:, coefs.X_S] = x_s
        keep = np.where(noisy, a_p.sqrt().double().numpy(), 1.0)  # sqrt(abar_prev), or denoised itself at the end
        rows[:, coefs.SIGMA] = np.where(noisy, (1 - a_p).sqrt().double().numpy(), 0.0)
        if self._folded:
            with np.errstate(divide="ignore", invalid="ignore"):
                rows[:, coefs.A_X] = c_out * a_x + np.where(np.isinf(x_s), 0.0, c_skip / x_s)
            rows[:, coefs.A_M] = c_out * a_m
            rows[:, coefs.C_0] = keep
        else:
            rows[:, coefs.A_X], rows[:, coefs.A_M] = a_x, a_m
            rows[:, coefs.L_L], rows[:, coefs.L_0] = c_skip, c_out
            rows[:, coefs.C_X] = keep
        return rows

    def _transition(self, i: int, t: int) -> tuple:
        """(t, prev_t, noisy) of step ``i`` taken at timestep ``t``: the next listed timestep (``t`` itself after
        the last), noise unless it is step num_inference_steps - 1."""
        ts = self._timestep_values
        prev_t = int(ts[i + 1]) if i + 1 < len(ts) else t
        return t, prev_t, i != self.num_inference_steps - 1

    def _coef_table(self) -> np.ndarray:
        ts = self._timestep_values
        moves = [self._transition(i, int(t)) for i, t in enumerate(ts.tolist())]
        return self._coef_rows(*(np.array(v) for v in zip(*moves))) if moves else np.zeros((0, coefs.NCOEF))

    # ------------------------------------------------------------------ step

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator=None,
        return_dict: bool = True,
        *,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One LCM step. ``model_output`` (B, ...) like ``sample`` (or a doubled batch with ``guidance_scale``);
        ``timestep`` an element of ``self.timesteps`` (no host sync). Returns ``LCMSchedulerOutput(prev_sample,
        denoised)`` or ``(prev_sample, denoised)``."""
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

    def draws_noise(self, step_kwargs=None) -> bool:
        return True  # every step but the last (none for a one-step schedule)

    def _plan(self, i, timestep, model_output, sample, opts) -> StepPlan:
        t = integer_timestep(self._timestep_value(timestep))
        t, prev_t, noisy = self._transition(i, t)
        coef = None
        if t != self._timestep_values[i]:  # a timestep other than the step index's: diffusers uses it
            coef = self._cached(
                ("row", i, t, sample.device),
                lambda: torch.from_numpy(self._coef_rows([t], [prev_t], [noisy])[0].astype(np.float32)).to(
                    sample.device
                ),
            )
        out_dtype = torch.result_type(sample, model_output)
        cfg = self.config
        return StepPlan(
            i,
            row=i,
            coef=coef,
            noise_dtype=out_dtype if noisy else None,
            offset=i,
            write_x0=self._folded,
            last=None if self._folded else sample,
            corr_out=None if self._folded else torch.empty(sample.shape, dtype=out_dtype, device=sample.device),
            clip_range=cfg.clip_sample_range if cfg.clip_sample else 0.0,
            thresholding=cfg.thresholding,
            state={"timestep": timestep, "t": t, "prev_t": prev_t},
        )

    def _reference_step(self, plan, model_output, sample, noise, opts):
        cfg = self.config
        timestep = plan.state["timestep"]
        if not isinstance(timestep, torch.Tensor):
            timestep = plan.state["t"]
        return lcm_step(
            model_output,
            timestep,
            sample,
            alphas_cumprod=self.alphas_cumprod,
            final_alpha_cumprod=self.final_alpha_cumprod,
            prev_t=plan.state["prev_t"],
            timestep_scaling=cfg.timestep_scaling,
            prediction_type=cfg.prediction_type,
            clip_sample=cfg.clip_sample,
            clip_sample_range=cfg.clip_sample_range,
            thresholding=cfg.thresholding,
            dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
            sample_max_value=cfg.sample_max_value,
            noise=noise,
        )

    def _advance(self, plan) -> None:
        self._denoised = plan.corr_out  # the corrector output, when the row wrote denoised there
        super()._advance(plan)

    def _output(self, prev, x0, return_dict: bool):
        denoised = x0 if x0 is not None else self._denoised
        self._denoised = None
        if not return_dict:
            return (prev, denoised)
        return LCMSchedulerOutput(prev_sample=prev, denoised=denoised)

    # ------------------------------------------------------------------ diffusers' other public methods

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def add_noise(self, original_samples, noise, timesteps, *, noise_seed=None):
        """q(x_t | x_0) at training timesteps, one launch; see ``DDPMScheduler.add_noise``."""
        return add_noise_train_timesteps(self, original_samples, noise, timesteps, noise_seed)

    def get_velocity(self, sample, noise, timesteps):
        """v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) sample."""
        return reference.get_velocity(self.alphas_cumprod, sample, noise, _as_timestep_tensor(timesteps, sample))
