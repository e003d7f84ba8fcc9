"""Noise schedules: betas, cumulative alphas, sigmas and timestep spacings.

Everything here runs once per scheduler construction or `set_timesteps`, on the host. Betas and
``alphas_cumprod`` are computed in float32 exactly as diffusers computes them (same torch ops, same
order) so that both libraries start from bit-identical tables; everything derived from them (the
per-step coefficient tables in the schedulers) is computed in float64 and stored as float32.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def check_choice(name: str, value, choices: Sequence) -> None:
    """Raise a ValueError naming the argument, the value and the accepted values."""
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {list(choices)}, got {value!r}")


def betas_for_alpha_bar(num_diffusion_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Glide's cosine schedule: betas that discretize alpha_bar(t) = cos^2((t + 0.008) / 1.008 * pi / 2)."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [
        min(1 - alpha_bar((i + 1) / num_diffusion_timesteps) / alpha_bar(i / num_diffusion_timesteps), max_beta)
        for i in range(num_diffusion_timesteps)
    ]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Rescale betas so the last timestep has zero SNR (Lin et al. 2023, arXiv:2305.08891, Algorithm 1)."""
    alphas_bar_sqrt = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first = alphas_bar_sqrt[0].clone()
    last = alphas_bar_sqrt[-1].clone()
    alphas_bar_sqrt -= last
    alphas_bar_sqrt *= first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = torch.cat([alphas_bar[0:1], alphas_bar[1:] / alphas_bar[:-1]])
    return 1 - alphas


def make_betas(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas=None,
    rescale_betas_zero_snr: bool = False,
    schedules: Sequence[str] = BETA_SCHEDULES,
) -> torch.Tensor:
    """Float32 betas of length ``num_train_timesteps``, as diffusers builds them."""
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 1:
        raise ValueError(f"`num_train_timesteps` must be a positive int, got {num_train_timesteps!r}")
    if trained_betas is not None:
        betas = torch.tensor(np.asarray(trained_betas), dtype=torch.float32)
        if betas.ndim != 1 or len(betas) != num_train_timesteps:
            raise ValueError(
                f"`trained_betas` must be a 1-d sequence of length num_train_timesteps={num_train_timesteps}, "
                f"got shape {tuple(betas.shape)}"
            )
    else:
        check_choice("beta_schedule", beta_schedule, schedules)
        if beta_schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
        elif beta_schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
        elif beta_schedule == "squaredcos_cap_v2":
            betas = betas_for_alpha_bar(num_train_timesteps)
        else:  # sigmoid (GeoDiff)
            betas = torch.sigmoid(torch.linspace(-6, 6, num_train_timesteps)) * (beta_end - beta_start) + beta_start
    if rescale_betas_zero_snr:
        betas = rescale_zero_terminal_snr(betas)
    return betas


def alphas_cumprod_from_betas(betas: torch.Tensor) -> torch.Tensor:
    return torch.cumprod(1.0 - betas, dim=0)


def spaced_timesteps(
    num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0
) -> np.ndarray:
    """Integer timesteps, descending, for DDPM/DDIM-style schedulers (Lin et al. 2023, Table 2)."""
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    check_num_inference_steps(num_inference_steps, num_train_timesteps)
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        return np.linspace(0, T - 1, n).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // n
        return (np.arange(0, n) * ratio).round()[::-1].copy().astype(np.int64) + steps_offset
    ratio = T / n
    return np.round(np.arange(T, 0, -ratio)).astype(np.int64) - 1


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> None:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise TypeError(f"`num_inference_steps` must be an int, got {num_inference_steps!r}")
    if num_inference_steps < 1:
        raise ValueError(f"`num_inference_steps` must be >= 1, got {num_inference_steps}")
    if num_inference_steps > num_train_timesteps:
        raise ValueError(
            f"`num_inference_steps`={num_inference_steps} cannot be larger than "
            f"`num_train_timesteps`={num_train_timesteps}: the model was trained on that many timesteps only"
        )


def check_custom_timesteps(timesteps, num_train_timesteps: int) -> np.ndarray:
    """Validate a user-given descending list of integer timesteps and return it as int64 numpy."""
    arr = np.asarray(timesteps.cpu() if isinstance(timesteps, torch.Tensor) else timesteps)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"`timesteps` must be a non-empty 1-d list of ints, got shape {arr.shape}")
    if not np.all(np.equal(np.mod(arr, 1), 0)):
        raise ValueError(f"`timesteps` must hold integers, got {arr.tolist()}")
    arr = arr.astype(np.int64)
    if np.any(arr[1:] >= arr[:-1]):
        raise ValueError(f"`timesteps` must be strictly descending, got {arr.tolist()}")
    if arr[0] >= num_train_timesteps or arr[-1] < 0:
        raise ValueError(f"`timesteps` must lie in [0, num_train_timesteps={num_train_timesteps}), got {arr.tolist()}")
    return arr


# ---------------------------------------------------------------------------------------------
# sigma-space helpers (Euler, Euler ancestral, DPM-Solver++)
# ---------------------------------------------------------------------------------------------


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Continuous timestep for each sigma by piecewise-linear interpolation in log-sigma."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigma.shape)


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (arXiv:2206.00364, eq. 5) sigmas, descending."""
    ramp = np.linspace(0, 1, n)
    min_inv, max_inv = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv + ramp * (min_inv - max_inv)) ** rho
