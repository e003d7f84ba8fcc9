"""``torch.library`` custom ops for the fast paths: ``fastdiff::fused_step`` and ``fastdiff::add_noise``.

Both write into caller-allocated outputs and return nothing, with fake implementations so that
``torch.compile`` and CUDA graphs see through them. The ``backend`` argument ("triton" or "cuda")
picks the implementation; resolving "auto" happens in ``fastdiff._backend`` before the call.

Eager callers go through :func:`fused_step` / :func:`add_noise`, which call the implementation
directly unless torch.compile is tracing: a dispatcher round trip through a Python custom op costs
about 40 us of host time on this project's CI machine, which is as long as a whole fused step at
Stable Diffusion latent size, and the step is launch-bound there.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import coefs

Tensor = torch.Tensor


def _inner_contiguous(t: Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


_CUDA_EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_ext_covers_step(x_dtype: torch.dtype, in_dtypes, out_dtypes) -> bool:
    """Whether the CUDA extension runs a call exactly as the Triton kernel would. It reads every input in
    the sample's dtype (another dtype would be rounded to it first) and writes its outputs in one dtype:
    the sample's, or float32 on either side. Other mixes (Euler's half-precision prev with a float32 x0,
    a float32 model output for a half-precision sample) run the Triton kernel instead."""
    if x_dtype not in _CUDA_EXT_DTYPES or any(d != x_dtype for d in in_dtypes):
        return False
    out = set(out_dtypes)
    if len(out) != 1:
        return False
    (o,) = out
    return o in _CUDA_EXT_DTYPES and (o == x_dtype or o == torch.float32 or x_dtype == torch.float32)


def route(backend: str, x_dtype: torch.dtype, in_dtypes, out_dtypes) -> str:
    """The backend that runs a call requested on ``backend``: "cuda" becomes "triton" where the extension
    does not cover the dtype mix (:func:`cuda_ext_covers_step`)."""
    if backend != "cuda" or cuda_ext_covers_step(x_dtype, in_dtypes, out_dtypes):
        return backend
    from . import _backend

    if not _backend.triton_available():
        dtypes = sorted({str(d) for d in (x_dtype, *in_dtypes, *out_dtypes)})
        raise RuntimeError(
            f"the CUDA extension does not run this dtype mix ({', '.join(dtypes)}: inputs must share the sample's "
            "dtype, outputs one dtype) and triton, which does, cannot be imported; pass tensors of one dtype"
        )
    return "triton"


def _dtypes(*tensors) -> list:
    return [t.dtype for t in tensors if t is not None]


def as_rows(t: Optional[Tensor]) -> tuple[Optional[Tensor], int]:
    """``t`` addressable as (batch, per-sample elements) with a batch stride, copying only when a
    sample's own elements are not contiguous. Returns (tensor, batch stride)."""
    if t is None:
        return None, 0
    if not t.is_contiguous() and not _inner_contiguous(t):
        t = t.contiguous()
    return t, t.stride(0)


def _fused_step_impl(
    sample: Tensor,
    model_output: Tensor,
    coef: Tensor,
    prev_out: Optional[Tensor],
    x0_out: Optional[Tensor],
    noise: Optional[Tensor],
    seed: Optional[Tensor],
    offset: Optional[Tensor],
    guidance: Optional[Tensor],
    thresh: Optional[Tensor],
    mscale: Optional[Tensor],
    var: Optional[Tensor],
    hist1: Optional[Tensor],
    hist2: Optional[Tensor],
    clip_range: float,
    var_mode: int,
    backend: str,
) -> None:
    batch = sample.shape[0]
    numel = sample.numel() // batch if batch else 0
    if numel == 0:
        return
    for name, out in (("prev_out", prev_out), ("x0_out", x0_out)):
        if out is not None and not out.is_contiguous() and not _inner_contiguous(out):
            raise ValueError(f"`{name}` must have contiguous samples, got strides {out.stride()}")
    x, xs = as_rows(sample)
    m, ms = as_rows(model_output)
    z, zs = as_rows(noise)
    v, vs = as_rows(var)
    h1, h1s = as_rows(hist1)
    h2, h2s = as_rows(hist2)
    _, ps = as_rows(prev_out)
    _, x0s = as_rows(x0_out)
    noise_mode = 1 if z is not None else (2 if seed is not None else 0)
    if backend == "triton":
        from .kernels import step as step_kernels

        step_kernels.launch(
            x,
            m,
            coef,
            prev_out,
            x0_out,
            z,
            seed,
            offset,
            guidance,
            thresh,
            mscale,
            v,
            h1,
            h2,
            numel,
            batch,
            (xs, ms, zs, vs, h1s, h2s, ps, x0s),
            float(clip_range),
            noise_mode,
            var_mode,
            prev_out is not None,
        )
    elif backend == "cuda":
        torch.ops.fastdiff.fused_step_cuda(
            x,
            m,
            coef,
            prev_out,
            x0_out,
            z,
            seed,
            offset,
            guidance,
            thresh,
            mscale,
            v,
            h1,
            h2,
            float(clip_range),
            int(var_mode),
        )
    else:
        raise ValueError(f"fastdiff::fused_step runs backend 'triton' or 'cuda', got {backend!r}")


@torch.library.custom_op("fastdiff::fused_step", mutates_args=("prev_out", "x0_out"))
def fused_step_op(
    sample: Tensor,
    model_output: Tensor,
    coef: Tensor,
    prev_out: Optional[Tensor],
    x0_out: Optional[Tensor],
    noise: Optional[Tensor],
    seed: Optional[Tensor],
    offset: Optional[Tensor],
    guidance: Optional[Tensor],
    thresh: Optional[Tensor],
    mscale: Optional[Tensor],
    var: Optional[Tensor],
    hist1: Optional[Tensor],
    hist2: Optional[Tensor],
    clip_range: float,
    var_mode: int,
    backend: str,
) -> None:
    """One generic scheduler step (see ``fastdiff.coefs`` for the formula). Writes ``prev_out`` and/or
    ``x0_out``; ``model_output`` holds 2B samples (unconditional first) when ``guidance`` is given."""
    backend = route(backend, sample.dtype, _dtypes(model_output, noise, var, hist1, hist2), _dtypes(prev_out, x0_out))
    _fused_step_impl(
        sample,
        model_output,
        coef,
        prev_out,
        x0_out,
        noise,
        seed,
        offset,
        guidance,
        thresh,
        mscale,
        var,
        hist1,
        hist2,
        clip_range,
        var_mode,
        backend,
    )


@fused_step_op.register_fake
def _(
    sample,
    model_output,
    coef,
    prev_out,
    x0_out,
    noise,
    seed,
    offset,
    guidance,
    thresh,
    mscale,
    var,
    hist1,
    hist2,
    clip_range,
    var_mode,
    backend,
):
    return None


def _add_noise_impl(
    sample: Tensor,
    noise: Optional[Tensor],
    table: Tensor,
    index: Tensor,
    seed: Optional[Tensor],
    offset: Optional[Tensor],
    out: Tensor,
    stream: int,
    backend: str,
) -> None:
    batch = sample.shape[0]
    numel = sample.numel() // batch if batch else 0
    if numel == 0:
        return
    x, xs = as_rows(sample)
    z, zs = as_rows(noise)
    _, os_ = as_rows(out)
    idx_stride = 1 if index.numel() > 1 else 0
    noise_mode = 1 if z is not None else 2
    if backend == "triton":
        from .kernels import add_noise as add_noise_kernels

        add_noise_kernels.launch(
            x, z, out, table, index, seed, offset, numel, (xs, zs, os_, idx_stride), noise_mode, stream
        )
    elif backend == "cuda":
        torch.ops.fastdiff.add_noise_cuda(x, z, table, index, seed, offset, out, int(stream))
    else:
        raise ValueError(f"fastdiff::add_noise runs backend 'triton' or 'cuda', got {backend!r}")


@torch.library.custom_op("fastdiff::add_noise", mutates_args=("out",))
def add_noise_op(
    sample: Tensor,
    noise: Optional[Tensor],
    table: Tensor,
    index: Tensor,
    seed: Optional[Tensor],
    offset: Optional[Tensor],
    out: Tensor,
    stream: int,
    backend: str,
) -> None:
    """out[b] = table[index[b], 0] * sample[b] + table[index[b], 1] * z[b], with z = ``noise`` or Philox
    normals from (seed[b], offset, stream). ``index`` has 1 or B entries; an index outside the table
    gives NaN for that sample instead of reading out of bounds."""
    backend = route(backend, sample.dtype, _dtypes(noise), [out.dtype])
    _add_noise_impl(sample, noise, table, index, seed, offset, out, stream, backend)


@add_noise_op.register_fake
def _(sample, noise, table, index, seed, offset, out, stream, backend):
    return None


def _tracing() -> bool:
    return torch.compiler.is_compiling()


def fused_step(
    sample: Tensor,
    model_output: Tensor,
    coef: Tensor,
    *,
    backend: str,
    out_dtype: torch.dtype,
    write_prev: bool = True,
    write_x0: bool = True,
    x0_dtype: Optional[torch.dtype] = None,
    noise: Optional[Tensor] = None,
    seed: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
    guidance: Optional[Tensor] = None,
    thresh: Optional[Tensor] = None,
    mscale: Optional[Tensor] = None,
    var: Optional[Tensor] = None,
    hist: tuple = (),
    clip_range: float = 0.0,
    var_mode: int = coefs.VAR_FIXED,
    x0_out: Optional[Tensor] = None,
    routed: bool = False,
) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """Allocate the outputs and run one fused step. Returns (prev_sample, pred_original_sample);
    either is None when not asked for. ``hist`` holds up to two previous x0 tensors. ``routed``: the
    caller already passed ``backend`` through :func:`route` (schedulers do, to report it)."""
    shape, device = sample.shape, sample.device
    prev = torch.empty(shape, dtype=out_dtype, device=device) if write_prev else None
    if write_x0 and x0_out is None:
        x0_out = torch.empty(shape, dtype=x0_dtype or out_dtype, device=device)
    elif not write_x0:
        x0_out = None
    h1 = hist[0] if len(hist) > 0 else None
    h2 = hist[1] if len(hist) > 1 else None
    if _tracing():  # the op routes each call itself
        fn = fused_step_op
    else:
        fn = _fused_step_impl
        if not routed:
            backend = route(backend, sample.dtype, _dtypes(model_output, noise, var, h1, h2), _dtypes(prev, x0_out))
    fn(
        sample,
        model_output,
        coef,
        prev,
        x0_out,
        noise,
        seed,
        offset,
        guidance,
        thresh,
        mscale,
        var,
        h1,
        h2,
        float(clip_range),
        int(var_mode),
        backend,
    )
    return prev, x0_out


def add_noise(
    sample: Tensor,
    table: Tensor,
    index: Tensor,
    *,
    backend: str,
    noise: Optional[Tensor] = None,
    seed: Optional[Tensor] = None,
    offset: Optional[Tensor] = None,
    stream: int = coefs.STREAM_ADD_NOISE,
    routed: bool = False,
) -> Tensor:
    out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    index = index.reshape(-1)
    if index.dtype != torch.int64 or not index.is_contiguous():  # both kernels read int64 at stride 1
        index = index.to(torch.int64).contiguous()
    if _tracing():  # the op routes each call itself
        fn = add_noise_op
    else:
        fn = _add_noise_impl
        if not routed:
            backend = route(backend, sample.dtype, _dtypes(noise), [out.dtype])
    fn(sample, noise, table, index, seed, offset, out, int(stream), backend)
    return out
