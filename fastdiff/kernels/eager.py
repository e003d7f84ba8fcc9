"""The generic fused step and add-noise evaluated with torch ops: the "torch" backend.

Same formula, noise convention and float32 arithmetic as the Triton kernel (``kernels/step.py``), one torch
op per non-zero term. On CPU tensors the coefficient row is read on the host (no device to sync with), so a
term whose coefficient is zero costs nothing: a DDIM eta=0 step is five ops where diffusers' ``step`` runs
about a dozen. This is the CPU fast path ("auto" on CPU tensors without the Triton interpreter) and a
second, independent implementation of the kernels' contract for the tests. On CUDA tensors it keeps the row
on the device (reading it would sync) and evaluates every term.

Host cost decides at small sizes (measured on this project's 2-core CPU at 2x4x16x16): ``torch.mul(t, c)``
with a Python float costs ~9.5 us (the float is wrapped in a new tensor), with a 0-d view of the row ~4.5 us,
and ``torch.add(a, b, alpha=c)`` ~5 us. So a sum of terms starts from a unit-coefficient term with
``torch.add(..., alpha=)`` where it can, accumulates with ``add_(alpha=)``, and multiplies by row views.
Reordering two terms is exact; with three or more the sum may round differently from the kernel's fixed
order by an ulp.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Optional

import torch

from .. import coefs
from ..coefs import NoiseMode, VarMode
from ..noise import philox_normal

Tensor = torch.Tensor


def _per_sample(v: Tensor, like: Tensor) -> Tensor:
    """(B,) values broadcast over the sample dimensions of ``like``."""
    return v.reshape((-1,) + (1,) * (like.ndim - 1))


class _Row:
    """One coefficient row: ``value(k)`` a Python float where the host knows it (None on CUDA, where reading
    it would sync), ``scalar(k)`` a 0-d float32 tensor of it for multiplications: a view of the device row, or
    on the CPU a tensor of its own made from the value (the same float32 bits), so that a program built from
    a row's values serves every row with those values."""

    def __init__(self, coef: Optional[Tensor], values=None):
        self.coef = coef.reshape(-1) if coef is not None else None
        if values is not None:
            self.values = values
        elif self.coef.device.type == "cpu":
            self.values = self.coef.tolist()
        else:
            self.values = None

    def value(self, k: Optional[int]) -> Optional[float]:
        if k is None:  # a literal 1, not from the row
            return 1.0
        return None if self.values is None else float(self.values[k])

    def is_(self, k: Optional[int], v: float) -> bool:
        c = self.value(k)
        return c is not None and c == v

    def scalar(self, k: int) -> Tensor:
        if self.coef is None:
            return torch.tensor(self.values[k], dtype=torch.float32)
        return self.coef[k]


class _Sum:
    """sum(coef[k] * operand) over the terms whose coefficient is not a host zero (k None: a literal 1), decided
    once per row: which terms drop out and which one leads (a unit term, so that ``torch.add(a, b, alpha=c)``
    folds a second term into the first op); ``run`` then only does the ops."""

    __slots__ = ("lead", "lead_scale", "second", "rest")

    def __init__(self, r: _Row, terms):
        live = [(k, name) for k, name in terms if not r.is_(k, 0.0)]
        unit = next((i for i, (k, _) in enumerate(live) if r.is_(k, 1.0)), None)
        self.second = None
        self.lead_scale = None
        if not live:
            self.lead, self.rest = None, []
            return
        if unit is not None:
            live.insert(0, live.pop(unit))
            if len(live) > 1 and r.value(live[1][0]) is not None:
                self.second = (live[1][1], r.value(live[1][0]))
                live.pop(1)
        else:
            self.lead_scale = r.scalar(live[0][0])
        self.lead = live[0][1]
        self.rest = [(name, r.value(k) if r.value(k) is not None else r.scalar(k)) for k, name in live[1:]]

    def names(self) -> set:
        """The operands this sum reads."""
        return {n for n in (self.lead, self.second[0] if self.second else None) if n} | {n for n, _ in self.rest}

    def run(self, env: dict, out: Optional[Tensor] = None, reuse: bool = False) -> Tensor:
        if self.lead is None:
            return out.zero_() if out is not None else torch.zeros_like(env["x"])
        t0 = env[self.lead]
        if self.lead_scale is not None:
            acc = torch.mul(t0, self.lead_scale, out=out) if out is not None else torch.mul(t0, self.lead_scale)
        elif self.second is not None:
            name, alpha = self.second
            acc = (
                torch.add(t0, env[name], alpha=alpha, out=out)
                if out is not None
                else torch.add(t0, env[name], alpha=alpha)
            )
        elif not self.rest and reuse and out is None:
            return t0
        else:
            acc = out.copy_(t0) if out is not None else t0.clone()
        for name, c in self.rest:
            if isinstance(c, float):
                acc.add_(env[name], alpha=c)
            else:
                acc.addcmul_(env[name], c)
        return acc


def _f32(t: Tensor) -> Tensor:
    return t if t.dtype == torch.float32 else t.float()


def _buffer(out: Optional[Tensor]) -> Optional[Tensor]:
    """``out`` itself when results can be computed straight into it (float32), else None: the first op of the
    sum allocates its own float32 result (cheaper than a separate ``empty_like``)."""
    return out if out is not None and out.dtype == torch.float32 else None


# Programs, then one per call shape (flags). On the CPU a program owns its scalars and is keyed by the row's
# values: every schedule with the same numbers (a loop calling set_timesteps before each batch) reuses the
# programs of the first, and building one (~20-40 us) is paid once per distinct row rather than per step of every
# walk. Bounded: cleared when full. Elsewhere (CUDA rows, whose values the host does not read) a program holds
# views of its row and is keyed by the row view's id, with a weak reference that drops the entry when the view
# dies (not a WeakKeyDictionary, which compares keys with ``==``, elementwise on tensors).
_BY_VALUES: dict = {}
_BY_VALUES_MAX = 4096
_BY_ROW: dict = {}


def _programs_for(coef: Tensor) -> dict:
    key = id(coef)
    entry = _BY_ROW.get(key)
    if entry is not None and entry[0]() is coef:
        return entry[1]
    programs: dict = {}
    _BY_ROW[key] = (weakref.ref(coef, lambda _ref, key=key: _BY_ROW.pop(key, None)), programs)
    return programs


class _Flags(NamedTuple):
    """A call shape: which operands and outputs a step has (a program's key beside its row). ``fused_step`` keys
    by the plain tuple of these fields in this order, which equals the _Flags and hashes alike."""

    noise: int  # NoiseMode
    thresh: bool
    clip: bool
    write_x0: bool
    want_prev: bool
    has_last: bool
    has_corr: bool
    nhist: int


def _program_by_values(values: tuple, flags: tuple) -> _Program:
    key = (values, flags)
    program = _BY_VALUES.get(key)
    if program is None:
        if len(_BY_VALUES) >= _BY_VALUES_MAX:
            _BY_VALUES.clear()
        program = _BY_VALUES[key] = _Program(_Row(None, values), flags)
    return program


def fused_step(p) -> None:
    """Evaluate one ``fastdiff.ops.StepParams`` with torch ops (see ``fastdiff.coefs`` for the formula)."""
    # _Flags' fields as a plain tuple (equal to and hashed like the _Flags; building one per step costs ~1 us)
    flags = (
        int(p.noise_mode),
        p.thresh is not None,
        p.clip_range > 0,
        p.x0 is not None,
        p.prev is not None,
        p.last is not None,
        p.corr is not None,
        len(p.hist),
    )
    coef = p.coef
    if coef.device.type == "cpu":
        values = p.coef_values if p.coef_values is not None else coef.reshape(-1).tolist()
        program = _program_by_values(tuple(values), flags)
    else:
        programs = _programs_for(coef)
        key = (coef._version, flags)  # an in-place change of the row makes a new program
        program = programs.get(key)
        if program is None:
            program = programs[key] = _Program(_Row(coef), flags)
    program.run(p)


class _Program:
    """The step's formula for one row and one call shape, with every term that is a host zero dropped."""

    def __init__(self, r: _Row, flags: tuple):
        flags = _Flags(*flags)
        self.r = r
        self.want_prev, self.write_x0 = bool(flags.want_prev), bool(flags.write_x0)
        hist = ("h1", "h2", "h3")[: flags.nhist]
        self.xh = _Sum(r, [(None, "x"), (coefs.K_PRE, "z")]) if flags.noise != NoiseMode.NONE else None
        self.x0 = _Sum(r, [(coefs.A_X, "xh"), (coefs.A_M, "m")])
        self.x_s = None if r.is_(coefs.X_S, 1.0) else r.scalar(coefs.X_S)
        corr = [(coefs.L_L, "last"), (coefs.L_0, "x0")] + list(zip((coefs.L_1, coefs.L_2, coefs.L_3), hist))
        self.xc = _Sum(r, corr) if flags.has_last else None
        self.eps = None
        if self.want_prev and not r.is_(coefs.C_E, 0.0):
            self.eps = _Sum(r, [(coefs.E_X, "xh"), (coefs.E_M, "m"), (coefs.E_0, "x0")])
        self.e_s = None if r.is_(coefs.E_S, 1.0) else r.scalar(coefs.E_S)
        prev = [(coefs.C_0, "x0")] + ([(coefs.C_E, "eps")] if self.eps is not None else []) + [(coefs.C_X, "xc")]
        self.prev = _Sum(r, prev + list(zip((coefs.H_1, coefs.H_2, coefs.H_3), hist)))
        # x0 is computed when written, clipped (a thresholding pass), or read by the update or the corrector
        readers = [self.prev] + [s for s in (self.eps, self.xc) if s is not None]
        self.need_x0 = bool(self.write_x0 or flags.thresh or flags.clip or any("x0" in s.names() for s in readers))

    def run(self, p) -> None:
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
        self.eval(x, m, z, p.prev, p.x0, p.corr, p.hist, p.last, p.var, p.thresh, p.clip_range, p.var_mode)

    def eval(
        self,
        x,
        m,
        z,
        prev_out=None,
        x0_out=None,
        corr_out=None,
        hist=(),
        last=None,
        var=None,
        thresh=None,
        clip_range=0.0,
        var_mode=VarMode.FIXED,
    ) -> tuple:
        """The formula on float32 x, guided m and noise z; results written into the ``*_out`` tensors given,
        else returned in new float32 tensors. Returns (prev, x0): None where the call shape does not make it."""
        r = self.r
        env = {"x": x, "m": m}
        if z is not None:
            env["z"] = z
            env["xh"] = xh = self.xh.run(env, reuse=True)
        else:
            env["xh"] = xh = x
        for name, h in zip(("h1", "h2", "h3"), hist):
            env[name] = _f32(h)

        x0 = None
        if self.need_x0:  # x0 = X_S * (A_X * xh + A_M * m), then clipped or thresholded, in place
            x0 = env["x0"] = self.x0.run(env, out=_buffer(x0_out))
            if self.x_s is not None:
                x0.mul_(self.x_s)
            if thresh is not None:
                s = _per_sample(thresh.float(), x0)
                torch.minimum(x0, s, out=x0)
                torch.maximum(x0, -s, out=x0)
                x0.div_(s)
            elif clip_range > 0:
                x0.clamp_(-clip_range, clip_range)
            if x0_out is not None and x0_out is not x0:
                x0 = x0_out.copy_(x0)
        if self.xc is not None:  # the corrected sample, from the previous step's starting sample and the history
            env["last"] = _f32(last)
            env["xc"] = xc = self.xc.run(env, out=_buffer(corr_out))
        else:
            env["xc"] = xc = xh
        if corr_out is not None and corr_out is not xc:
            corr_out.copy_(xc)
        if not self.want_prev:
            return None, x0 if self.write_x0 else None

        # eps = E_S * (E_X * xh + E_M * m + E_0 * x0); prev = C_0 x0 + C_E eps + C_X xc + H_k h_k + std z
        if self.eps is not None:
            eps = self.eps.run(env, reuse=True)
            env["eps"] = eps if self.e_s is None else torch.mul(eps, self.e_s)
        prev = self.prev.run(env, out=_buffer(prev_out))
        if z is not None:
            if var_mode == VarMode.FIXED:
                sigma = r.value(coefs.SIGMA)
                if sigma is None:
                    prev.addcmul_(z, r.scalar(coefs.SIGMA))
                elif sigma != 0.0:
                    prev.add_(z, alpha=sigma)
            else:
                v = _f32(var)
                if var_mode == VarMode.LEARNED:
                    std = torch.sqrt(v) * r.scalar(coefs.SIGMA)
                else:
                    std = torch.exp(0.5 * (v * r.scalar(coefs.LV_A) + r.scalar(coefs.LV_B))) * r.scalar(coefs.SIGMA)
                prev.addcmul_(std, z)
        if prev_out is not None and prev_out is not prev:
            prev = prev_out.copy_(prev)
        return prev, x0 if self.write_x0 else None


class Lane:
    """A plain step (no guidance, history, corrector, learned variance or thresholding; noise from a tensor or
    none) on CPU tensors, for a scheduler that has run the same row and call shape before: the program and the
    output dtypes, called without building ``StepParams`` or allocating the outputs first (their first op
    allocates them). ``lane(x, m, z)`` returns (prev, x0), x0 None unless written; contiguous inputs give
    contiguous outputs."""

    __slots__ = ("program", "clip_range", "out_dtype", "x0_dtype")

    def __init__(self, values: tuple, noise: bool, clip_range: float, write_x0: bool, out_dtype, x0_dtype):
        flags = _Flags(
            noise=int(NoiseMode.TENSOR if noise else NoiseMode.NONE),
            thresh=False,
            clip=clip_range > 0,
            write_x0=write_x0,
            want_prev=True,
            has_last=False,
            has_corr=False,
            nhist=0,
        )
        self.program = _program_by_values(tuple(values), flags)
        self.clip_range, self.out_dtype, self.x0_dtype = clip_range, out_dtype, x0_dtype

    def __call__(self, x: Tensor, m: Tensor, z: Optional[Tensor]) -> tuple:
        prev, x0 = self.program.eval(_f32(x), _f32(m), None if z is None else _f32(z), clip_range=self.clip_range)
        if prev.dtype != self.out_dtype:
            prev = prev.to(self.out_dtype)
        if x0 is not None and x0.dtype != self.x0_dtype:
            x0 = x0.to(self.x0_dtype)
        return prev, x0


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
