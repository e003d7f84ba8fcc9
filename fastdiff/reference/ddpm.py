"""DDPM ancestral step (Ho et al. 2020, arXiv:2006.11239, eqs. 6-7 and 15), op by op."""

from __future__ import annotations

import torch

from .common import threshold_sample


def _predict_x0(prediction_type, sample, model_output, alpha_prod_t, beta_prod_t):
    if prediction_type == "epsilon":
        return (sample - beta_prod_t ** (0.5) * model_output) / alpha_prod_t ** (0.5)
    if prediction_type == "sample":
        return model_output
    if prediction_type == "v_prediction":
        return (alpha_prod_t**0.5) * sample - (beta_prod_t**0.5) * model_output
    raise ValueError(f"`prediction_type` must be one of ['epsilon', 'sample', 'v_prediction'], got {prediction_type!r}")


def _clip_or_threshold(x0, clip_sample, clip_sample_range, thresholding, ratio, max_value):
    if thresholding:
        return threshold_sample(x0, ratio, max_value)
    if clip_sample:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0


def ddpm_variance(alphas_cumprod, t, prev_t, variance_type, predicted_variance=None):
    """The std-or-log-variance quantity diffusers' ``DDPMScheduler._get_variance`` returns."""
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    current_beta_t = 1 - alpha_prod_t / alpha_prod_t_prev
    variance = torch.clamp((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, min=1e-20)
    if variance_type == "fixed_small":
        return variance
    if variance_type == "fixed_small_log":
        return torch.exp(0.5 * torch.log(variance))
    if variance_type in ("fixed_large", "fixed_large_log"):
        # fixed_large_log is Glide's "max log" variance, beta_t, kept in log space; diffusers 0.42 returns
        # log(beta_t) and then takes its square root (NaN). We use beta_t, which is what it denotes.
        return current_beta_t
    if variance_type == "learned":
        return predicted_variance
    if variance_type == "learned_range":
        min_log = torch.log(variance)
        max_log = torch.log(current_beta_t)
        frac = (predicted_variance + 1) / 2
        return frac * max_log + (1 - frac) * min_log
    raise ValueError(f"unknown `variance_type` {variance_type!r}")


def ddpm_step(
    model_output: torch.Tensor,
    t: int,
    sample: torch.Tensor,
    *,
    alphas_cumprod: torch.Tensor,
    prev_t: int,
    prediction_type: str = "epsilon",
    variance_type: str = "fixed_small",
    clip_sample: bool = True,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDPM step from timestep ``t`` to ``prev_t`` (-1 at the end of the chain).

    model_output: (B, C, ...) or (B, 2C, ...) for the learned variance types; sample: (B, C, ...);
    alphas_cumprod: float32 (T,); noise: standard normal like sample, used when t > 0.
    Returns (prev_sample, pred_original_sample).
    """
    predicted_variance = None
    if variance_type in ("learned", "learned_range") and model_output.shape[1] == sample.shape[1] * 2:
        model_output, predicted_variance = torch.split(model_output, sample.shape[1], dim=1)

    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev
    current_alpha_t = alpha_prod_t / alpha_prod_t_prev
    current_beta_t = 1 - current_alpha_t

    pred_original_sample = _predict_x0(prediction_type, sample, model_output, alpha_prod_t, beta_prod_t)
    pred_original_sample = _clip_or_threshold(
        pred_original_sample, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
    )

    pred_original_sample_coeff = (alpha_prod_t_prev ** (0.5) * current_beta_t) / beta_prod_t
    current_sample_coeff = current_alpha_t ** (0.5) * beta_prod_t_prev / beta_prod_t
    pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

    if t > 0:
        if noise is None:
            raise ValueError("`noise` is required for a DDPM step with t > 0")
        variance = ddpm_variance(alphas_cumprod, t, prev_t, variance_type, predicted_variance)
        if variance_type == "fixed_small_log":
            pred_prev_sample = pred_prev_sample + variance * noise
        elif variance_type in ("learned_range", "fixed_large_log"):
            log_var = variance if variance_type == "learned_range" else torch.log(variance)
            pred_prev_sample = pred_prev_sample + torch.exp(0.5 * log_var) * noise
        else:
            pred_prev_sample = pred_prev_sample + (variance**0.5) * noise
    return pred_prev_sample, pred_original_sample
