"""Comparison helpers: failures say what differed and where."""

from __future__ import annotations

import torch


def describe_diff(actual: torch.Tensor, expected: torch.Tensor) -> str:
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = (a - e).abs()
    finite = torch.isfinite(diff)
    idx = int(torch.where(finite, diff, torch.zeros_like(diff)).argmax()) if diff.numel() else 0
    where = tuple(int(i) for i in torch.unravel_index(torch.tensor(idx), a.shape)) if a.ndim else ()
    return (
        f"max |diff| {diff[finite].max().item() if finite.any() else float('nan'):.3e} at {where} "
        f"(actual {a.flatten()[idx].item():.6g}, expected {e.flatten()[idx].item():.6g}); "
        f"max |expected| {e.abs().max().item():.3e}; "
        f"NaN actual/expected {int(a.isnan().sum())}/{int(e.isnan().sum())}, "
        f"inf actual/expected {int(a.isinf().sum())}/{int(e.isinf().sum())}"
    )


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| over the finite entries. NaN or an infinity where the other tensor
    has none (or an infinity of the other sign) gives inf; NaN against NaN and equal infinities agree."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    if a.shape != e.shape:
        raise AssertionError(f"shape {tuple(a.shape)} != expected {tuple(e.shape)}")
    bad_a, bad_e = ~torch.isfinite(a), ~torch.isfinite(e)
    if bad_a.any() or bad_e.any():
        same = (
            torch.equal(bad_a, bad_e) and torch.equal(a.isnan(), e.isnan()) and torch.equal(a[a.isinf()], e[e.isinf()])
        )
        if not same:
            return float("inf")
        a, e = torch.where(bad_a, 0.0, a), torch.where(bad_e, 0.0, e)
    scale = e.abs().max().item()
    return (a - e).abs().max().item() / (scale if scale > 0 else 1.0)


def assert_rel(actual, expected, rtol: float, what: str = "") -> None:
    err = rel_err(actual, expected)
    assert err <= rtol, f"{what}: relative error {err:.3e} > {rtol:.1e}; {describe_diff(actual, expected)}"


def assert_fp32(actual, expected, truth_fn, rtol: float, what: str = "") -> None:
    """fp32 agreement with diffusers: within ``rtol`` relative (max-norm). Where diffusers' own fp32
    result is off the float64 truth by more than ``rtol`` (an ill-conditioned step, e.g. x0 = (x - sqrt(1-abar)
    eps) / sqrt(abar) with abar ~ 1e-9 near the clipping band), two fp32 implementations cannot agree to
    ``rtol``; then fastdiff must be at least as accurate as diffusers: error vs the float64 truth within
    twice diffusers' error. ``truth_fn()`` computes that truth lazily."""
    err = rel_err(actual, expected)
    if err <= rtol:
        return
    truth = truth_fn()
    err_ref = rel_err(expected, truth)
    err_fast = rel_err(actual, truth)
    assert err_ref > rtol and err_fast <= 2 * err_ref, (
        f"{what}: relative error vs diffusers {err:.3e} > {rtol:.1e}; vs float64 truth: fastdiff {err_fast:.3e}, "
        f"diffusers {err_ref:.3e}; {describe_diff(actual, expected)}"
    )


def assert_lowp(actual, plain, ref32, what: str = "") -> None:
    """flash-attention's rule: the fast result's error against an fp32 reference is within twice the
    error of plain PyTorch at the same low precision (plus one ulp at the output's scale, so that exact
    results on both sides do not demand bit equality)."""
    dtype = actual.dtype
    scale = ref32.detach().abs().max().item()
    floor = torch.finfo(dtype).eps * scale
    err_fast = (actual.double().cpu() - ref32.double().cpu()).abs().max().item()
    err_plain = (plain.double().cpu() - ref32.double().cpu()).abs().max().item()
    assert err_fast <= 2 * err_plain + floor, (
        f"{what} [{dtype}]: error vs fp32 {err_fast:.3e} > 2 x plain-PyTorch error {err_plain:.3e} + {floor:.1e}; "
        f"{describe_diff(actual, ref32)}"
    )


def poison_like(t: torch.Tensor) -> torch.Tensor:
    return torch.full_like(t, float("nan"))
