"""PNDM (Liu et al. 2022, arXiv:2202.09778): the transfer step of eq. 9 and the model-output combinations of
its Runge-Kutta warm-up (Algorithm 2) and linear multistep (PLMS, eq. 12) phases, op by op as diffusers
writes them."""

from __future__ import annotations

import torch

#: the combinations of PLMS, by name: Heun's average for the second step, then Adams-Bashforth of order 2-4
PLMS_FORMULAS = ("first", "heun", "ab2", "ab3", "ab4")


def pndm_transfer(
    sample: torch.Tensor,
    model_output: torch.Tensor,
    t: int,
    prev_t: int,
    *,
    alphas_cumprod: torch.Tensor,
    final_alpha_cumprod: torch.Tensor,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The transfer phi(x_t, e, t, t - delta) of eq. 9: x at ``prev_t`` (negative: ``final_alpha_cumprod``)
    from ``sample`` at ``t`` and the (combined) model output. ``sample``, ``model_output``: (B, ...) alike;
    ``alphas_cumprod``: float32 (T,), indexed like a tensor (a negative ``t`` counts from the end)."""
    alpha_prod_t = alphas_cumprod[t]
    alpha_prod_t_prev = alphas_cumprod[prev_t] if prev_t >= 0 else final_alpha_cumprod
    beta_prod_t = 1 - alpha_prod_t
    beta_prod_t_prev = 1 - alpha_prod_t_prev

    if prediction_type == "v_prediction":
        model_output = (alpha_prod_t**0.5) * model_output + (beta_prod_t**0.5) * sample
    elif prediction_type != "epsilon":
        raise ValueError(f"`prediction_type` must be one of ['epsilon', 'v_prediction'], got {prediction_type!r}")

    # (abar_prev - abar_t) / (sqrt(abar_t) (sqrt(abar_prev) + sqrt(abar_t))) + 1 = sqrt(abar_prev / abar_t)
    sample_coeff = (alpha_prod_t_prev / alpha_prod_t) ** 0.5
    model_output_denom_coeff = (
        alpha_prod_t * beta_prod_t_prev**0.5 + (alpha_prod_t * beta_prod_t * alpha_prod_t_prev) ** 0.5
    )
    return sample_coeff * sample - (alpha_prod_t_prev - alpha_prod_t) * model_output / model_output_denom_coeff


def prk_combine(terms, model_output: torch.Tensor) -> torch.Tensor:
    """The fourth Runge-Kutta stage's output: the running sum of the earlier stages (``terms``: (weight,
    tensor) pairs, 1/6, 1/3, 1/3 in a warm-up) plus 1/6 of this stage's ``model_output``."""
    acc = 0
    for weight, output in terms:
        acc = acc + weight * output
    return acc + 1 / 6 * model_output


def plms_combine(formula: str, ets) -> torch.Tensor:
    """The PLMS model output from ``ets``, the list of earlier outputs with this step's last (``ets[-1]``),
    except for "heun", where ``ets`` is [this step's output, the previous one]."""
    if formula == "first":
        return ets[-1]
    if formula == "heun":
        return (ets[0] + ets[1]) / 2
    if formula == "ab2":
        return (3 * ets[-1] - ets[-2]) / 2
    if formula == "ab3":
        return (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
    if formula == "ab4":
        return (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
    raise ValueError(f"`formula` must be one of {list(PLMS_FORMULAS)}, got {formula!r}")
