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


def exponential_sigmas(sigma_min: float, sigma_max: float, n: int) -> np.ndarray:
    return np.exp(np.linspace(math.log(sigma_max), math.log(sigma_min), n))


def beta_sigmas(sigma_min: float, sigma_max: float, n: int, alpha: float = 0.6, beta: float = 0.6) -> np.ndarray:
    """Beta-distribution spaced sigmas (Lee et al. 2024, arXiv:2407.12173); needs scipy."""
    try:
        import scipy.stats
    except ImportError:
        raise ImportError("use_beta_sigmas=True needs scipy: pip install scipy") from None
    ppfs = [scipy.stats.beta.ppf(t, alpha, beta) for t in 1 - np.linspace(0, 1, n)]
    return np.array([sigma_min + ppf * (sigma_max - sigma_min) for ppf in ppfs])


def check_sigma_spacing_flags(karras: bool, exponential: bool, beta: bool) -> None:
    if sum(bool(f) for f in (karras, exponential, beta)) > 1:
        raise ValueError(
            "only one of `use_karras_sigmas`, `use_exponential_sigmas`, `use_beta_sigmas` can be True, got "
            f"{karras}, {exponential}, {beta}"
        )


def euler_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    interpolation_type: str = "linear",
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    sigma_min=None,
    sigma_max=None,
    final_sigmas_type: str = "zero",
    timesteps=None,
    sigmas=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps float32 (n,), sigmas float32 (n+1,)) as diffusers' ``EulerDiscreteScheduler.set_timesteps``."""
    T = len(alphas_cumprod)
    full = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    log_full = np.log(full)
    if sigmas is not None:
        sigmas = np.array(sigmas).astype(np.float32)
        ts = np.array([sigma_to_t(s, log_full) for s in sigmas[:-1]])
        return ts.astype(np.float32), sigmas
    if timesteps is not None:
        ts = np.array(timesteps).astype(np.float32)
        n = len(ts)
    else:
        n = num_inference_steps
        check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
        if spacing == "linspace":
            ts = np.linspace(0, T - 1, n, dtype=np.float32)[::-1].copy()
        elif spacing == "leading":
            ts = (np.arange(0, n) * (T // n)).round()[::-1].copy().astype(np.float32) + steps_offset
        else:
            ts = (np.arange(T, 0, -T / n)).round().copy().astype(np.float32) - 1
    check_choice("interpolation_type", interpolation_type, ("linear", "log_linear"))
    if interpolation_type == "linear":
        sig = np.interp(ts, np.arange(0, len(full)), full)
    else:
        sig = torch.linspace(np.log(full[-1]), np.log(full[0]), n + 1).exp().numpy()
    lo = sigma_min if sigma_min is not None else float(sig[-1])
    hi = sigma_max if sigma_max is not None else float(sig[0])
    if use_karras_sigmas:
        sig = karras_sigmas(lo, hi, n)
        ts = np.array([sigma_to_t(s, log_full) for s in sig])
    elif use_exponential_sigmas:
        sig = exponential_sigmas(lo, hi, n)
        ts = np.array([sigma_to_t(s, log_full) for s in sig])
    elif use_beta_sigmas:
        sig = beta_sigmas(lo, hi, n)
        ts = np.array([sigma_to_t(s, log_full) for s in sig])
    check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
    last = float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5) if final_sigmas_type == "sigma_min" else 0.0
    return ts.astype(np.float32), np.concatenate([sig, [last]]).astype(np.float32)


def dpm_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    lambda_min_clipped: float = -float("inf"),
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    use_lu_lambdas: bool = False,
    use_flow_sigmas: bool = False,
    flow_shift: float = 1.0,
    final_sigmas_type: str = "zero",
    beta_schedule: str = "linear",
    timesteps=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 (n,), sigmas float32 (n+1,)) as diffusers' ``DPMSolverMultistepScheduler.set_timesteps``.
    ``use_flow_sigmas`` (where no karras/lu/exponential/beta spacing is asked for) replaces the spaced timesteps by
    :func:`flow_sigmas` and their sigma * T, truncated to integers."""
    T = len(alphas_cumprod)
    if timesteps is not None:
        ts = np.array(timesteps).astype(np.int64)
        n = len(ts)
    else:
        n = num_inference_steps
        check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
        lambda_t = torch.log(torch.sqrt(alphas_cumprod)) - torch.log(torch.sqrt(1 - alphas_cumprod))
        clipped_idx = torch.searchsorted(torch.flip(lambda_t, [0]), lambda_min_clipped)
        last = int((T - clipped_idx).numpy().item())
        if spacing == "linspace":
            ts = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
        elif spacing == "leading":
            ratio = last // (n + 1)
            ts = (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
        else:
            ts = np.arange(last, 0, -T / n).round().copy().astype(np.int64) - 1
    full = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
    log_full = np.log(full)
    if use_karras_sigmas:
        flipped = np.flip(full).copy()
        sig = karras_sigmas(float(flipped[-1]), float(flipped[0]), n)
        ts = np.array([sigma_to_t(s, log_full) for s in sig])
        if beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    elif use_lu_lambdas:
        lambdas = np.flip(log_full.copy())
        lam_min, lam_max = float(lambdas[-1]), float(lambdas[0])
        sig = np.exp(lam_max + np.linspace(0, 1, n) * (lam_min - lam_max))
        ts = np.array([sigma_to_t(s, log_full) for s in sig])
        if beta_schedule != "squaredcos_cap_v2":
            ts = ts.round()
    elif use_exponential_sigmas:
        flipped = np.flip(full).copy()
        sig = exponential_sigmas(float(flipped[-1]), float(flipped[0]), n)
        ts = np.array([sigma_to_t(s, log_full) for s in sig])
    elif use_beta_sigmas:
        flipped = np.flip(full).copy()
        sig = beta_sigmas(float(flipped[-1]), float(flipped[0]), n)
        ts = np.array([sigma_to_t(s, log_full) for s in sig])
    elif use_flow_sigmas:
        sig = flow_sigmas(n, T, flow_shift)
        ts = sig * T
    else:
        sig = np.interp(ts, np.arange(0, len(full)), full)
    check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
    last_sigma = (
        float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5) if final_sigmas_type == "sigma_min" else 0.0
    )
    sigmas = np.concatenate([sig, [last_sigma]]).astype(np.float32)
    return torch.from_numpy(np.asarray(ts)).to(torch.int64).numpy(), sigmas


# ---------------------------------------------------------------------------------------------
# flow matching (rectified flow, x = (1 - sigma) x0 + sigma eps: SD3, FLUX.1, Wan, Sana ...)
# ---------------------------------------------------------------------------------------------


def shift_sigmas(sigmas, shift: float):
    """SD3's resolution shift (Esser et al. 2024, arXiv:2403.03206, eq. 23): shift s / (1 + (shift - 1) s), in the
    dtype of ``sigmas`` (numpy array or tensor) and diffusers' operation order."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def time_shift_exponential(mu: float, sigma: float, t):
    """FLUX.1's resolution-dependent shift of ``t`` in (0, 1]: e^mu / (e^mu + (1 / t - 1)^sigma)."""
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma)


def time_shift_linear(mu: float, sigma: float, t):
    """The linear variant of :func:`time_shift_exponential`: mu / (mu + (1 / t - 1)^sigma)."""
    return mu / (mu + (1 / t - 1) ** sigma)


def stretch_to_terminal(t, shift_terminal: float):
    """Stretch a descending schedule ``t`` so that it ends at ``shift_terminal`` (LTX-Video's rf.py): with
    k = (1 - t[-1]) / (1 - shift_terminal), t -> 1 - (1 - t) / k."""
    one_minus_z = 1 - t
    scale_factor = one_minus_z[-1] / (1 - shift_terminal)
    return 1 - (one_minus_z / scale_factor)


# ---------------------------------------------------------------------------------------------
# UniPC (VP sigmas, their Karras / exponential / beta respacings, flow sigmas)
# ---------------------------------------------------------------------------------------------


def _spaced_unipc_timesteps(T: int, n: int, spacing: str, steps_offset: int) -> np.ndarray:
    """Integer timesteps of the multistep solvers (DPM-Solver, UniPC): n + 1 points, the last dropped."""
    check_choice("timestep_spacing", spacing, TIMESTEP_SPACINGS)
    if spacing == "linspace":
        return np.linspace(0, T - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        ratio = T // (n + 1)
        return (np.arange(0, n + 1) * ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    return np.arange(T, 0, -T / n).round().copy().astype(np.int64) - 1


def _respaced(kind: str, base: np.ndarray, n: int, sigma_min, sigma_max) -> np.ndarray:
    """Karras / exponential / beta sigmas between the ends of ``base`` (descending), or the given bounds."""
    lo = sigma_min if sigma_min is not None else float(base[-1])
    hi = sigma_max if sigma_max is not None else float(base[0])
    if kind == "karras":
        return karras_sigmas(lo, hi, n)
    if kind == "exponential":
        return exponential_sigmas(lo, hi, n)
    return beta_sigmas(lo, hi, n)


def unipc_flow_sigmas(
    n: int,
    num_train_timesteps: int,
    flow_shift: float,
    *,
    mu=None,
    time_shift_type: str = "exponential",
    shift_terminal=None,
    sigmas=None,
) -> np.ndarray:
    """The ``use_flow_sigmas`` schedule of diffusers' UniPC, without the final sigma: ``n`` points of
    linspace(1, 1/T) (or the given ``sigmas``), shifted by ``flow_shift`` or, with ``mu``, the dynamic time shift,
    stretched to ``shift_terminal``, and the first moved 1e-6 below 1 (its lambda would be -inf)."""
    if sigmas is None:
        sigmas = np.linspace(1, 1 / num_train_timesteps, n + 1)[:-1]
    if mu is not None:
        check_choice("time_shift_type", time_shift_type, ("exponential", "linear"))
        shift = time_shift_exponential if time_shift_type == "exponential" else time_shift_linear
        sigmas = shift(mu, 1.0, sigmas)
    else:
        sigmas = shift_sigmas(sigmas, flow_shift)
    if shift_terminal:
        sigmas = stretch_to_terminal(sigmas, shift_terminal)
    sigmas = np.array(sigmas)  # a copy: the caller's array is not moved
    eps = 1e-6
    if np.fabs(sigmas[0] - 1) < eps:
        sigmas[0] -= eps
    return sigmas


def unipc_schedule(
    alphas_cumprod: torch.Tensor,
    num_inference_steps: int,
    *,
    spacing: str = "linspace",
    steps_offset: int = 0,
    use_karras_sigmas: bool = False,
    use_exponential_sigmas: bool = False,
    use_beta_sigmas: bool = False,
    use_flow_sigmas: bool = False,
    flow_shift: float = 1.0,
    mu=None,
    time_shift_type: str = "exponential",
    shift_terminal=None,
    sigma_min=None,
    sigma_max=None,
    final_sigmas_type: str = "zero",
    sigmas=None,
) -> tuple[np.ndarray, np.ndarray]:
    """(timesteps int64 (n,), sigmas float32 (n+1,)) as diffusers' ``UniPCMultistepScheduler.set_timesteps``.

    Karras / exponential / beta sigmas respace the VP sigmas (or custom ``sigmas``); with ``use_flow_sigmas``
    the Karras ones are mapped to flow sigmas s / (1 + s) (exponential and beta ones are not, as in diffusers).
    ``final_sigmas_type`` "sigma_min" repeats the last sigma (VP: the sigma of timestep 0), "zero" appends 0.
    Timesteps are truncated to integers, as diffusers' int64 cast does."""
    check_choice("final_sigmas_type", final_sigmas_type, ("zero", "sigma_min"))
    T = len(alphas_cumprod)
    n = num_inference_steps
    ts = _spaced_unipc_timesteps(T, n, spacing, steps_offset)
    kind = "karras" if use_karras_sigmas else "exponential" if use_exponential_sigmas else None
    kind = "beta" if use_beta_sigmas else kind
    if kind is not None:
        base = sigmas if sigmas is not None else (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        log_base = np.log(base)
        sig = _respaced(kind, np.flip(base).copy(), n, sigma_min, sigma_max)
        if kind == "karras" and use_flow_sigmas:
            sig = sig / (sig + 1)
            ts = (sig * T).copy()
        else:
            ts = np.array([sigma_to_t(s, log_base) for s in sig])
            ts = ts.round() if kind == "karras" else ts
        last = sig[-1] if final_sigmas_type == "sigma_min" else 0
    elif use_flow_sigmas:
        sig = unipc_flow_sigmas(
            n, T, flow_shift, mu=mu, time_shift_type=time_shift_type, shift_terminal=shift_terminal, sigmas=sigmas
        )
        ts = (sig * T).copy()
        last = sig[-1] if final_sigmas_type == "sigma_min" else 0
    else:
        full = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy()
        sig = np.interp(ts, np.arange(0, len(full)), full)
        last = float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5) if final_sigmas_type == "sigma_min" else 0
    sigmas_out = np.concatenate([sig, [last]]).astype(np.float32)
    return torch.from_numpy(np.asarray(ts)).to(torch.int64).numpy(), sigmas_out


def flow_sigmas(num_inference_steps: int, num_train_timesteps: int, shift: float) -> np.ndarray:
    """The ``use_flow_sigmas`` schedule of diffusers' multistep solvers (DPM-Solver, UniPC): ``num_inference_steps``
    shifted sigmas, float64, descending from shift(1 - 1/T) (the final 0 not included)."""
    sigmas = 1.0 - np.linspace(1, 1 / num_train_timesteps, num_inference_steps + 1)
    return np.flip(shift_sigmas(sigmas, shift))[:-1].copy()


def calculate_shift(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """``mu`` for ``set_timesteps(mu=...)`` with dynamic shifting, as diffusers' FLUX.1 / SD3 pipelines compute it:
    linear in the image's token count, ``base_shift`` at ``base_seq_len`` tokens and ``max_shift`` at ``max_seq_len``
    (FLUX.1 at 1024x1024: 4096 tokens, mu = 1.15). Pass the scheduler config's ``base_image_seq_len``,
    ``max_image_seq_len``, ``base_shift`` and ``max_shift``."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b
