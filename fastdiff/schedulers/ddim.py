"""Drop-in ``DDIMScheduler``: diffusers' constructor, API and noise draws; one fused launch per step."""

from __future__ import annotations

import math
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
from ._base import SchedulerBase, SchedulerOutput
from ._registry import register
from .ddpm import PREDICTION_TYPES, _as_timestep_tensor, add_noise_train_timesteps, integer_schedule, x0_coefficients

DDIMSchedulerOutput = SchedulerOutput


@register(presets={"ddim": ({"timestep_spacing": "trailing"}, {})})
class DDIMScheduler(SchedulerBase):
    """Denoising diffusion implicit models (Song et al. 2021), as diffusers' ``DDIMScheduler``.

    Same constructor arguments and defaults as diffusers 0.42; ``set_timesteps`` also takes a custom
    ``timesteps`` list (each step then goes to the next listed timestep). ``step`` accepts diffusers'
    arguments plus ``guidance_scale``, ``guidance_rescale`` and ``noise_seed`` (see ``DDPMScheduler``).
    """

    order = 1

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
        self._set_schedule(ts, device)
        self._prev = prev

    def previous_timestep(self, timestep):
        i = self.index_for_timestep(timestep)
        return torch.tensor(int(self._prev[i]))

    def _coef_table(self, eta: float, use_clipped_model_output: bool) -> np.ndarray:
        cfg = self.config
        acp = self.alphas_cumprod.double().cpu().numpy()
        final = float(self.final_alpha_cumprod)
        table = np.zeros((len(self._timestep_values), coefs.NCOEF))
        for i, (t, prev_t) in enumerate(zip(self._timestep_values.tolist(), self._prev.tolist())):
            a = acp[t]
            ap = acp[prev_t] if prev_t >= 0 else final
            b = 1.0 - a
            row = table[i]
            row[coefs.X_S], row[coefs.A_X], row[coefs.A_M] = x0_coefficients(cfg.prediction_type, a)
            sb = math.sqrt(float(np.float32(1.0) - np.float32(a)))
            inv_sb = 1.0 / sb if sb > 0 else math.inf
            row[coefs.E_S] = 1.0
            if use_clipped_model_output:
                row[coefs.E_S], row[coefs.E_X], row[coefs.E_0] = inv_sb, 1.0, -math.sqrt(a)
            elif cfg.prediction_type == "epsilon":
                row[coefs.E_M] = 1.0
            elif cfg.prediction_type == "sample":
                row[coefs.E_S], row[coefs.E_X], row[coefs.E_M] = inv_sb, 1.0, -math.sqrt(a)
            else:  # v_prediction
                row[coefs.E_X], row[coefs.E_M] = sb, math.sqrt(a)
            variance = ((1 - ap) / b) * (1 - a / ap)
            std = eta * math.sqrt(variance)
            row[coefs.C_0] = math.sqrt(ap)
            direction = 1 - ap - std**2
            row[coefs.C_E] = math.sqrt(direction) if direction >= 0 else math.nan
            row[coefs.SIGMA] = std if eta > 0 else 0.0
        return table

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
        (drawn like diffusers), the global RNG, or in-kernel Philox with ``noise_seed``."""
        self._check_ready()
        batch = self._validate_step(model_output, sample, guidance_scale)
        if not isinstance(eta, (int, float)) or eta < 0:
            raise ValueError(f"`eta` must be a float >= 0, got {eta!r}")
        i = self.index_for_timestep(timestep)
        device = sample.device
        out_dtype = torch.result_type(sample, model_output)
        backend = self._resolve_backend(device)

        noise = seed = offset = None
        if eta > 0:
            if variance_noise is not None and generator is not None:
                raise ValueError("pass either `generator` or `variance_noise`, not both")
            noise, seed, offset = self._draw_noise(
                sample.shape, generator, device, model_output.dtype, noise_seed, variance_noise, batch, i
            )

        if backend == "reference":
            noise = self._reference_noise(noise, seed, offset, sample, model_output.dtype)
            mo = self._reference_guided(model_output, guidance_scale, guidance_rescale)
            cfg = self.config
            prev, x0 = reference.ddim_step(
                mo,
                int(self._timestep_values[i]),
                sample,
                alphas_cumprod=self.alphas_cumprod,
                final_alpha_cumprod=self.final_alpha_cumprod,
                prev_t=int(self._prev[i]),
                eta=eta,
                use_clipped_model_output=use_clipped_model_output,
                prediction_type=cfg.prediction_type,
                clip_sample=cfg.clip_sample,
                clip_sample_range=cfg.clip_sample_range,
                thresholding=cfg.thresholding,
                dynamic_thresholding_ratio=cfg.dynamic_thresholding_ratio,
                sample_max_value=cfg.sample_max_value,
                noise=noise,
            )
        else:
            table = self._device_table((float(eta), bool(use_clipped_model_output)), device)
            guidance, mscale = self._guidance_args(model_output, guidance_scale, guidance_rescale, device)
            prev, x0 = self._fused(
                backend,
                table[i],
                model_output,
                sample,
                out_dtype=out_dtype,
                noise=noise,
                seed=seed,
                offset=offset,
                guidance=guidance,
                mscale=mscale,
                clip_range=self.config.clip_sample_range if self.config.clip_sample else 0.0,
                thresholding=self.config.thresholding,
            )
        if not return_dict:
            return (prev, x0)
        return SchedulerOutput(prev_sample=prev, pred_original_sample=x0)

    def add_noise(self, original_samples, noise, timesteps, *, noise_seed=None):
        """q(x_t | x_0) in one launch; see ``DDPMScheduler.add_noise``."""
        return add_noise_train_timesteps(self, original_samples, noise, timesteps, noise_seed)

    def get_velocity(self, sample, noise, timesteps):
        timesteps = _as_timestep_tensor(timesteps, sample)
        return reference.get_velocity(self.alphas_cumprod, sample, noise, timesteps)

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample
