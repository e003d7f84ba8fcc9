"""The generic fused step and add-noise evaluated with torch ops: the "torch" backend.

Same formula, noise convention and float32 arithmetic as the Triton kernel (``kernels/step.py``), one torch
op per non-zero term. On CPU tensors the coefficient row is read on the host (no device to sync with), so a
term whose coefficient is zero costs nothing: a DDIM eta=0 step is five ops where diffusers' ``step`` runs
about a dozen. This is the CPU fast path ("auto" on CPU tensors without the Triton interpreter) and a
second, independent implementation of the kernels' contract for the tests. On CUDA tensors it keeps the row
on the device (reading it would sync) and evaluates every term.
"""

from __future__ import annotations

from typing import Optional

import torch

from .. import coefs
from ..coefs import NoiseMode, VarMode
from ..noise import philox_normal

Tensor = torch.Tensor


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """(B,) values broadcast over the sample dimensions of ``like``."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


def _is(c, value: float) -> bool:
    """Whether a host coefficient is exactly ``value`` (a device coefficient never is: it is not read)."""
    return isinstance(c, float) and c == value


def _combine(terms, out: Optional[Tensor] = None, reuse: bool = False) -> Tensor:
    """sum(c * t) over the terms with c != 0 in as few ops as possible (``torch.add(t0, t1, alpha=c1)`` when
    c0 == 1, then one ``add_(t, alpha=c)`` per further term), into ``out`` when given. ``c`` is a Python float
    (host row) or a 1-element tensor (device row). ``reuse``: a single term with c == 1 may be returned as is
    (the caller only reads it)."""
    like = terms[0][1]
    terms = [(c, t) for c, t in terms if not _is(c, 0.0)]
    if not terms:
        return out.zero_() if out is not None else torch.zeros_like(like)
    (c0, t0), rest = terms[0], terms[1:]
    if _is(c0, 1.0):
        if not rest:
            return t0 if reuse and out is None else (out.copy_(t0) if out is not None else t0.clone())
        c1, t1 = rest[0]
        if isinstance(c1, float):
            acc = torch.add(t0, t1, alpha=c1, out=out) if out is not None else torch.add(t0, t1, alpha=c1)
            rest = rest[1:]
        else:
            acc = out.copy_(t0) if out is not None else t0.clone()
    else:
        acc = torch.mul(t0, c0, out=out) if out is not None else torch.mul(t0, c0)
    for c, t in rest:
        _axpy(acc, c, t)
    return acc


def _axpy(acc: Tensor, c, t: Tensor) -> None:
    """acc += c * t in place (nothing for a host zero)."""
    if isinstance(c, float):
        if c != 0.0:
            acc.add_(t, alpha=c)
    else:
        acc.addcmul_(t, c)


def _row(p):
    """The row's coefficients as Python floats (CPU, or given by the caller) or 1-element tensor views (CUDA:
    reading the row would sync)."""
    if p.coef_values is not None:
        return p.coef_values
    if p.coef.device.type == "cpu":
        return [float(v) for v in p.coef.reshape(-1).tolist()]
    return [p.coef[k : k + 1] for k in range(coefs.NCOEF)]


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _buffer(out: Optional[Tensor], like: Tensor) -> Tensor:
    """``out`` itself when results can be computed straight into it (float32), else a float32 scratch."""
    return out if out is not None and out.dtype == torch.float32 else torch.empty_like(like)


def fused_step(p) -> None:
    """Evaluate one ``fastdiff.ops.StepParams`` with torch ops (see ``fastdiff.coefs`` for the formula)."""
    r = _row(p)
    x = _f32(p.sample)
    batch = x.shape[0]
    m = _f32(p.model_output)
    if p.guidance is not None:
        m_u, m_c = m[:batch], m[batch:]
        m = torch.addcmul(m_u, p.guidance.float(), m_c - m_u)
    if p.mscale is not None:
        m = m * _per_sample(p.mscale.float(), m)

    z = None
    if p.noise_mode == NoiseMode.TENSOR:
        z = _f32(p.noise)
    elif p.noise_mode == NoiseMode.PHILOX:
        z = philox_normal(p.seed, x[0].numel(), p.offset, coefs.STREAM_STEP).reshape(x.shape)
    xh = x if z is None else _combine([(1.0, x), (r[coefs.K_PRE], z)], reuse=True)

    # x0 = X_S * (A_X * xh + A_M * m), then clipped or thresholded, in place
    x0 = _combine([(r[coefs.A_X], xh), (r[coefs.A_M], m)], out=_buffer(p.x0, x))
    if not _is(r[coefs.X_S], 1.0):
        x0.mul_(r[coefs.X_S])
    if p.thresh is not None:
        s = _per_sample(p.thresh.float(), x0)
        torch.minimum(x0, s, out=x0)
        torch.maximum(x0, -s, out=x0)
        x0.div_(s)
    elif p.clip_range > 0:
        x0.clamp_(-p.clip_range, p.clip_range)
    if p.x0 is not None and p.x0 is not x0:
        p.x0.copy_(x0)
    hist = [_f32(h) for h in p.hist]
    hk = (coefs.H_1, coefs.H_2, coefs.H_3)
    if p.last is not None:  # the corrected sample, from the previous step's starting sample and the history
        lk = (coefs.L_1, coefs.L_2, coefs.L_3)
        terms = [(r[coefs.L_L], _f32(p.last)), (r[coefs.L_0], x0)] + [(r[k], h) for k, h in zip(lk, hist)]
        xc = _combine(terms, out=_buffer(p.corr, x))
    else:
        xc = xh
    if p.corr is not None and p.corr is not xc:
        p.corr.copy_(xc)
    if p.prev is None:
        return

    # eps = E_S * (E_X * xh + E_M * m + E_0 * x0); prev = C_0 x0 + C_E eps + C_X xc + H_k h_k + std z
    terms = [(r[coefs.C_0], x0), (r[coefs.C_X], xc)]
    if not _is(r[coefs.C_E], 0.0):
        eps = _combine([(r[coefs.E_X], xh), (r[coefs.E_M], m), (r[coefs.E_0], x0)], reuse=True)
        if not _is(r[coefs.E_S], 1.0):
            eps = eps * r[coefs.E_S]
        terms.insert(1, (r[coefs.C_E], eps))
    terms += [(r[k], h) for k, h in zip(hk, hist)]
    prev = _combine(terms, out=_buffer(p.prev, x))
    if z is not None:
        if p.var_mode == VarMode.FIXED:
            _axpy(prev, r[coefs.SIGMA], z)
        else:
            v = _f32(p.var)
            if p.var_mode == VarMode.LEARNED:
                std = torch.sqrt(v) * r[coefs.SIGMA]
            else:
                std = torch.exp(0.5 * (v * r[coefs.LV_A] + r[coefs.LV_B])) * r[coefs.SIGMA]
            prev.addcmul_(std, z)
    if p.prev is not prev:
        p.prev.copy_(prev)


def add_noise(x, noise, table, index, seed, offset, out, stream: int) -> None:
    """out[b] = table[index[b], 0] * x[b] + table[index[b], 1] * z[b]; NaN for an index outside the table."""
    batch = x.shape[0]
    n = table.shape[0]
    valid = (index >= 0) & (index < n)
    safe = torch.where(valid, index, torch.zeros_like(index))
    p = torch.where(valid, table[safe, 0], torch.full_like(table[safe, 0], float("nan")))
    q = table[safe, 1]
    if noise is not None:
        z = _f32(noise)
    else:
        z = philox_normal(seed, x[0].numel(), offset, stream).reshape(x.shape)
    xf = _f32(x)
    p, q = p.expand(batch), q.expand(batch)
    res = torch.addcmul(_per_sample(p, xf) * xf, _per_sample(q, z), z)
    out.copy_(res)
