"""The fast ops and the one place that decides which implementation runs them.

``fused_step`` (one generic scheduler step, see ``fastdiff.coefs``) and ``add_noise`` (forward noising
from a per-index table) each have three implementations: the CUDA extension (``fastdiff._C``), the Triton
kernels and an eager evaluation with torch ops (``fastdiff.kernels.eager``, the CPU fast path). The
pure-PyTorch reference samplers are the fourth choice a scheduler can make; they live with the schedulers.
:func:`select` is the only function that decides: it resolves "auto" (or ``FASTDIFF_BACKEND``), checks that
the request can run, and sends dtype mixes the extension does not compute exactly as Triton to Triton. Its
answer is final: the ops below run the backend they are given.

Both ops are ``torch.library`` custom ops (``fastdiff::fused_step``, ``fastdiff::add_noise``) that write
into caller-allocated outputs, with fake implementations so that ``torch.compile`` sees through them.
Eager callers skip the dispatcher: a Python custom-op round trip costs about 40 us of host time on this
project's CI machine, as long as a whole fused step at Stable Diffusion latent size, which is launch-bound.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from . import _backend, coefs
from .coefs import NoiseMode, VarMode

Tensor = torch.Tensor
logger = logging.getLogger("fastdiff")

BACKENDS = ("auto", "cuda", "triton", "torch", "reference")

# ---------------------------------------------------------------------------------------------- selection


def unavailable(backend: str, device: torch.device) -> Optional[str]:
    """None if ``backend`` can run on ``device``, else a sentence saying why not."""
    if backend in ("reference", "torch"):
        return None
    if backend == "triton":
        return _backend.triton_unavailable(device)
    if backend == "cuda":
        return _backend.cuda_ext_unavailable(device)
    raise ValueError(f"`backend` must be one of {list(BACKENDS)}, got {backend!r}")


_CUDA_EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def cuda_ext_covers(x_dtype: torch.dtype, in_dtypes: Sequence, out_dtypes: Sequence) -> bool:
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


@functools.lru_cache(maxsize=256)
def _select(requested: str, source: str, device: torch.device, dtypes: tuple, interpret: bool) -> str:
    if requested not in BACKENDS:
        raise ValueError(f"`backend` ({source}) must be one of {list(BACKENDS)}, got {requested!r}")
    x_dtype, in_dtypes, out_dtypes = dtypes
    if requested == "auto":
        order = ("cuda", "triton", "torch") if device.type == "cuda" else ("triton", "torch")
        chosen = next(b for b in order if unavailable(b, device) is None)
    else:
        why = unavailable(requested, device)
        if why is not None:
            raise RuntimeError(f"backend {requested!r} ({source}) cannot run: {why}")
        chosen = requested
    if chosen == "cuda" and x_dtype is not None and not cuda_ext_covers(x_dtype, in_dtypes, out_dtypes):
        why = unavailable("triton", device)
        if why is not None:
            names = sorted({str(d) for d in (x_dtype, *in_dtypes, *out_dtypes)})
            raise RuntimeError(
                f"the CUDA extension does not run this dtype mix ({', '.join(names)}: inputs must share the "
                f"sample's dtype, outputs one dtype) and triton, which does, cannot run ({why}); pass tensors "
                "of one dtype"
            )
        chosen = "triton"
    logger.debug("fastdiff backend: requested %r (%s) on %s for %s -> %s", requested, source, device, dtypes, chosen)
    return chosen


def environment() -> tuple:
    """The environment :func:`select` reads: (FASTDIFF_BACKEND, whether TRITON_INTERPRET=1). Schedulers take it
    once per schedule (``set_timesteps``): two environment reads cost ~1-4 us, a whole small CPU step ~50 us."""
    return os.environ.get("FASTDIFF_BACKEND"), _backend.interpret_mode()


def select(
    requested: Optional[str],
    device,
    x_dtype: Optional[torch.dtype] = None,
    in_dtypes: Sequence = (),
    out_dtypes: Sequence = (),
    env: Optional[tuple] = None,
) -> str:
    """The backend that runs a call: one of "cuda", "triton", "torch", "reference".

    ``requested``: "auto", a backend name, or None for ``FASTDIFF_BACKEND`` (default "auto"). "auto" takes the
    CUDA extension, then Triton, then the torch evaluation on CUDA tensors; Triton (only under
    ``TRITON_INTERPRET=1``), then the torch evaluation on CPU tensors. With the dtypes of the call given, "cuda"
    becomes "triton" where the extension does not cover the mix (:func:`cuda_ext_covers`). Raises, saying why,
    when the requested backend cannot run. ``env``: :func:`environment` read earlier (default: read now).
    Cached per (request, environment, device, dtypes), and logged at DEBUG level the first time."""
    backend_var, interpret = env if env is not None else environment()
    source = "argument"
    if requested is None:
        requested = backend_var or "auto"
        source = "FASTDIFF_BACKEND"
    return _select(
        requested,
        source,
        torch.device(device),
        (x_dtype, tuple(in_dtypes), tuple(out_dtypes)),
        interpret,  # Triton's availability on CPU tensors depends on it
    )


# ---------------------------------------------------------------------------------------------- fused step


@dataclass
class StepParams:
    """Everything one fused step reads and writes: the Python side of csrc's ``StepParams``.

    sample x and model_output m are (B, ...) (m is (2B, ...), unconditional first, when ``guidance`` is given);
    coef is one float32 row of ``coefs.NCOEF``; prev and x0 are the outputs (either may be None), each sample's
    elements contiguous. noise (a tensor like x) or seed ((B,) int64) with offset ((1,) int64) give the step's
    Gaussian noise; guidance is a (1,) float32 scale; thresh the (B,) float32 dynamic-thresholding bounds;
    mscale the (B,) float32 guidance-rescale factors; var the learned variance half of the model output; hist
    up to three earlier converted model outputs; last the sample the previous step started from, which turns
    on the corrector, whose result is written to corr (a third output) when given. Inputs may have any float
    dtype; the kernels compute in float32.
    coef_values: the same row as Python floats, which a caller holding the host table passes so that the torch
    evaluation need not read ``coef`` back."""

    sample: Tensor
    model_output: Tensor
    coef: Tensor
    prev: Optional[Tensor] = None
    x0: Optional[Tensor] = None
    noise: Optional[Tensor] = None
    seed: Optional[Tensor] = None
    offset: Optional[Tensor] = None
    guidance: Optional[Tensor] = None
    thresh: Optional[Tensor] = None
    mscale: Optional[Tensor] = None
    var: Optional[Tensor] = None
    hist: tuple = ()
    last: Optional[Tensor] = None
    corr: Optional[Tensor] = None
    clip_range: float = 0.0
    var_mode: int = VarMode.FIXED
    coef_values: Optional[Sequence[float]] = None  # the row on the host, when the caller has it (not an input)

    # the op's input list, in csrc's ``StepInput`` order (a unit test checks the header against this)
    INPUTS = (
        "sample",
        "model_output",
        "coef",
        "noise",
        "seed",
        "offset",
        "guidance",
        "thresh",
        "mscale",
        "var",
        "hist1",
        "hist2",
        "hist3",
        "last",
    )

    @property
    def noise_mode(self) -> int:
        if self.noise is not None:
            return NoiseMode.TENSOR
        return NoiseMode.PHILOX if self.seed is not None else NoiseMode.NONE

    def inputs(self) -> list:
        h = tuple(self.hist) + (None, None, None)
        return [
            self.sample,
            self.model_output,
            self.coef,
            self.noise,
            self.seed,
            self.offset,
            self.guidance,
            self.thresh,
            self.mscale,
            self.var,
            h[0],
            h[1],
            h[2],
            self.last,
        ]

    @classmethod
    def from_inputs(cls, inputs: Sequence, prev, x0, corr, clip_range: float, var_mode: int) -> StepParams:
        x, m, coef, noise, seed, offset, guidance, thresh, mscale, var, h1, h2, h3, last = inputs
        hist = tuple(h for h in (h1, h2, h3) if h is not None)
        return cls(
            x,
            m,
            coef,
            prev,
            x0,
            noise,
            seed,
            offset,
            guidance,
            thresh,
            mscale,
            var,
            hist,
            last,
            corr,
            clip_range,
            var_mode,
        )

    def dtypes(self) -> tuple:
        """(sample dtype, value-input dtypes, output dtypes): what :func:`select` routes on."""
        ins = [t.dtype for t in (self.model_output, self.noise, self.var, *self.hist, self.last) if t is not None]
        outs = [t.dtype for t in (self.prev, self.x0, self.corr) if t is not None]
        return self.sample.dtype, ins, outs


def _inner_contiguous(t: Tensor) -> bool:
    expected = 1
    for size, stride in zip(reversed(t.shape[1:]), reversed(t.stride()[1:])):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def as_rows(t: Optional[Tensor]) -> Optional[Tensor]:
    """``t`` addressable as (batch, per-sample elements) with a batch stride, copied only when a sample's own
    elements are not contiguous (the kernels read each sample as one run of memory)."""
    if t is None or t.is_contiguous() or _inner_contiguous(t):
        return t
    return t.contiguous()


@functools.cache
def _eager():
    """The torch evaluation module (imported once: a function-level import costs ~1 us per call)."""
    from .kernels import eager

    return eager


def _run_fused_step(p: StepParams, backend: str) -> None:
    if p.sample.numel() == 0:
        return
    if backend == "torch":  # any strides
        return _eager().fused_step(p)
    for name, out in (("prev", p.prev), ("x0", p.x0), ("corr", p.corr)):
        if out is not None and not out.is_contiguous() and not _inner_contiguous(out):
            raise ValueError(f"`{name}` output must have contiguous samples, got strides {out.stride()}")
    p = dataclasses.replace(
        p,
        sample=as_rows(p.sample),
        model_output=as_rows(p.model_output),
        noise=as_rows(p.noise),
        var=as_rows(p.var),
        hist=tuple(as_rows(h) for h in p.hist),
        last=as_rows(p.last),
    )
    if backend == "triton":
        from .kernels import step

        return step.launch(p)
    if backend == "cuda":
        return torch.ops.fastdiff.fused_step_cuda(
            p.inputs(), p.prev, p.x0, p.corr, float(p.clip_range), int(p.var_mode)
        )
    raise ValueError(f"fastdiff::fused_step runs backend 'cuda', 'triton' or 'torch', got {backend!r}")


@torch.library.custom_op("fastdiff::fused_step", mutates_args=("prev", "x0", "corr"))
def fused_step_op(
    inputs: Sequence[Optional[Tensor]],
    prev: Optional[Tensor],
    x0: Optional[Tensor],
    corr: Optional[Tensor],
    clip_range: float,
    var_mode: int,
    backend: str,
) -> None:
    """One generic scheduler step: ``inputs`` in ``StepParams.INPUTS`` order; writes ``prev``, ``x0`` and
    ``corr``, each when given."""
    _run_fused_step(StepParams.from_inputs(inputs, prev, x0, corr, clip_range, var_mode), backend)


@fused_step_op.register_fake
def _(inputs, prev, x0, corr, clip_range, var_mode, backend):
    return None


def fused_step(p: StepParams, backend: str) -> None:
    """Run one fused step on ``backend`` (an answer of :func:`select`), writing ``p.prev`` / ``p.x0``."""
    if torch.compiler.is_compiling():
        fused_step_op(p.inputs(), p.prev, p.x0, p.corr, float(p.clip_range), int(p.var_mode), backend)
    else:
        _run_fused_step(p, backend)


def plain_lane(values, noise: bool, clip_range: float, write_x0: bool, out_dtype, x0_dtype):
    """For a scheduler whose plain CPU step :func:`select` sent to "torch": the torch evaluation of that row and
    call shape as one callable, ``lane(x, m, z) -> (prev, x0)`` (``kernels.eager.Lane``), which the scheduler
    keeps and calls for the same step again instead of building ``StepParams`` and calling :func:`fused_step`."""
    return _eager().Lane(values, noise, clip_range, write_x0, out_dtype, x0_dtype)


# ---------------------------------------------------------------------------------------------- add noise


def _run_add_noise(sample, noise, table, index, seed, offset, out, stream: int, backend: str) -> None:
    if sample.numel() == 0:
        return
    if backend == "torch":
        return _eager().add_noise(sample, noise, table, index, seed, offset, out, stream)
    sample, noise = as_rows(sample), as_rows(noise)
    if backend == "triton":
        from .kernels import add_noise as add_noise_kernels

        return add_noise_kernels.launch(sample, noise, out, table, index, seed, offset, stream)
    if backend == "cuda":
        return torch.ops.fastdiff.add_noise_cuda(sample, noise, table, index, seed, offset, out, int(stream))
    raise ValueError(f"fastdiff::add_noise runs backend 'cuda', 'triton' or 'torch', got {backend!r}")


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
    _run_add_noise(sample, noise, table, index, seed, offset, out, stream, backend)


@add_noise_op.register_fake
def _(sample, noise, table, index, seed, offset, out, stream, backend):
    return None


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
) -> Tensor:
    """Forward noising on ``backend`` (an answer of :func:`select`): a new tensor like ``sample``.
    table: (n, 2) float32 rows (P, Q); index: 1 or B int64 indices into it."""
    out = torch.empty(sample.shape, dtype=sample.dtype, device=sample.device)
    index = index.reshape(-1)
    if index.dtype != torch.int64 or not index.is_contiguous():  # every implementation reads int64 at stride 1
        index = index.to(torch.int64).contiguous()
    if torch.compiler.is_compiling():
        add_noise_op(sample, noise, table, index, seed, offset, out, int(stream), backend)
    else:
        _run_add_noise(sample, noise, table, index, seed, offset, out, int(stream), backend)
    return out
