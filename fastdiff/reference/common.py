"""Pieces shared by the reference samplers: thresholding, guidance, forward noising."""

from __future__ import annotations

import torch


def threshold_sample(sample: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic thresholding (Saharia et al. 2022, arXiv:2205.11487): per sample, s = the `ratio`
    quantile of |x0| clamped to [1, max_value]; x0 <- clamp(x0, -s, s) / s. Computed in float32."""
    dtype = sample.dtype
    batch = sample.shape[0]
    flat = sample.float().reshape(batch, -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(sample.shape).to(dtype)


def apply_guidance(model_output: torch.Tensor, guidance_scale) -> torch.Tensor:
    """Classifier-free guidance on a doubled batch ordered (unconditional, conditional)."""
    uncond, cond = model_output.chunk(2)
    return uncond + guidance_scale * (cond - uncond)


def rescale_noise_cfg(guided: torch.Tensor, cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2023 (arXiv:2305.08891) section 3.4: rescale the guided prediction's per-sample std to
    the conditional prediction's, then mix with the unrescaled one by `guidance_rescale`."""
    dims = list(range(1, cond.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)
    std_cfg = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_cfg)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided


def _broadcast(coef: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    coef = coef.flatten()
    while coef.ndim < like.ndim:
        coef = coef.unsqueeze(-1)
    return coef


def add_noise(
    alphas_cumprod: torch.Tensor, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """q(x_t | x_0): sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise, computed in the samples' dtype."""
    acp = alphas_cumprod.to(device=original_samples.device, dtype=original_samples.dtype)
    timesteps = timesteps.to(original_samples.device)
    sqrt_alpha = _broadcast(acp[timesteps] ** 0.5, original_samples)
    sqrt_one_minus = _broadcast((1 - acp[timesteps]) ** 0.5, original_samples)
    return sqrt_alpha * original_samples + sqrt_one_minus * noise


def get_velocity(
    alphas_cumprod: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """v-prediction target (Salimans & Ho 2022): sqrt(abar_t) * noise - sqrt(1 - abar_t) * x0."""
    acp = alphas_cumprod.to(device=sample.device, dtype=sample.dtype)
    timesteps = timesteps.to(sample.device)
    sqrt_alpha = _broadcast(acp[timesteps] ** 0.5, sample)
    sqrt_one_minus = _broadcast((1 - acp[timesteps]) ** 0.5, sample)
    return sqrt_alpha * noise - sqrt_one_minus * sample
