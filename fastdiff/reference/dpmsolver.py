"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095): data-prediction multistep solvers of order 1-3 and
the SDE variant, and the original noise-prediction DPM-Solver (arXiv:2206.00927) with its SDE variant, op by
op as diffusers' ``DPMSolverMultistepScheduler`` writes them. ``flow=True``: flow-matching sigmas
(``use_flow_sigmas``), where alpha_t = 1 - sigma and sigma_t = sigma."""

from __future__ import annotations

import torch

from .common import threshold_sample


def alpha_sigma(sigma: torch.Tensor, flow: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) for the schedule's sigma: of the VP process for a VE sigma, alpha = 1 / sqrt(sigma^2 + 1);
    with ``flow``, alpha = 1 - sigma and sigma_t = sigma."""
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def dpm_x0(model_output, sample, sigma, prediction_type, thresholding=False, ratio=0.995, max_value=1.0, *, flow=False):
    """The data prediction x0 the multistep update is written in (a flow prediction v: x0 = x - sigma v)."""
    alpha_t, sigma_t = alpha_sigma(sigma, flow)
    if prediction_type == "epsilon":
        x0 = (sample - sigma_t * model_output) / alpha_t
    elif prediction_type == "sample":
        x0 = model_output
    elif prediction_type == "v_prediction":
        x0 = alpha_t * sample - sigma_t * model_output
    elif prediction_type == "flow_prediction":
        x0 = sample - sigma * model_output
    else:
        raise ValueError(
            "`prediction_type` must be one of ['epsilon', 'sample', 'v_prediction', 'flow_prediction'], got "
            f"{prediction_type!r}"
        )
    return threshold_sample(x0, ratio, max_value) if thresholding else x0


def dpm_eps(
    model_output, sample, sigma, prediction_type, thresholding=False, ratio=0.995, max_value=1.0, *, flow=False
):
    """The noise prediction eps the (noise-prediction) DPM-Solver update is written in; with thresholding,
    through a thresholded x0 and back."""
    alpha_t, sigma_t = alpha_sigma(sigma, flow)
    if prediction_type == "epsilon":
        eps = model_output
    elif prediction_type == "sample":
        eps = (sample - alpha_t * model_output) / sigma_t
    elif prediction_type == "v_prediction":
        eps = alpha_t * model_output + sigma_t * sample
    else:
        raise ValueError(
            f"`prediction_type` must be one of ['epsilon', 'sample', 'v_prediction'], got {prediction_type!r}"
        )
    if thresholding:
        x0 = threshold_sample((sample - sigma_t * eps) / alpha_t, ratio, max_value)
        eps = (sample - alpha_t * x0) / sigma_t
    return eps


def _lambda(sigma, flow=False):
    alpha_t, sigma_t = alpha_sigma(sigma, flow)
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def dpm_update(
    x0_history: list,
    sample: torch.Tensor,
    sigmas: list,
    *,
    order: int,
    algorithm_type: str = "dpmsolver++",
    solver_type: str = "midpoint",
    noise: torch.Tensor | None = None,
    flow: bool = False,
) -> torch.Tensor:
    """x_t from the current sample (float32) and the last ``order`` converted model outputs (newest last):
    x0 predictions for "dpmsolver++"/"sde-dpmsolver++", noise predictions for "dpmsolver"/"sde-dpmsolver".

    ``sigmas`` = [sigma_t (target), sigma_s0 (current), sigma_s1, sigma_s2] as 0-d tensors; ``flow``: flow sigmas."""
    if algorithm_type in ("dpmsolver", "sde-dpmsolver"):
        return _dpm_noise_update(x0_history, sample, sigmas, order, algorithm_type, solver_type, noise, flow)
    alpha_t, sigma_t, lambda_t = _lambda(sigmas[0], flow)
    _, sigma_s0, lambda_s0 = _lambda(sigmas[1], flow)
    h = lambda_t - lambda_s0
    sde = algorithm_type == "sde-dpmsolver++"
    if order == 1:
        m0 = x0_history[-1]
        if sde:
            return (
                (sigma_t / sigma_s0 * torch.exp(-h)) * sample
                + (alpha_t * (1 - torch.exp(-2.0 * h))) * m0
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
            )
        return (sigma_t / sigma_s0) * sample - (alpha_t * (torch.exp(-h) - 1.0)) * m0
    _, _, lambda_s1 = _lambda(sigmas[2], flow)
    m0, m1 = x0_history[-1], x0_history[-2]
    h_0 = lambda_s0 - lambda_s1
    r0 = h_0 / h
    if order == 2:
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        if not sde:
            if solver_type == "midpoint":
                return (
                    (sigma_t / sigma_s0) * sample
                    - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                    - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
                )
            return (
                (sigma_t / sigma_s0) * sample
                - (alpha_t * (torch.exp(-h) - 1.0)) * D0
                + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
            )
        if solver_type == "midpoint":
            return (
                (sigma_t / sigma_s0 * torch.exp(-h)) * sample
                + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
                + 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
                + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
            )
        return (
            (sigma_t / sigma_s0 * torch.exp(-h)) * sample
            + (alpha_t * (1 - torch.exp(-2.0 * h))) * D0
            + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
            + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
        )
    _, _, lambda_s2 = _lambda(sigmas[3], flow)
    m2 = x0_history[-3]
    h_1 = lambda_s1 - lambda_s2
    r1 = h_1 / h
    D0 = m0
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    if not sde:
        return (
            (sigma_t / sigma_s0) * sample
            - (alpha_t * (torch.exp(-h) - 1.0)) * D0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
            - (alpha_t * ((torch.exp(-h) - 1.0 + h) / h**2 - 0.5)) * D2
        )
    return (
        (sigma_t / sigma_s0 * torch.exp(-h)) * sample
        + (alpha_t * (1.0 - torch.exp(-2.0 * h))) * D0
        + (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
        + (alpha_t * ((1.0 - torch.exp(-2.0 * h) - 2.0 * h) / (2.0 * h) ** 2 - 0.5)) * D2
        + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * noise
    )


def _dpm_noise_update(eps_history, sample, sigmas, order, algorithm_type, solver_type, noise, flow=False):
    """The noise-prediction DPM-Solver update (order 1-3; the SDE variant of order 1-2)."""
    alpha_t, sigma_t, lambda_t = _lambda(sigmas[0], flow)
    alpha_s0, _, lambda_s0 = _lambda(sigmas[1], flow)
    h = lambda_t - lambda_s0
    sde = algorithm_type == "sde-dpmsolver"
    if order == 1:
        m0 = eps_history[-1]
        if sde:
            return (
                (alpha_t / alpha_s0) * sample
                - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * m0
                + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
            )
        return (alpha_t / alpha_s0) * sample - (sigma_t * (torch.exp(h) - 1.0)) * m0
    _, _, lambda_s1 = _lambda(sigmas[2], flow)
    m0, m1 = eps_history[-1], eps_history[-2]
    h_0 = lambda_s0 - lambda_s1
    r0 = h_0 / h
    if order == 2:
        D0, D1 = m0, (1.0 / r0) * (m0 - m1)
        if not sde:
            if solver_type == "midpoint":
                return (
                    (alpha_t / alpha_s0) * sample
                    - (sigma_t * (torch.exp(h) - 1.0)) * D0
                    - 0.5 * (sigma_t * (torch.exp(h) - 1.0)) * D1
                )
            return (
                (alpha_t / alpha_s0) * sample
                - (sigma_t * (torch.exp(h) - 1.0)) * D0
                - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
            )
        if solver_type == "midpoint":
            return (
                (alpha_t / alpha_s0) * sample
                - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
                - (sigma_t * (torch.exp(h) - 1.0)) * D1
                + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
            )
        return (
            (alpha_t / alpha_s0) * sample
            - 2.0 * (sigma_t * (torch.exp(h) - 1.0)) * D0
            - 2.0 * (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
            + sigma_t * torch.sqrt(torch.exp(2 * h) - 1.0) * noise
        )
    if sde:
        raise ValueError("`solver_order`=3 is not defined for algorithm_type 'sde-dpmsolver'")
    _, _, lambda_s2 = _lambda(sigmas[3], flow)
    m2 = eps_history[-3]
    h_1 = lambda_s1 - lambda_s2
    r1 = h_1 / h
    D0 = m0
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    return (
        (alpha_t / alpha_s0) * sample
        - (sigma_t * (torch.exp(h) - 1.0)) * D0
        - (sigma_t * ((torch.exp(h) - 1.0) / h - 1.0)) * D1
        - (sigma_t * ((torch.exp(h) - 1.0 - h) / h**2 - 0.5)) * D2
    )
