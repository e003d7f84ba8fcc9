"""DDIM step (Song et al. 2021, arXiv:2010.02502, eqs. 12 and 16), op by op."""

from __future__ import annotations

import torch

from .ddpm import _clip_or_threshold


def ddim_step(
    model_output: torch.Tensor,
    t: int,
    sample: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    prev_t: int,
    eta: float = 0.0,
    use_clipped_model_output: bool = False,
    prediction_type: str = "epsilon",
    clip_sample: bool = True,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step from ``t`` to ``prev_t`` (negative: use ``final_alpha_cumprod``).

    model_output, sample: (B, C, ...); noise: standard normal like sample, used when eta > 0.
    Returns (prev_sample, pred_original_sample).
    """
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t

    if prediction_type == "epsilon":
        pred_original_sample = (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
        pred_epsilon = model_output
    elif prediction_type == "sample":
        pred_original_sample = model_output
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)
    elif prediction_type == "v_prediction":
        pred_original_sample = (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
        pred_epsilon = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    else:
        raise ValueError(
            f"`prediction_type` must be one of ['epsilon', 'sample', 'v_prediction'], got {prediction_type!r}"
        )

    pred_original_sample = _clip_or_threshold(
        pred_original_sample, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
    )

    variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
    std_dev_t = eta * variance ** (0.5)

    if use_clipped_model_output:
        pred_epsilon = (sample - alpha_prod_t ** (0.5) * pred_original_sample) / beta_prod_t ** (0.5)

    pred_sample_direction = (1 - alpha_prod_t_prev - std_dev_t**2) ** (0.5) * pred_epsilon
    prev_sample = alpha_prod_t_prev ** (0.5) * pred_original_sample + pred_sample_direction

    if eta > 0:
        if noise is None:
            raise ValueError("`noise` is required for a DDIM step with eta > 0")
        prev_sample = prev_sample + std_dev_t * noise
    return prev_sample, pred_original_sample
