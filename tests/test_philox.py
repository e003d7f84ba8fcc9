"""Philox noise: known-answer vectors, agreement across backends, statistics, independence,
reproducibility and batch invariance."""

import pytest
import torch
from conftest import DEVICES, available_backends

import fastdiff
from fastdiff import coefs, ops
from fastdiff.noise import philox4x32, philox_normal

FAST_CASES = [(d, b) for d in DEVICES for b in available_backends(d)]


def _u32(v):
    return torch.tensor(v, dtype=torch.int64)


def test_philox4x32_known_answers():
    # Random123 known-answer tests for philox4x32-10 (Salmon et al. 2011, kat_vectors)
    out = philox4x32(*[_u32(0)] * 6)
    assert [int(o) for o in out] == [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    out = philox4x32(*[_u32(0xFFFFFFFF)] * 6)
    assert [int(o) for o in out] == [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]


def _kernel_noise(device, backend, seeds, numel, offset, stream):
    """Raw noise out of the fused kernels: add_noise with a (0, 1) table returns z itself; a step row with
    only SIGMA = 1 returns z from the step stream."""
    batch = len(seeds)
    x = torch.randn(batch, numel, device=device)
    off = torch.tensor([offset], dtype=torch.int64, device=device)
    if stream == coefs.STREAM_STEP:
        row = torch.zeros(coefs.NCOEF, device=device)
        row[coefs.SIGMA] = 1.0
        prev = torch.full_like(x, float("nan"))
        ops.fused_step(ops.StepParams(x, torch.randn_like(x), row, prev=prev, seed=seeds, offset=off), backend)
        return prev
    table = torch.tensor([[0.0, 1.0]], device=device)
    idx = torch.zeros(1, dtype=torch.int64, device=device)
    return ops.add_noise(x, table, idx, backend=backend, seed=seeds, offset=off, stream=stream)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("stream", [coefs.STREAM_STEP, coefs.STREAM_LATENTS, coefs.STREAM_ADD_NOISE])
@pytest.mark.parametrize("numel", [1, 7, 1030, 2053])
def test_kernel_noise_matches_torch_philox(device, backend, stream, numel):
    seeds = torch.tensor([0, 12345678901234, -5], dtype=torch.int64, device=device)
    got = _kernel_noise(device, backend, seeds, numel, 17, stream)
    want = philox_normal(seeds, numel, 17, stream)
    # log/cos/sin differ by a few ulps between the kernel's math and torch's
    torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-5)


def test_philox_statistics():
    scipy_stats = pytest.importorskip("scipy.stats")
    z = philox_normal(torch.arange(8, dtype=torch.int64), 50_000, 3).flatten().double()
    n = z.numel()
    assert abs(z.mean().item()) < 4 / n**0.5
    assert abs(z.var().item() - 1) < 4 * (2 / n) ** 0.5
    assert abs(scipy_stats.skew(z.numpy())) < 4 * (6 / n) ** 0.5
    assert abs(scipy_stats.kurtosis(z.numpy())) < 4 * (24 / n) ** 0.5
    assert scipy_stats.kstest(z.numpy(), "norm").pvalue > 1e-3
    # tails: P(|z| > 3) = 0.0027
    assert abs((z.abs() > 3).double().mean().item() - 0.0027) < 4 * (0.0027 / n) ** 0.5


def _corr(a, b):
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm())).item()


def test_philox_streams_are_uncorrelated():
    n = 40_000
    bound = 5 / n**0.5
    base = philox_normal(torch.tensor([42]), n, 0, 0)
    others = {
        "next step": philox_normal(torch.tensor([42]), n, 1, 0),
        "other seed": philox_normal(torch.tensor([43]), n, 0, 0),
        "other stream": philox_normal(torch.tensor([42]), n, 0, 1),
        "high offset word": philox_normal(torch.tensor([42]), n, 1 << 32, 0),
        "high seed word": philox_normal(torch.tensor([42 + (1 << 32)]), n, 0, 0),
        "shifted by one element": torch.roll(base, 1, dims=1),
    }
    for name, other in others.items():
        assert abs(_corr(base, other)) < bound, f"{name}: correlation {_corr(base, other):.4f}"
    # lanes of one Philox call and neighbouring groups
    four = base[0, : n - n % 4].reshape(-1, 4)
    for i in range(4):
        for j in range(i + 1, 4):
            assert abs(_corr(four[:, i], four[:, j])) < 5 / four.shape[0] ** 0.5


@pytest.mark.parametrize("device,backend", FAST_CASES + [(d, "reference") for d in DEVICES])
def test_step_philox_reproducible_and_batch_invariant(device, backend):
    sched = fastdiff.DDPMScheduler(backend=backend)
    sched.set_timesteps(10)
    t = sched.timesteps[2]
    x = torch.randn(3, 2, 6, 7, device=device)
    m = torch.randn_like(x)
    a = sched.step(m, t, x, noise_seed=[11, 22, 33]).prev_sample
    b = sched.step(m, t, x, noise_seed=[11, 22, 33]).prev_sample
    assert torch.equal(a, b), "same seeds must reproduce bit for bit"
    alone = sched.step(m[1:2], t, x[1:2], noise_seed=[22]).prev_sample
    assert torch.equal(alone[0], a[1]), "a sample's noise must not depend on its batch neighbours"
    swapped = sched.step(m.flip(0), t, x.flip(0), noise_seed=[33, 22, 11]).prev_sample
    assert torch.equal(swapped.flip(0), a)
    c = sched.step(m, t, x, noise_seed=[12, 22, 33]).prev_sample
    assert not torch.equal(c[0], a[0]) and torch.equal(c[1:], a[1:])
    # the step offset changes the noise: the same inputs at another timestep draw other noise
    t2 = sched.timesteps[3]
    d1 = sched.step(m, t, x, noise_seed=5).prev_sample - sched.step(m, t, x, noise_seed=6).prev_sample
    d2 = sched.step(m, t2, x, noise_seed=5).prev_sample - sched.step(m, t2, x, noise_seed=6).prev_sample
    assert abs(_corr(d1, d2)) < 0.2


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_fast_philox_step_matches_reference(device, backend):
    for name, kwargs in (("DDPMScheduler", {}), ("DDIMScheduler", dict(eta=0.8))):
        fast = getattr(fastdiff, name)(backend=backend)
        ref = getattr(fastdiff, name)(backend="reference")
        fast.set_timesteps(8)
        ref.set_timesteps(8)
        for t in fast.timesteps[:4]:
            x = torch.randn(2, 3, 5, 9, device=device)
            m = torch.randn_like(x)
            a = fast.step(m, t, x, noise_seed=[4, 9], **kwargs).prev_sample
            b = ref.step(m, t, x, noise_seed=[4, 9], **kwargs).prev_sample
            torch.testing.assert_close(a, b, rtol=1e-5, atol=3e-5)
