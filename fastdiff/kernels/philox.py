"""In-kernel Philox4x32-10 normals, following the convention documented in ``fastdiff.noise``."""

import triton
import triton.language as tl

_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)
_INV_2_24 = tl.constexpr(5.9604644775390625e-08)  # 2^-24: 24-bit uniforms are exact in float32
_TWO_PI = tl.constexpr(6.283185307179586)
_PI = tl.constexpr(3.141592653589793)


@triton.jit
def _box_muller(a, b):
    u1 = ((a >> 8) + 1).to(tl.float32) * _INV_2_24
    u2 = (b >> 8).to(tl.float32) * _INV_2_24
    r = tl.sqrt(-2.0 * tl.log(u1))
    theta = u2 * _TWO_PI - _PI
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def philox_normal(seed, offset, group, STREAM: tl.constexpr, BLOCK: tl.constexpr):
    """Normals for BLOCK consecutive elements whose Philox counters are the 1-d uint32 ``group``
    (BLOCK // 4 of them): element 4g + k takes normal k of counter g.

    seed: int64 scalar (this sample's seed); offset: int64 scalar (step offset). Returns (BLOCK,) float32.
    The Philox rounds run on the 1-d counters, once per four elements; only the final interleave
    touches the (BLOCK,) layout.
    """
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    c0 = group
    c1 = offset.to(tl.uint32) + tl.zeros_like(group)
    c2 = tl.full(group.shape, STREAM, tl.uint32)
    c3 = (offset >> 32).to(tl.uint32) + tl.zeros_like(group)
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, _M0)
        lo0 = c0 * _M0
        hi1 = tl.umulhi(c2, _M1)
        lo1 = c2 * _M1
        c0 = hi1 ^ c1 ^ k0
        c1 = lo1
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + _W0
        k1 = k1 + _W1
    n0, n1 = _box_muller(c0, c1)
    n2, n3 = _box_muller(c2, c3)
    # join(join(n0, n2), join(n1, n3))[g, i, k] is n(2i + k): flattening row-major gives n0 n1 n2 n3
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [BLOCK])
