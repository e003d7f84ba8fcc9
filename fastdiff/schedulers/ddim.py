"""Drop-in ``DDIMScheduler``: diffusers' constructor, API and noise draws; one fused launch per step."""

from __future__ import annotations

from typing import Optional, Union

import numpy as np
import torch

from .. import coefs, reference
from ..schedules import (
    TIMESTEP_SPACINGS,
    alphas_cumprod_from_betas,
    check_choice,
    make_betas,
)
from ._base import SchedulerBase, SchedulerOutput, StepPlan
from ._predict import PREDICTION_TYPES
from ._registry import register
from .ddpm import _as_timestep_tensor, add_noise_train_timesteps, integer_schedule, x0_coefficients

DDIMSchedulerOutput = SchedulerOutput


@register(presets={"ddim": ({"timestep_spacing": "trailing"}, {})})
class DDIMScheduler(SchedulerBase):
    """Denoising diffusion implicit models (Song et al. 2021), as diffusers' ``DDIMScheduler``.

    Same constructor arguments and defaults as diffusers 0.42; ``set_timesteps`` also takes a custom
    ``timesteps`` list (each step then goes to the next listed timestep). ``step`` accepts diffusers'
    arguments plus ``guidance_scale``, ``guidance_rescale`` and ``noise_seed`` (see ``DDPMScheduler``).
    """

    order = 1
    _plain_plans = True  # an in-schedule plan is a function of the step index, the output dtype and eta

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: Optional[Union[np.ndarray, list]] = None,
        clip_sample: bool = True,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        rescale_betas_zero_snr: bool = False,
        *,
        backend: Optional[str] = None,
    ):
        self._register_config(locals(), backend)
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("timestep_spacing", timestep_spacing, TIMESTEP_SPACINGS)
        self.betas = make_betas(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr
        )
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = alphas_cumprod_from_betas(self.betas)
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.custom_timesteps = False
        full = np.arange(0, num_train_timesteps)[::-1].copy().astype(np.int64)
        self._set_schedule(full, None)
        self._prev = full - 1

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device=None, timesteps=None):
        """Set the inference timesteps (``config.timestep_spacing``), or a custom descending list."""
        ts = integer_schedule(self, num_inference_steps, timesteps)
        if self.custom_timesteps:
            prev = np.append(ts[1:], -1)
        else:  # diffusers steps by T // n whatever the spacing; reproduced for identical results
            prev = ts - self.config.num_train_timesteps // num_inference_steps
        # the tables read the timesteps, where each step goes, the config and the training schedule (fixed)
        self._set_schedule(ts, device, fingerprint=np.asarray(prev, dtype=np.int64).tobytes())
        self._prev = prev

    def previous_timestep(self, timestep):
        """The timestep this step goes to: the next listed one for custom timesteps, else t - T // n (for any
        integer t, in the schedule or not, as diffusers computes it)."""
        i = self.index_for_timestep(timestep)
        if i is not None:
            return torch.tensor(int(self._prev[i]))
        return torch.tensor(self._off_schedule_prev(self._timestep_value(timestep)))

    def _off_schedule_prev(self, t) -> int:
        T = self.config.num_train_timesteps
        if self.custom_timesteps:
            raise self._schedule_error(t)
        if isinstance(t, float) and not t.is_integer() or not 0 <= t < T:
            raise ValueError(f"`timestep`={t!r} must be an integer in [0, num_train_timesteps={T})")
        return int(t) - T // self.num_inference_steps

    def _get_variance(self, timestep, prev_timestep) -> torch.Tensor:
        """diffusers' (private) DDIM variance (1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev)."""
        a = self.alphas_cumprod[int(timestep)]
        ap = self.alphas_cumprod[int(prev_timestep)] if int(prev_timestep) >= 0 else self.final_alpha_cumprod
        return (1 - ap) / (1 - a) * (1 - a / ap)

    # ------------------------------------------------------------------ coefficients

    def _coef_rows(self, t, prev_t, eta: float, use_clipped_model_output: bool) -> np.ndarray:
        """DDIM's update (Song et al. 2021, eq. 12) from each t to its prev_t (integer arrays), one row each."""
        cfg = self.config
        acp = self.alphas_cumprod.double().cpu().numpy()
        t, prev_t = np.asarray(t, dtype=np.int64), np.asarray(prev_t, dtype=np.int64)
        a = acp[t]
        ap = np.where(prev_t >= 0, acp[np.maximum(prev_t, 0)], float(self.final_alpha_cumprod))
        rows = np.zeros((len(t), coefs.NCOEF))
        rows[:, coefs.X_S], rows[:, coefs.A_X], rows[:, coefs.A_M] = x0_coefficients(cfg.prediction_type, a)
        with np.errstate(divide="ignore", invalid="ignore"):
            # pred_epsilon: from the model output, or (clipped) from x0; sqrt(1 - abar) formed in float32
            sb = np.sqrt((np.float32(1.0) - a.astype(np.float32)).astype(np.float64))
            rows[:, coefs.E_S] = 1.0
            if use_clipped_model_output:
                rows[:, coefs.E_S], rows[:, coefs.E_X], rows[:, coefs.E_0] = 1.0 / sb, 1.0, -np.sqrt(a)
            elif cfg.prediction_type == "epsilon":
                rows[:, coefs.E_M] = 1.0
            elif cfg.prediction_type == "sample":
                rows[:, coefs.E_S], rows[:, coefs.E_X], rows[:, coefs.E_M] = 1.0 / sb, 1.0, -np.sqrt(a)
            else:  # v_prediction
                rows[:, coefs.E_X], rows[:, coefs.E_M] = sb, np.sqrt(a)
            # x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - std^2) eps + std z
            std = eta * np.sqrt(((1 - ap) / (1.0 - a)) * (1 - a / ap))
            direction = 1 - ap - std**2
            rows[:, coefs.C_0] = np.sqrt(ap)
            rows[:, coefs.C_E] = np.where(direction >= 0, np.sqrt(np.maximum(direction, 0.0)), np.nan)
            rows[:, coefs.SIGMA] = std if eta > 0 else 0.0
        return rows

    def _coef_table(self, eta: float, use_clipped_model_output: bool) -> np.ndarray:
        return self._coef_rows(self._timestep_values, self._prev, eta, use_clipped_model_output)

    # ------------------------------------------------------------------ step

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        eta: float = 0.0,
        use_clipped_model_output: bool = False,
        generator=None,
        variance_noise: Optional[torch.Tensor] = None,
        return_dict: bool = True,
        *,
        guidance_scale=None,
        guidance_rescale: float = 0.0,
        noise_seed=None,
    ):
        """One DDIM step x_t -> x_{prev}. Noise (eta > 0) comes from ``variance_noise``, ``generator``
        (drawn like diffusers), the global RNG, or in-kernel Philox with ``noise_seed``. An integer timestep
        outside the schedule steps to t - T // n, as diffusers does (one host read, a sync on CUDA)."""
        self._check_ready()
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not eta >= 0:
            raise ValueError(f"`eta` must be a float >= 0, got {eta!r}")
        return self._step(
            model_output,
            timestep,
            sample,
            {"eta": float(eta), "use_clipped_model_output": bool(use_clipped_model_output)},
            generator=generator,
            variance_noise=variance_noise,
            return_dict=return_dict,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            noise_seed=noise_seed,
        )

    def draws_noise(self, step_kwargs=None) -> bool:
        return (step_kwargs or {}).get("eta", 0.0) > 0

    def _locate(self, timestep):
        return self.index_for_timestep(timestep)  # None: off the schedule, handled by _plan

    def _plan(self, i, timestep, model_output, sample, opts) -> StepPlan:
        key = (opts["eta"], opts["use_clipped_model_output"])
        coef = None
        if i is not None:
            t, prev_t = int(self._timestep_values[i]), int(self._prev[i])
            offset = i
        else:
            value = self._timestep_value(timestep)
            prev_t = self._off_schedule_prev(value)  # raises for a fractional or out-of-range timestep
            t = int(value)
            offset = len(self._timestep_values) + t  # a Philox offset no in-schedule step uses
            coef = self._cached(
                ("row", t, key, sample.device),
                lambda: torch.from_numpy(self._coef_rows([t], [prev_t], *key)[0].astype(np.float32)).to(sample.device),
            )
        cfg = self.config
        return StepPlan(
            i,
            table_key=key,
            row=i,
            coef=coef,
            noise_dtype=model_output.dtype if opts["eta"] > 0 else None,
            offset=offset,
            clip_range=cfg.clip_sample_range if cfg.clip_sample else 0.0,
            thresholding=cfg.thresholding,
            state={"t": t, "prev_t": prev_t},
        )

    def _reference_step(self, plan, model_output, sample, noise, opts):
        cfg = self.config
        return reference.ddim_step(
            model_output,
            plan.state["t"],
            sample,
            alphas_cumprod=self.alphas_cumprod,
            final_alpha_cumprod=self.final_alpha_cumprod,
            prev_t=plan.state["prev_t"],
            eta=opts["eta"],
            use_clipped_model_output=opts["use_clipped_model_output"],
            prediction_type=cfg.prediction_type,
            clip_sample=cfg.clip_sample,
            clip_sample_range=cfg.clip_sample_range,
            thresholding=cfg.thresholding,
            dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
            sample_max_value=cfg.sample_max_value,
            noise=noise,
        )

    def add_noise(self, original_samples, noise, timesteps, *, noise_seed=None):
        """q(x_t | x_0) in one launch; see ``DDPMScheduler.add_noise``."""
        return add_noise_train_timesteps(self, original_samples, noise, timesteps, noise_seed)

    def get_velocity(self, sample, noise, timesteps):
        timesteps = _as_timestep_tensor(timesteps, sample)
        return reference.get_velocity(self.alphas_cumprod, sample, noise, timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample
