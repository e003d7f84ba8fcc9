"""Fused forward noising: out = P[i_b] * x + Q[i_b] * z, one launch, with (P, Q) gathered in-kernel
from a small per-index table ((sqrt(abar_t), sqrt(1 - abar_t)) for DDPM/DDIM, (1, sigma) for Euler,
(alpha_t, sigma_t) for DPM-Solver++) and z either read or drawn with Philox."""

import triton
import triton.language as tl

from ..coefs import NoiseMode
from .cast import to_output
from .philox import philox_normal

_NOISE_TENSOR = tl.constexpr(int(NoiseMode.TENSOR))

BLOCK = 4096  # as the fused step's (kernels/step.py): same access pattern, one tensor fewer
NUM_WARPS = 16


@triton.jit
def add_noise_kernel(
    x_ptr,
    z_ptr,
    out_ptr,
    tab_ptr,
    idx_ptr,
    seed_ptr,
    off_ptr,
    N,
    n_index,
    x_sb,
    z_sb,
    out_sb,
    idx_sb,
    NOISE: tl.constexpr,
    STREAM: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    j = pid * BLOCK + tl.arange(0, BLOCK)
    mask = j < N

    i = tl.load(idx_ptr + b * idx_sb).to(tl.int64)
    valid = (i >= 0) & (i < n_index)
    i = tl.where(valid, i, 0)  # never read out of bounds; an invalid index yields NaN below
    p = tl.load(tab_ptr + 2 * i)
    q = tl.load(tab_ptr + 2 * i + 1)
    p = tl.where(valid, p, float("nan"))

    x = tl.load(x_ptr + b * x_sb + j, mask=mask, other=0.0).to(tl.float32)
    if NOISE == _NOISE_TENSOR:
        z = tl.load(z_ptr + b * z_sb + j, mask=mask, other=0.0).to(tl.float32)
    else:
        seed = tl.load(seed_ptr + b)
        offset = tl.load(off_ptr)
        group = (pid * (BLOCK // 4) + tl.arange(0, BLOCK // 4)).to(tl.uint32)
        z = philox_normal(seed, offset, group, STREAM, BLOCK)
    out = p * x + q * z
    tl.store(out_ptr + b * out_sb + j, to_output(out, out_ptr.dtype.element_ty), mask=mask)


def launch(x, z, out, table, index, seed, offset, stream: int) -> None:
    """Launch on tensors whose samples are each contiguous; ``index`` int64 with 1 or B entries."""
    batch = x.shape[0]
    numel = x.numel() // batch
    dummy = table
    grid = (triton.cdiv(numel, BLOCK), batch)
    add_noise_kernel[grid](
        x,
        z if z is not None else dummy,
        out,
        table,
        index,
        seed if seed is not None else dummy,
        offset if offset is not None else dummy,
        numel,
        table.shape[0],
        x.stride(0),
        z.stride(0) if z is not None else 0,
        out.stride(0),
        1 if index.numel() > 1 else 0,
        NOISE=int(NoiseMode.TENSOR if z is not None else NoiseMode.PHILOX),
        STREAM=stream,
        BLOCK=BLOCK,
        num_warps=NUM_WARPS,
    )
