"""Latent consistency model multistep sampling (Luo et al. 2023, arXiv:2310.04378, Algorithm 3), op by op as
diffusers writes it."""

from __future__ import annotations

import torch

from .ddpm import _clip_or_threshold

SIGMA_DATA = 0.5  # the consistency model's data standard deviation (Song et al. 2023, arXiv:2303.01469)


def lcm_scalings(timestep, timestep_scaling: float = 10.0) -> tuple:
    """The consistency boundary condition's (c_skip, c_out) at ``timestep`` (an int, or a tensor: then
    float32 tensors), with the timestep scaled by ``timestep_scaling``."""
    scaled_timestep = timestep * timestep_scaling
    c_skip = SIGMA_DATA**2 / (scaled_timestep**2 + SIGMA_DATA**2)
    c_out = scaled_timestep / (scaled_timestep**2 + SIGMA_DATA**2) ** 0.5
    return c_skip, c_out


def lcm_step(
    model_output: torch.Tensor,
    timestep,
    sample: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    prev_t,
    timestep_scaling: float = 10.0,
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LCM step: the consistency function's denoised estimate at ``timestep``, then, when ``noise`` is
    given (every step but the last), forward noising to ``prev_t`` (negative: ``final_alpha_cumprod``).

    model_output, sample, noise: (B, ...) alike. Returns (prev_sample, denoised)."""
    alpha_prod_t = alphas_cumprod[timestep]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    c_skip, c_out = lcm_scalings(timestep, timestep_scaling)

    if prediction_type == "epsilon":
        predicted_original_sample = (sample - beta_prod_t.sqrt() * model_output) / alpha_prod_t.sqrt()
    elif prediction_type == "sample":
        predicted_original_sample = model_output
    elif prediction_type == "v_prediction":
        predicted_original_sample = alpha_prod_t.sqrt() * sample - beta_prod_t.sqrt() * model_output
    else:
        raise ValueError(
            f"`prediction_type` must be one of ['epsilon', 'sample', 'v_prediction'], got {prediction_type!r}"
        )
    predicted_original_sample = _clip_or_threshold(
        predicted_original_sample,
        clip_sample,
        clip_sample_range,
        thresholding,
        dynamic_thresholding_ratio,
        sample_max_value,
    )

    denoised = c_out * predicted_original_sample + c_skip * sample
    if noise is None:
        return denoised, denoised
    return alpha_prod_t_prev.sqrt() * denoised + beta_prod_t_prev.sqrt() * noise, denoised
