"""Flow-matching Euler (rectified flow, Liu et al. 2022, arXiv:2209.03003; Esser et al. 2024, arXiv:2403.03206): the
sample is x = (1 - sigma) x0 + sigma eps and the model predicts the velocity v = eps - x0, op by op as diffusers'
``FlowMatchEulerDiscreteScheduler`` writes it."""

from __future__ import annotations

import torch


def flow_match_euler_step(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    sigma: torch.Tensor,
    sigma_next: torch.Tensor,
    stochastic: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One Euler step of dx/dsigma = v from ``sigma`` to ``sigma_next`` (0-d tensors): x + (sigma_next - sigma) v;
    with ``stochastic`` the x0 estimate x - sigma v is noised afresh to sigma_next with ``noise`` (float32, like
    the sample). Computed in float32 (the sample is upcast), returned in the model output's dtype."""
    sample = sample.to(torch.float32)
    if stochastic:
        x0 = sample - sigma * model_output
        prev_sample = (1.0 - sigma_next) * x0 + sigma_next * noise
    else:
        prev_sample = sample + (sigma_next - sigma) * model_output
    return prev_sample.to(model_output.dtype)


def per_token_sigmas(
    sigmas: torch.Tensor, per_token_timesteps: torch.Tensor, num_train_timesteps: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(current, next) sigma per token for ``per_token_timesteps`` (B, S): each token's own sigma t / T, and the
    largest schedule sigma below it (1e-6 apart), both (B, S, 1)."""
    token_sigmas = per_token_timesteps / num_train_timesteps
    schedule = sigmas[:, None, None]
    lower_mask = schedule < token_sigmas[None] - 1e-6
    lower_sigmas, _ = (lower_mask * schedule).max(dim=0)
    return token_sigmas[..., None], lower_sigmas[..., None]


def flow_match_euler_step_per_token(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    *,
    sigmas: torch.Tensor,
    per_token_timesteps: torch.Tensor,
    num_train_timesteps: int,
    stochastic: bool = False,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """One step of a packed (B, S, C) sample whose tokens sit at their own timesteps (LTX-Video conditioning):
    x + (sigma_token - sigma_below) v (diffusers' sign: the pipeline passes -v), or with ``stochastic`` the x0
    estimate noised to sigma_below. Float32, not cast back (as diffusers)."""
    sample = sample.to(torch.float32)
    current, below = per_token_sigmas(sigmas, per_token_timesteps, num_train_timesteps)
    if stochastic:
        x0 = sample - current * model_output
        return (1.0 - below) * x0 + below * noise
    return sample + (current - below) * model_output


def scale_noise(sigmas: torch.Tensor, sample: torch.Tensor, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The forward process at schedule steps ``index`` (1 or B entries): sigma noise + (1 - sigma) sample, in the
    sample's dtype."""
    sigmas = sigmas.to(device=sample.device, dtype=sample.dtype)
    sigma = sigmas[index.to(sample.device)].flatten()
    while sigma.ndim < sample.ndim:
        sigma = sigma.unsqueeze(-1)
    return sigma * noise + (1.0 - sigma) * sample
