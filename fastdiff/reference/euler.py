"""Euler and Euler-ancestral steps in sigma space (Karras et al. 2022, arXiv:2206.00364, Algorithm 2;
k-diffusion's ``sample_euler`` / ``sample_euler_ancestral``), op by op as diffusers writes them."""

from __future__ import annotations

import torch


def euler_x0(prediction_type: str, sample, model_output, sigma, sigma_hat):
    if prediction_type in ("original_sample", "sample"):
        return model_output
    if prediction_type == "epsilon":
        return sample - sigma_hat * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (sample / (sigma**2 + 1))
    raise ValueError(f"`prediction_type` must be one of ['epsilon', 'v_prediction', 'sample'], got {prediction_type!r}")


def euler_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    prediction_type: str = "epsilon",
    gamma: float = 0.0,
    s_noise: float = 1.0,
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One Euler step from ``sigma`` to ``sigma_next`` (0-d float32 tensors); with ``gamma`` > 0 ("churn")
    the sample is first pushed up to sigma_hat = sigma (1 + gamma) with ``noise``. Computed in float32,
    returned in the model output's dtype. Returns (prev_sample, pred_original_sample)."""
    sample = sample.to(torch.float32)
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        eps = noise * s_noise
        sample = sample + eps * (sigma_hat**2 - sigma**2) ** 0.5
    pred_original_sample = euler_x0(prediction_type, sample, model_output, sigma, sigma_hat)
    derivative = (sample - pred_original_sample) / sigma_hat
    dt = sigma_next - sigma_hat
    prev_sample = sample + derivative * dt
    return prev_sample.to(model_output.dtype), pred_original_sample


def euler_ancestral_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    prediction_type: str = "epsilon",
    noise: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One ancestral Euler step: deterministic down to sigma_down, then noise sigma_up back in, with
    sigma_up^2 + sigma_down^2 = sigma_next^2 (Song et al. 2021 ancestral sampling in k-diffusion's form)."""
    sample = sample.to(torch.float32)
    if prediction_type == "sample":
        raise ValueError("EulerAncestralDiscreteScheduler does not support prediction_type='sample'")
    pred_original_sample = euler_x0(prediction_type, sample, model_output, sigma, sigma)
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    derivative = (sample - pred_original_sample) / sigma
    dt = sigma_down - sigma
    prev_sample = sample + derivative * dt
    prev_sample = prev_sample + noise * sigma_up
    return prev_sample.to(model_output.dtype), pred_original_sample
