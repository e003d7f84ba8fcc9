"""UniPC (Zhao et al. 2023, arXiv:2302.04867): the multistep predictor UniP and corrector UniC in their B(h)
form, for VP and flow-matching sigmas, op by op as diffusers' ``UniPCMultistepScheduler`` computes them (float32
scalars as 0-d tensors, the update in the sample's dtype).

Notation: ``history`` holds the converted model outputs of the previous steps, oldest first and newest last
(x0 predictions with ``predict_x0``, noise predictions without); ``sigmas`` lists 0-d tensors, the target first,
then the sigma of the newest history entry and of each older one."""

from __future__ import annotations

import torch

from .common import threshold_sample

PREDICTIONS = ("epsilon", "sample", "v_prediction", "flow_prediction")


def unipc_alpha_sigma(sigma: torch.Tensor, flow: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t) of the sample x = alpha_t x0 + sigma_t eps at ``sigma``: (1 - sigma, sigma) for flow
    sigmas, (1 / sqrt(sigma^2 + 1), sigma alpha_t) for VP ones."""
    if flow:
        return 1 - sigma, sigma
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    return alpha_t, sigma * alpha_t


def _lambda(sigma: torch.Tensor, flow: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(alpha_t, sigma_t, lambda_t = log alpha_t - log sigma_t)."""
    alpha_t, sigma_t = unipc_alpha_sigma(sigma, flow)
    return alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t)


def unipc_convert(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    sigma: torch.Tensor,
    prediction_type: str,
    *,
    predict_x0: bool = True,
    flow: bool = False,
    thresholding: bool = False,
    ratio: float = 0.995,
    max_value: float = 1.0,
) -> torch.Tensor:
    """The model output as the solver integrates it: the data prediction x0 (``predict_x0``, thresholded when
    asked) or the noise prediction eps. ``flow_prediction`` (a velocity v = eps - x0) gives x0 = x - sigma v."""
    alpha_t, sigma_t = unipc_alpha_sigma(sigma, flow)
    if predict_x0:
        if prediction_type == "epsilon":
            x0 = (sample - sigma_t * model_output) / alpha_t
        elif prediction_type == "sample":
            x0 = model_output
        elif prediction_type == "v_prediction":
            x0 = alpha_t * sample - sigma_t * model_output
        elif prediction_type == "flow_prediction":
            x0 = sample - sigma * model_output
        else:
            raise ValueError(f"`prediction_type` must be one of {list(PREDICTIONS)}, got {prediction_type!r}")
        return threshold_sample(x0, ratio, max_value) if thresholding else x0
    if prediction_type == "epsilon":
        return model_output
    if prediction_type == "sample":
        return (sample - alpha_t * model_output) / sigma_t
    if prediction_type == "v_prediction":
        return alpha_t * model_output + sigma_t * sample
    raise ValueError(
        f"`prediction_type` must be one of ['epsilon', 'sample', 'v_prediction'] with predict_x0=False, got "
        f"{prediction_type!r}"
    )


def _bh_system(h: torch.Tensor, rks: torch.Tensor, order: int, predict_x0: bool, solver_type: str):
    """(hh, h phi_1(hh), B(h), R, b): the order x order Vandermonde system R rho = b of UniPC's B(h) variant,
    R[k] = rks^k, b[k] = phi_{k+2}(hh) (k + 1)! / B(h), with hh = -h for the data prediction."""
    hh = -h if predict_x0 else h
    h_phi_1 = torch.expm1(hh)  # h phi_1(h) = e^h - 1
    h_phi_k = h_phi_1 / hh - 1
    b_h = hh if solver_type == "bh1" else torch.expm1(hh)
    factorial = 1
    rows, b = [], []
    for k in range(1, order + 1):
        rows.append(torch.pow(rks, k - 1))
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return hh, h_phi_1, b_h, torch.stack(rows), torch.stack(b)


def _differences(history: list, sigmas: list, lambda_s0, h, order: int, flow: bool, device):
    """(rks, D1s): r_k = (lambda_{s_k} - lambda_{s_0}) / h and D1_k = (m_k - m_0) / r_k for the order - 1 older
    history entries, with r = 1 appended for the current step."""
    m0 = history[-1]
    rks, d1s = [], []
    for k in range(1, order):
        _, _, lambda_sk = _lambda(sigmas[k + 1].to(device), flow)
        rk = (lambda_sk - lambda_s0) / h
        rks.append(rk)
        d1s.append((history[-(k + 1)] - m0) / rk)
    rks.append(torch.ones((), device=device))
    return torch.stack(rks), (torch.stack(d1s, dim=1) if d1s else None)


def _base_update(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, predict_x0: bool):
    """The first-order part of both updates, and the scale of their higher-order terms."""
    if predict_x0:
        return sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t
    return alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t


def unipc_predict(
    history: list,
    sample: torch.Tensor,
    sigmas: list,
    *,
    order: int,
    predict_x0: bool = True,
    solver_type: str = "bh2",
    flow: bool = False,
) -> torch.Tensor:
    """UniP-``order`` (B(h) variant): the sample at sigmas[0] from ``sample`` at sigmas[1] and the last ``order``
    converted model outputs (sigmas[1:] their sigmas, newest first)."""
    device, m0, x = sample.device, history[-1], sample
    alpha_t, sigma_t, lambda_t = _lambda(sigmas[0].to(device), flow)
    alpha_s0, sigma_s0, lambda_s0 = _lambda(sigmas[1].to(device), flow)
    h = lambda_t - lambda_s0
    rks, d1s = _differences(history, sigmas, lambda_s0, h, order, flow, device)
    _, h_phi_1, b_h, R, b = _bh_system(h, rks, order, predict_x0, solver_type)
    x_t_, scale = _base_update(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, predict_x0)
    if d1s is None:
        # first order: no difference term. diffusers still subtracts scale * B(h) * 0, which is NaN where B(h) is
        # infinite (solver_type "bh1" stepping onto sigma = 0, the default final step): the limit is x_t_
        return x_t_.to(x.dtype)
    if order == 2:  # diffusers' simplified second order: rho = 1/2
        rhos_p = torch.ones(1, dtype=x.dtype, device=device) * 0.5
    else:
        rhos_p = torch.linalg.solve(R[:-1, :-1], b[:-1]).to(device).to(x.dtype)
    pred_res = torch.einsum("k,bkc...->bc...", rhos_p, d1s)
    return (x_t_ - scale * b_h * pred_res).to(x.dtype)


def unipc_correct(
    this_model_output: torch.Tensor,
    history: list,
    last_sample: torch.Tensor,
    this_sample: torch.Tensor,
    sigmas: list,
    *,
    order: int,
    predict_x0: bool = True,
    solver_type: str = "bh2",
    flow: bool = False,
) -> torch.Tensor:
    """UniC-``order`` (B(h) variant): ``this_sample`` (the predictor's result at sigmas[0]) corrected with its own
    converted model output ``this_model_output``, from ``last_sample`` at sigmas[1] and the last ``order`` history
    entries (sigmas[1:] their sigmas, newest first)."""
    device, m0, x = this_sample.device, history[-1], last_sample
    alpha_t, sigma_t, lambda_t = _lambda(sigmas[0].to(device), flow)
    alpha_s0, sigma_s0, lambda_s0 = _lambda(sigmas[1].to(device), flow)
    h = lambda_t - lambda_s0
    rks, d1s = _differences(history, sigmas, lambda_s0, h, order, flow, device)
    _, h_phi_1, b_h, R, b = _bh_system(h, rks, order, predict_x0, solver_type)
    if order == 1:  # diffusers' simplified first order: rho = 1/2
        rhos_c = torch.ones(1, dtype=x.dtype, device=device) * 0.5
    else:
        rhos_c = torch.linalg.solve(R, b).to(device).to(x.dtype)
    x_t_, scale = _base_update(x, m0, alpha_t, sigma_t, alpha_s0, sigma_s0, h_phi_1, predict_x0)
    corr_res = torch.einsum("k,bkc...->bc...", rhos_c[:-1], d1s) if d1s is not None else 0
    d1_t = this_model_output - m0
    return (x_t_ - scale * b_h * (corr_res + rhos_c[-1] * d1_t)).to(x.dtype)
