"""The custom ops themselves: schema and fake implementations, poisoned outputs, edge cases."""

import pytest
import torch
from conftest import DEVICES, available_backends

from fastdiff import coefs, ops

FAST_CASES = [(d, b) for d in DEVICES for b in available_backends(d)]


def _step(backend, x, m, row, out_dtype=torch.float32, write_x0=True, **kwargs):
    """Run one fused step into poisoned outputs; returns (prev, x0)."""
    prev = torch.full(x.shape, float("nan"), dtype=out_dtype, device=x.device)
    x0 = torch.full(x.shape, float("nan"), dtype=out_dtype, device=x.device) if write_x0 else None
    ops.fused_step(ops.StepParams(x, m, row, prev=prev, x0=x0, **kwargs), backend)
    return prev, x0


def _row(device, **values):
    row = torch.zeros(coefs.NCOEF, device=device)
    for k, v in values.items():
        row[getattr(coefs, k)] = v
    return row


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (2, 4, 97), (1, 3, 33, 65)])
def test_fused_step_writes_every_element(device, backend, dtype, shape):
    x = torch.randn(shape, device=device).to(dtype)
    m = torch.randn(shape, device=device).to(dtype)
    z = torch.randn(shape, device=device).to(dtype)
    row = _row(device, X_S=0.5, A_X=1.0, A_M=-0.3, E_S=1.0, E_M=1.0, C_0=0.7, C_E=0.2, C_X=0.1, SIGMA=0.05)
    prev = torch.full(shape, float("nan"), device=device, dtype=dtype)
    x0 = torch.full(shape, float("nan"), device=device, dtype=dtype)
    p = ops.StepParams(x, m, row, prev=prev, x0=x0, noise=z, clip_range=1.0)
    ops.fused_step_op(p.inputs(), prev, x0, None, 1.0, 0, backend)
    xf, mf, zf = x.float(), m.float(), z.float()
    x0_ref = (0.5 * (xf - 0.3 * mf)).clamp(-1, 1)
    prev_ref = 0.7 * x0_ref + 0.2 * mf + 0.1 * xf + 0.05 * zf
    assert not prev.isnan().any() and not x0.isnan().any(), "every element must be written"
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(prev.float(), prev_ref.to(dtype).float(), **tol)
    torch.testing.assert_close(x0.float(), x0_ref.to(dtype).float(), **tol)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_bfloat16_outputs_round_to_nearest_even(device, backend):
    """float32 results stored as bfloat16 are rounded as ``torch.Tensor.to`` rounds them (to nearest, ties to
    even), bit for bit: ties to an even and to an odd last bit, and values just either side of a tie. Triton's
    interpreter truncates that cast (and garbles subnormals); kernels/cast.py rounds on the bits there."""
    hi = torch.arange(1 << 16, dtype=torch.int32) << 16
    hi = hi[(hi >> 23) & 0xFF != 0xFF]  # finite (0 * inf is NaN in the row's unused terms)
    if device != "cpu":
        hi = hi[(hi >> 23) & 0xFF != 0]  # a GPU may flush subnormals
    x = torch.cat([hi | 0x8000, hi | 0x7FFF, hi | 0x8001, hi | 0x18000]).view(torch.float32)
    x = x[torch.isfinite(x)].reshape(1, -1).to(device)
    row = _row(device, X_S=1.0, A_M=1.0, C_X=1.0)  # x0 = m, prev = x
    prev, x0 = _step(backend, x, x.flip(-1), row, out_dtype=torch.bfloat16)
    expected = x.to(torch.bfloat16)
    for name, got, want in (("prev_sample", prev, expected), ("x0", x0, expected.flip(-1))):
        wrong = (got != want).nonzero()
        assert wrong.numel() == 0, (
            f"[{backend}] {name}: {wrong.shape[0]} values rounded otherwise, e.g. "
            f"{x.flatten()[wrong[:3, -1]].tolist()} -> {got.flatten()[wrong[:3, -1]].tolist()}, "
            f"not {want.flatten()[wrong[:3, -1]].tolist()}"
        )


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_fused_step_history_and_learned_variance(device, backend):
    shape = (2, 3, 41)
    x, m, h1, h2, v, z = (torch.randn(shape, device=device) for _ in range(6))
    row = _row(
        device,
        X_S=1.0,
        A_X=0.9,
        A_M=-0.4,
        E_S=2.0,
        E_X=0.5,
        E_0=-0.25,
        C_0=0.6,
        C_E=0.3,
        C_X=0.2,
        H_1=-0.15,
        H_2=0.05,
        SIGMA=0.5,
        LV_A=0.7,
        LV_B=-1.2,
        K_PRE=0.1,
    )
    prev, x0 = _step(backend, x, m, row, noise=z, var=v, var_mode=coefs.VarMode.LEARNED_RANGE, hist=(h1, h2))
    xh = x + 0.1 * z
    x0_ref = 0.9 * xh - 0.4 * m
    eps = 2.0 * (0.5 * xh - 0.25 * x0_ref)
    std = 0.5 * torch.exp(0.5 * (0.7 * v - 1.2))
    prev_ref = 0.6 * x0_ref + 0.3 * eps + 0.2 * xh - 0.15 * h1 + 0.05 * h2 + std * z
    torch.testing.assert_close(prev, prev_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, x0_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("nhist", [0, 1, 3])
def test_fused_step_corrector_and_third_history(device, backend, nhist):
    """The corrector row (UniPC's corrector, PNDM's warm-up): xc from the previous starting sample and the
    history replaces xh in the update, and is written out; a third history term."""
    shape = (2, 3, 37)
    x, m, last, z = (torch.randn(shape, device=device) for _ in range(4))
    hist = tuple(torch.randn(shape, device=device) for _ in range(nhist))
    row = _row(
        device,
        X_S=1.0,
        A_X=0.3,
        A_M=0.8,
        E_S=1.0,
        E_M=1.0,
        C_0=0.5,
        C_E=0.1,
        C_X=0.7,
        H_1=0.2,
        H_2=-0.3,
        H_3=0.05,
        L_L=0.9,
        L_0=-0.4,
        L_1=0.25,
        L_2=0.15,
        L_3=-0.1,
        SIGMA=0.3,
    )
    corr = torch.full(shape, float("nan"), device=device)
    prev, x0 = _step(backend, x, m, row, hist=hist, last=last, corr=corr, noise=z)
    x0_ref = 0.3 * x + 0.8 * m
    xc_ref = 0.9 * last - 0.4 * x0_ref
    prev_ref = 0.5 * x0_ref + 0.1 * m + 0.7 * xc_ref
    for w_l, w_h, h in zip((0.25, 0.15, -0.1), (0.2, -0.3, 0.05), hist):
        xc_ref = xc_ref + w_l * h
        prev_ref = prev_ref + 0.7 * w_l * h + w_h * h
    prev_ref = prev_ref + 0.3 * z
    torch.testing.assert_close(corr, xc_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(prev, prev_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x0, x0_ref, rtol=1e-5, atol=1e-5)
    # without `last`, corr is the (noised) input sample and C_X multiplies it
    corr2 = torch.full(shape, float("nan"), device=device)
    _step(backend, x, m, row, corr=corr2)
    torch.testing.assert_close(corr2, x)


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_add_noise_out_of_range_index_gives_nan_not_garbage(device, backend):
    x = torch.randn(3, 10, device=device)
    table = torch.tensor([[0.5, 0.5], [1.0, 0.0]], device=device)
    idx = torch.tensor([0, 7, -1], device=device)
    out = ops.add_noise(x, table, idx, backend=backend, noise=torch.randn_like(x))
    assert not out[0].isnan().any()
    assert out[1:].isnan().all()


@pytest.mark.parametrize("device,backend", FAST_CASES)
@pytest.mark.parametrize("form", ["int32", "strided", "int64"])
def test_add_noise_index_dtype_and_strides(device, backend, form):
    x = torch.randn(3, 10, device=device)
    z = torch.randn_like(x)
    table = torch.rand(5, 2, device=device)
    want = torch.tensor([4, 0, 2], device=device)
    idx = {
        "int32": want.to(torch.int32),
        "strided": torch.tensor([4, 1, 0, 1, 2, 1], device=device)[::2],
        "int64": want,
    }[form]
    out = ops.add_noise(x, table, idx, backend=backend, noise=z)
    expected = table[want, 0, None] * x + table[want, 1, None] * z
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


def test_cuda_extension_coverage():
    """Dtype mixes the CUDA extension runs exactly as Triton; the rest are routed to Triton by ops.select."""
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    covers = ops.cuda_ext_covers
    assert covers(f16, [f16], [f16, f16])
    assert covers(bf16, [bf16], [f32])
    assert covers(f32, [f32], [bf16, bf16])
    assert not covers(f16, [f16], [f16, f32])  # Euler: low-precision prev, float32 x0
    assert not covers(f16, [f32], [f16])  # a float32 model output would be rounded to fp16
    assert not covers(f16, [f16], [bf16])  # no fp16 -> bf16 kernel
    assert not covers(torch.float64, [torch.float64], [torch.float64])


def test_select_routes_and_explains(monkeypatch):
    """ops.select is the one decision: auto order, dtype routing away from the extension, clear errors."""
    from fastdiff import _backend

    f32, f16 = torch.float32, torch.float16
    cuda = torch.device("cuda")
    monkeypatch.setattr(_backend, "cuda_ext_unavailable", lambda device: None)
    monkeypatch.setattr(_backend, "triton_unavailable", lambda device: None)
    ops._select.cache_clear()
    assert ops.select("auto", cuda, f16, [f16], [f16]) == "cuda"
    assert ops.select("cuda", cuda, f16, [f16], [f16, f32]) == "triton"  # Euler's fp16 prev, fp32 x0
    assert ops.select("cuda", cuda, f16, [f32], [f16]) == "triton"  # a float32 model output
    assert ops.select("triton", cuda, f16, [f32], [f16, f32]) == "triton"
    monkeypatch.setattr(_backend, "triton_unavailable", lambda device: "no triton here")
    ops._select.cache_clear()
    with pytest.raises(RuntimeError, match="does not run this dtype mix.*no triton here"):
        ops.select("cuda", cuda, f16, [f16], [f16, f32])
    assert ops.select("auto", cuda, f16, [f16], [f16]) == "cuda"
    monkeypatch.setattr(_backend, "cuda_ext_unavailable", lambda device: "not built")
    ops._select.cache_clear()
    assert ops.select("auto", cuda, f16) == "torch"
    with pytest.raises(RuntimeError, match=r"backend 'cuda' \(argument\) cannot run: not built"):
        ops.select("cuda", cuda, f16)
    with pytest.raises(ValueError, match=r"`backend` \(argument\) must be one of"):
        ops.select("fast", cuda)
    monkeypatch.setenv("FASTDIFF_BACKEND", "bogus")
    with pytest.raises(ValueError, match=r"`backend` \(FASTDIFF_BACKEND\) must be one of"):
        ops.select(None, cuda)
    ops._select.cache_clear()


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_empty_batch(device, backend):
    x = torch.randn(0, 3, 4, device=device)
    prev, x0 = _step(backend, x, x, _row(device))
    assert prev.shape == x.shape and x0.shape == x.shape


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_opcheck(device, backend):
    x = torch.randn(2, 3, 8, device=device)
    m = torch.randn(4, 3, 8, device=device)
    row = _row(device, X_S=1.0, A_X=1.0, A_M=-0.5, C_0=1.0, E_S=1.0)
    g = torch.tensor([3.0], device=device)
    p = ops.StepParams(x, m, row, guidance=g)
    args = (p.inputs(), torch.empty_like(x), torch.empty_like(x), torch.empty_like(x), 0.0, 0, backend)
    torch.library.opcheck(
        torch.ops.fastdiff.fused_step.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )
    table = torch.rand(10, 2, device=device)
    idx = torch.tensor([1, 9], device=device)
    args = (x, torch.randn_like(x), table, idx, None, None, torch.empty_like(x), 2, backend)
    torch.library.opcheck(
        torch.ops.fastdiff.add_noise.default,
        args,
        test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
    )


@pytest.mark.parametrize("device,backend", FAST_CASES)
def test_torch_compile_sees_through_the_op(device, backend):
    row = _row(device, X_S=1.0, A_X=1.0, A_M=-0.5, C_0=0.8, C_X=0.1, E_S=1.0)

    def f(x, m):
        prev = torch.empty_like(x)
        ops.fused_step(ops.StepParams(x, m, row, prev=prev), backend)
        return prev * 2

    x, m = torch.randn(2, 5, device=device), torch.randn(2, 5, device=device)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, m), f(x, m))
