"""The model's prediction type, turned into x0 in one place per family (the first three coefficients of a
row, ``x0 = X_S * (A_X * x + A_M * m)``, in diffusers' operation order)."""

from __future__ import annotations

import numpy as np

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")


def vp_x0(prediction_type: str, alpha_t, sigma_t) -> tuple:
    """(X_S, A_X, A_M) for a variance-preserving sample x = alpha_t x0 + sigma_t eps (DDPM, DDIM, DPM-Solver):
    epsilon (x - sigma_t m) / alpha_t; sample m; v_prediction alpha_t x - sigma_t m. Floats or float64 arrays
    (one entry per step)."""
    if prediction_type == "epsilon":
        with np.errstate(divide="ignore"):
            return np.float64(1.0) / alpha_t, 1.0, -sigma_t
    if prediction_type in ("sample", "original_sample"):
        return 1.0, 0.0, 1.0
    if prediction_type == "v_prediction":
        return 1.0, alpha_t, -sigma_t
    raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


def flow_x0(sigma) -> tuple:
    """(X_S, A_X, A_M) for a flow-matching velocity m = eps - x0 of x = (1 - sigma) x0 + sigma eps (diffusers'
    ``flow_prediction``): x0 = x - sigma m. ``sigma`` is the schedule's own sigma, float or float64 array."""
    return 1.0, 1.0, -sigma


def ve_x0(prediction_type: str, sigma, sigma_hat) -> tuple:
    """(X_S, A_X, A_M) for the k-diffusion (variance-exploding) sample of Euler: epsilon x - sigma_hat m;
    v_prediction x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) m; sample m."""
    if prediction_type == "epsilon":
        return 1.0, 1.0, -sigma_hat
    if prediction_type == "v_prediction":
        return 1.0, 1.0 / (sigma**2 + 1), -sigma / np.sqrt(sigma**2 + 1)
    if prediction_type in ("sample", "original_sample"):
        return 1.0, 0.0, 1.0
    raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")


def vp_eps(prediction_type: str, alpha_t, sigma_t) -> tuple:
    """(X_S, A_X, A_M) of the noise prediction eps = X_S * (A_X * x + A_M * m) for a variance-preserving sample
    (the noise-prediction solvers: DPM-Solver, UniPC with predict_x0=False): epsilon m; sample
    (x - alpha_t m) / sigma_t; v_prediction alpha_t m + sigma_t x."""
    if prediction_type == "epsilon":
        return 1.0, 0.0, 1.0
    if prediction_type in ("sample", "original_sample"):
        with np.errstate(divide="ignore"):
            return np.float64(1.0) / sigma_t, 1.0, -alpha_t
    if prediction_type == "v_prediction":
        return 1.0, sigma_t, alpha_t
    raise ValueError(f"`prediction_type` must be one of {list(PREDICTION_TYPES)}, got {prediction_type!r}")
