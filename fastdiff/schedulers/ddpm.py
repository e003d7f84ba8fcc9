"""Drop-in ``DDPMScheduler``: diffusers' constructor, API and noise draws; one fused launch per step."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .. import coefs, reference
from ..coefs import VarMode
from ..schedules import (
    TIMESTEP_SPACINGS,
    alphas_cumprod_from_betas,
    check_choice,
    check_custom_timesteps,
    make_betas,
    spaced_timesteps,
)
from ._base import SchedulerBase, SchedulerOutput, StepPlan
from ._predict import PREDICTION_TYPES, vp_x0
from ._registry import register

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned", "learned_range")

DDPMSchedulerOutput = SchedulerOutput


def x0_coefficients(prediction_type: str, alpha_prod_t) -> tuple:
    """(X_S, A_X, A_M) at abar_t (a float or a float64 array), with 1 - abar formed in float32 as diffusers
    forms it."""
    b = (np.float32(1.0) - np.asarray(alpha_prod_t, dtype=np.float32)).astype(np.float64)
    return vp_x0(prediction_type, np.sqrt(alpha_prod_t), np.sqrt(b))


@register(presets={"ddpm": ({}, {})})
class DDPMScheduler(SchedulerBase):
    """Denoising diffusion probabilistic models (Ho et al. 2020), as diffusers' ``DDPMScheduler``.

    Same constructor arguments and defaults as diffusers 0.42; ``backend`` ("auto", "cuda", "triton",
    "reference"; default from ``FASTDIFF_BACKEND``) picks the implementation. ``step`` accepts, besides
    diffusers' arguments, ``guidance_scale`` (the model output is an (unconditional, conditional)
    doubled batch, combined inside the fused kernel), ``guidance_rescale`` and ``noise_seed`` (Philox
    noise drawn in the kernel instead of a torch.randn tensor).
    """

    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, list]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = True,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        *,
        backend: Optional[str] = None,
    ):
        self._register_config(locals(), backend)
        # None is DPM-Solver's default, carried here by from_config; diffusers' DDPM then uses fixed_small
        check_choice("variance_type", variance_type, VARIANCE_TYPES + (None,))
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        self.one = torch.tensor(1.0)
        self.init_noise_sigma = 1.0
        self.variance_type = "fixed_small" if variance_type is None else variance_type
        self.custom_timesteps = False
        self.num_inference_steps = None
        full = np.arange(0, num_train_timesteps)[::-1].copy()
        self._set_schedule(full, None)
        self._prev = full - 1

    # ------------------------------------------------------------------ schedule

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None):
        """Set the inference timesteps: ``num_inference_steps`` spaced by ``config.timestep_spacing``, or a
        custom strictly descending list ``timesteps``. The coefficient tables are rebuilt on first use on
        the sample's device."""
        ts = integer_schedule(self, num_inference_steps, timesteps)
        # the tables read the timesteps (each step goes to the next), the config and the training schedule
        self._set_schedule(ts, device, fingerprint=b"")
        self._prev = np.append(ts[1:], -1)

    def previous_timestep(self, timestep):
        """The timestep after ``timestep`` in the chain (-1 after the last), as a tensor like diffusers."""
        return torch.tensor(int(self._prev[self._locate(timestep)]))

    def _get_variance(self, t, predicted_variance=None, variance_type=None) -> torch.Tensor:
        """diffusers' (private) per-timestep variance quantity, for code and tests that call it: the variance
        (fixed_small, fixed_large), its square root (fixed_small_log), log(beta_t) (fixed_large_log), the
        predicted variance (learned) or the interpolated log-variance (learned_range)."""
        t = int(t)
        prev_t = int(self.previous_timestep(t))
        vt = variance_type or self.variance_type
        value = reference.ddpm_variance(self.alphas_cumprod, t, prev_t, vt, predicted_variance)
        return torch.log(value) if vt == "fixed_large_log" else value

    # ------------------------------------------------------------------ coefficients

    def _coef_table(self) -> np.ndarray:
        """One row per inference step (Ho et al. 2020, eqs. 6-7: the posterior mean and variance). They are
        formed in float32 with diffusers' operations in diffusers' order: 1 - abar_t / abar_prev cancels at
        small t, and the float64 value differs from diffusers' by up to 1e-4 relative there (t = 1), enough to
        move diffusers' own full-loop regression sums (measured: 387.9677 vs 387.9466 with noise)."""
        t = torch.from_numpy(self._timestep_values.astype(np.int64))
        prev_t = torch.from_numpy(self._prev.astype(np.int64))
        acp = self.alphas_cumprod.cpu()
        a = acp[t]
        ap = torch.where(prev_t >= 0, acp[prev_t.clamp(min=0)], torch.ones(()))
        b, bp = 1 - a, 1 - ap
        cur_a = a / ap
        cur_b = 1 - cur_a
        var = torch.clamp(bp / b * cur_b, min=1e-20)
        table = np.zeros((len(t), coefs.NCOEF))
        table[:, coefs.X_S], table[:, coefs.A_X], table[:, coefs.A_M] = x0_coefficients(
            self.config.prediction_type, a.double().numpy()
        )
        table[:, coefs.E_S] = 1.0
        table[:, coefs.C_0] = ((ap ** (0.5) * cur_b) / b).double().numpy()
        table[:, coefs.C_X] = (cur_a ** (0.5) * bp / b).double().numpy()
        vt = self.variance_type
        if vt in ("fixed_small", "fixed_small_log"):
            sigma = (var**0.5).double().numpy()
        elif vt in ("fixed_large", "fixed_large_log"):
            sigma = (cur_b**0.5).double().numpy()
        else:
            sigma = np.ones(len(t))
            lo, hi = torch.log(var).double().numpy(), torch.log(cur_b).double().numpy()
            table[:, coefs.LV_A], table[:, coefs.LV_B] = (hi - lo) / 2, (hi + lo) / 2
        table[:, coefs.SIGMA] = np.where(t.numpy() > 0, sigma, 0.0)  # no noise into x_0
        return table

    # ------------------------------------------------------------------ step

    def _channel_factors(self) -> tuple:
        return (2,) if self._learned else (1,)

    @property
    def _learned(self) -> bool:
        return self.variance_type in ("learned", "learned_range")

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
        """One reverse step x_t -> x_{t-1}.

        model_output: (B, C, ...) like ``sample``, or (B, 2C, ...) for the learned variance types, or a
        doubled batch (2B, ...) with ``guidance_scale``. timestep: an element of ``self.timesteps``.
        Noise (when t > 0) is drawn exactly as diffusers draws it from ``generator`` (or the global RNG),
        unless ``noise_seed`` asks for in-kernel Philox noise. Returns ``SchedulerOutput`` or a tuple.
        """
        if self._learned and guidance_scale is not None:
            raise ValueError(
                f"`guidance_scale` cannot be combined with variance_type {self.variance_type!r}: guide the model "
                "output before the step"
            )
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
        return True

    def _plan(self, i, timestep, model_output, sample, opts) -> StepPlan:
        t = int(self._timestep_values[i])
        channels = sample.shape[1]
        learned = self._learned
        eps = model_output[:, :channels] if learned else model_output
        cfg = self.config
        return StepPlan(
            i,
            row=i,
            noise_dtype=eps.dtype if t > 0 else None,
            offset=i,
            model_output=eps,
            var=model_output[:, channels:] if learned else None,
            var_mode={"learned": VarMode.LEARNED, "learned_range": VarMode.LEARNED_RANGE}.get(
                self.variance_type, VarMode.FIXED
            ),
            clip_range=cfg.clip_sample_range if cfg.clip_sample else 0.0,
            thresholding=cfg.thresholding,
            state={"t": t, "prev_t": int(self._prev[i]), "full_output": model_output},
        )

    def _reference_step(self, plan, model_output, sample, noise, opts):
        cfg = self.config
        full = plan.state["full_output"] if plan.var is not None else model_output
        return reference.ddpm_step(
            full,
            plan.state["t"],
            sample,
            alphas_cumprod=self.alphas_cumprod,
            prev_t=plan.state["prev_t"],
            prediction_type=cfg.prediction_type,
            variance_type=self.variance_type,
            clip_sample=cfg.clip_sample,
            clip_sample_range=cfg.clip_sample_range,
            thresholding=cfg.thresholding,
            dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
            sample_max_value=cfg.sample_max_value,
            noise=noise,
        )

    # ------------------------------------------------------------------ forward process

    def add_noise(
        self, original_samples: torch.Tensor, noise: Optional[torch.Tensor], timesteps, *, noise_seed=None
    ) -> torch.Tensor:
        """q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) noise, one launch. ``timesteps``: integer
        tensor with 1 or B entries. ``noise`` may be None when ``noise_seed`` asks for Philox noise."""
        return add_noise_train_timesteps(self, original_samples, noise, timesteps, noise_seed)

    def get_velocity(self, sample: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """v-prediction target sqrt(abar_t) noise - sqrt(1 - abar_t) sample."""
        timesteps = _as_timestep_tensor(timesteps, sample)
        return reference.get_velocity(self.alphas_cumprod, sample, noise, timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample


def integer_schedule(sched, num_inference_steps, timesteps) -> np.ndarray:
    """Shared by DDPM and DDIM: the integer timesteps for ``num_inference_steps`` (config spacing and
    offset) or a validated custom list; sets ``custom_timesteps`` and ``num_inference_steps``."""
    T = sched.config.num_train_timesteps
    if num_inference_steps is not None and timesteps is not None:
        raise ValueError("pass either `num_inference_steps` or `timesteps`, not both")
    if timesteps is not None:
        ts = check_custom_timesteps(timesteps, T)
        sched.custom_timesteps = True
        sched.num_inference_steps = len(ts)
        return ts
    if num_inference_steps is None:
        raise ValueError("`num_inference_steps` or `timesteps` is required")
    ts = spaced_timesteps(T, num_inference_steps, sched.config.timestep_spacing, sched.config.steps_offset)
    if ts.max() >= T or ts.min() < 0:
        raise ValueError(
            f"`steps_offset`={sched.config.steps_offset} puts timesteps {ts.tolist()[:3]}... outside "
            f"[0, num_train_timesteps={T})"
        )
    sched.custom_timesteps = False
    sched.num_inference_steps = num_inference_steps
    return ts


def _as_timestep_tensor(timesteps, sample: torch.Tensor) -> torch.Tensor:
    if not isinstance(timesteps, torch.Tensor):
        timesteps = torch.as_tensor(timesteps)
    if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
        raise TypeError(f"`timesteps` must be an integer tensor, got dtype {timesteps.dtype}")
    timesteps = timesteps.reshape(-1)
    if timesteps.numel() not in (1, sample.shape[0]):
        raise ValueError(f"`timesteps` must have 1 or batch={sample.shape[0]} entries, got {timesteps.numel()}")
    return timesteps


def add_noise_train_timesteps(sched, original_samples, noise, timesteps, noise_seed):
    """Shared by DDPM and DDIM: forward noising indexed by training timestep."""
    x = original_samples
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("`original_samples` must be a floating-point tensor")
    timesteps = _as_timestep_tensor(timesteps, x)
    T = sched.config.num_train_timesteps
    if timesteps.device.type == "cpu":  # checking costs nothing here; on the GPU it would cost a sync
        bad = (timesteps < 0) | (timesteps >= T)
        if bool(bad.any()):
            raise ValueError(f"`timesteps` must lie in [0, {T}), got {timesteps[bad].tolist()}")

    def table():
        acp = sched.alphas_cumprod.double()
        return torch.stack([acp.sqrt(), (1 - acp).sqrt()], dim=1).float().contiguous().to(x.device)

    def ref(x, noise, index):
        return reference.add_noise(sched.alphas_cumprod, x, noise, index)

    return sched._add_noise(x, noise, timesteps, noise_seed, "train", table, ref)
