"""Random numbers: diffusers-compatible draws from a torch.Generator, and counter-based Philox.

Philox convention (shared by the Triton kernels, the CUDA extension and :func:`philox_normal`):
Philox4x32-10 (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") with

* key     = (seed & 0xffffffff, seed >> 32), one int64 seed per sample of the batch;
* counter = (g, offset & 0xffffffff, stream, offset >> 32), where g = j // 4 for the element j of
  the sample (flattened, row-major) and offset is the step offset;
* the four 32-bit outputs o0..o3 become four normals by Box-Muller on the pairs (o0, o1) and
  (o2, o3): u1 = ((o >> 8) + 1) * 2^-24 in (0, 1], u2 = (o >> 8) * 2^-24 in [0, 1),
  r = sqrt(-2 ln u1), theta = 2*pi*u2 - pi, giving r*cos(theta) and r*sin(theta);
  element j takes normal number j % 4.

So a sample's noise depends only on its own seed, the offset and the stream, never on its batch
neighbours, and the same seed gives the same noise on every backend up to float rounding of
log/cos/sin.
"""

from __future__ import annotations

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF
TWO_PI = 6.283185307179586
PI = 3.141592653589793


def _mulhilo(a: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit halves of a * m for a in [0, 2^32) held in int64, without int64 overflow."""
    a_lo = a & 0xFFFF
    a_hi = a >> 16
    p_lo = a_lo * m  # < 2^48
    p_hi = a_hi * m  # < 2^48
    hi = (p_hi + (p_lo >> 16)) >> 16
    lo = (p_lo + ((p_hi & 0xFFFF) << 16)) & MASK32
    return hi, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values (broadcasting). Returns four int64 tensors."""
    for _ in range(rounds):
        hi0, lo0 = _mulhilo(c0, PHILOX_M0)
        hi1, lo1 = _mulhilo(c2, PHILOX_M1)
        c0, c1, c2, c3 = (hi1 ^ c1 ^ k0), lo1, (hi0 ^ c3 ^ k1), lo0
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _box_muller(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = ((a >> 8) + 1).to(torch.float32) * (2.0**-24)
    u2 = (b >> 8).to(torch.float32) * (2.0**-24)
    r = torch.sqrt(-2.0 * torch.log(u1))
    theta = u2 * TWO_PI - PI
    return r * torch.cos(theta), r * torch.sin(theta)


def philox_normal(seeds: torch.Tensor, numel: int, offset: int | torch.Tensor = 0, stream: int = 0) -> torch.Tensor:
    """Standard normals of shape (len(seeds), numel), float32, per the module's Philox convention.

    seeds: int64 tensor (B,), one seed per sample; offset: step offset (int or int64 tensor of 1
    element); stream: stream id (see ``fastdiff.coefs.STREAM_*``). Computed on ``seeds.device``.
    """
    if seeds.ndim != 1 or seeds.dtype != torch.int64:
        raise ValueError(f"`seeds` must be a 1-d int64 tensor, got {seeds.dtype} of shape {tuple(seeds.shape)}")
    device = seeds.device
    groups = (numel + 3) // 4
    g = torch.arange(groups, device=device, dtype=torch.int64)[None, :]
    off = offset if isinstance(offset, torch.Tensor) else torch.full((), offset, dtype=torch.int64, device=device)
    off = off.to(device=device, dtype=torch.int64).reshape(())
    s = seeds[:, None]
    k0, k1 = s & MASK32, (s >> 32) & MASK32
    zero = torch.zeros((), dtype=torch.int64, device=device)
    o0, o1, o2, o3 = philox4x32(g, (off & MASK32) + zero, zero + stream, (off >> 32) & MASK32, k0, k1)
    n0, n1 = _box_muller(o0, o1)
    n2, n3 = _box_muller(o2, o3)
    out = torch.stack([n0, n1, n2, n3], dim=-1).reshape(len(seeds), groups * 4)
    return out[:, :numel]


def as_seed_tensor(seed, batch: int, device) -> torch.Tensor:
    """Per-sample int64 seeds: an int gives (seed, seed + 1, ..., seed + batch - 1); a sequence or tensor
    gives one seed per sample."""
    if isinstance(seed, torch.Tensor):
        s = seed.to(device=device, dtype=torch.int64).reshape(-1)
    elif isinstance(seed, (list, tuple)):
        s = torch.tensor(list(seed), dtype=torch.int64, device=device)
    elif isinstance(seed, int) and not isinstance(seed, bool):
        s = torch.arange(seed, seed + batch, dtype=torch.int64, device=device)
    else:
        raise TypeError(f"`seed` must be an int, a list of ints or an int64 tensor, got {type(seed).__name__}")
    if s.numel() != batch:
        raise ValueError(f"`seed` must give one seed per sample: batch is {batch}, got {s.numel()} seeds")
    return s


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """Draw like ``diffusers.utils.torch_utils.randn_tensor``: same shape, dtype, device and generator use.

    A CPU generator with a CUDA target draws on the CPU and copies; a list of generators draws one
    sample per generator and concatenates.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    rand_device = device
    if generator is not None:
        gen_type = generator[0].device.type if isinstance(generator, list) else generator.device.type
        if gen_type != device.type and gen_type == "cpu":
            rand_device = torch.device("cpu")
        elif gen_type != device.type:
            raise ValueError(f"Cannot generate a {device} tensor from a generator of type {gen_type}.")
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    shape = tuple(shape)
    if isinstance(generator, list):
        if len(generator) != shape[0]:
            raise ValueError(f"`generator` list has {len(generator)} generators for a batch of {shape[0]}")
        parts = [torch.randn((1,) + shape[1:], generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(parts, dim=0).to(device)
    return torch.randn(shape, generator=generator, device=rand_device, dtype=dtype).to(device)
