"""Layout of one row of a per-step coefficient table: the contract between schedulers and kernels.

Every update of DDPM, DDIM, Euler, Euler ancestral, DPM-Solver(++) and the multistep
predictor-correctors is, per element, with ``z`` the step's Gaussian noise and ``m`` the (guided) model
output::

    xh   = x + K_PRE * z                                   # Euler "churn" noise, before the update
    x0   = X_S * (A_X * xh + A_M * m)                      # the converted model output (x0, or eps)
    x0   = clamp(x0, -r, r)  or  clamp(x0, -s_b, s_b) / s_b  # clip_sample / dynamic thresholding
    xc   = L_L * l + L_0 * x0 + L_1 * h_1 + L_2 * h_2 + L_3 * h_3   # corrector, when ``l`` is given
    xc   = xh                                              # otherwise
    eps  = E_S * (E_X * xh + E_M * m + E_0 * x0)           # predicted noise
    prev = C_0 * x0 + C_E * eps + C_X * xc + H_1 * h_1 + H_2 * h_2 + H_3 * h_3 + std * z

where ``h_1, h_2, h_3`` are the converted model outputs of the previous steps (multistep solvers), ``l``
the sample the previous step started from (UniPC's corrector, PNDM's Runge-Kutta and PLMS warm-up), ``xc``
may be written out (the next step's ``l``), and ``std`` is
``SIGMA`` (fixed variances), ``SIGMA * sqrt(v)`` (DDPM ``learned``) or
``SIGMA * exp(0.5 * (LV_A * v + LV_B))`` (DDPM ``learned_range``), ``v`` being the variance half of
the model output. The separate scales X_S and E_S keep the float32 rounding of diffusers' own
``(x - sqrt(1 - abar) * eps) / sqrt(abar)``: near the end of a cosine schedule abar ~ 2e-9, and
folding 1/sqrt(abar) into both terms would cancel two products of ~2e4 and lose three digits. A
scheduler fills one float32 row per inference step; the kernels, the CUDA
extension and the torch evaluation (``kernels/eager.py``) read it with the indices below.
"""

from enum import IntEnum

A_X, A_M = 0, 1
E_X, E_M, E_0 = 2, 3, 4
C_0, C_E, C_X = 5, 6, 7
SIGMA, K_PRE = 8, 9
H_1, H_2 = 10, 11
LV_A, LV_B = 12, 13
X_S, E_S = 14, 15
H_3 = 16
L_L, L_0, L_1, L_2, L_3 = 17, 18, 19, 20, 21
NCOEF = 24  # two spare slots for later samplers; a row is 96 bytes

NAMES = (
    "A_X",
    "A_M",
    "E_X",
    "E_M",
    "E_0",
    "C_0",
    "C_E",
    "C_X",
    "SIGMA",
    "K_PRE",
    "H_1",
    "H_2",
    "LV_A",
    "LV_B",
    "X_S",
    "E_S",
    "H_3",
    "L_L",
    "L_0",
    "L_1",
    "L_2",
    "L_3",
)


class VarMode(IntEnum):
    """How the noise's ``std`` is formed (csrc's ``VarMode``)."""

    FIXED = 0  # std = SIGMA
    LEARNED = 1  # std = SIGMA * sqrt(v)
    LEARNED_RANGE = 2  # std = SIGMA * exp(0.5 * (LV_A * v + LV_B))


class NoiseMode(IntEnum):
    """Where the step's Gaussian noise comes from (csrc's ``NoiseMode``)."""

    NONE = 0
    TENSOR = 1  # read from a tensor like the sample
    PHILOX = 2  # drawn in the kernel from per-sample seeds


# Philox stream ids (third counter word), so that different uses of one seed never overlap
STREAM_STEP, STREAM_LATENTS, STREAM_ADD_NOISE = 0, 1, 2
