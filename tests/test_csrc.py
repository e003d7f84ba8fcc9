"""The CUDA extension: its header agrees with the Python coefficient layout (checked everywhere), and on
a GPU with the extension built, the three backends agree op for op."""

import re
from pathlib import Path

import pytest
import torch
from conftest import available_backends
from helpers import assert_lowp

import fastdiff
from fastdiff import coefs

ROOT = Path(__file__).resolve().parents[1]


def test_header_layout_matches_coefs():
    text = (ROOT / "csrc" / "fastdiff_kernels.h").read_text()
    body = re.search(r"enum Coef : int \{(.*?)\};", text, re.S).group(1)
    values = {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body)}
    for name in coefs.NAMES + ("NCOEF",):
        assert values[name] == getattr(coefs, name), name
    for mode in coefs.VarMode:
        assert re.search(rf"VAR_{mode.name} = {int(mode)}\b", text), mode
    for mode in coefs.NoiseMode:
        assert re.search(rf"NOISE_{mode.name} = {int(mode)}\b", text), mode


def test_header_step_inputs_match_ops():
    """The op's input list (ops.StepParams.INPUTS) is the order binding.cpp reads (enum StepInput)."""
    from fastdiff import ops

    text = (ROOT / "csrc" / "fastdiff_kernels.h").read_text()
    body = re.search(r"enum StepInput : int \{(.*?)\};", text, re.S).group(1)
    values = {k: int(v) for k, v in re.findall(r"IN_(\w+)\s*=\s*(\d+)", body)}
    assert values == {name.upper(): i for i, name in enumerate(ops.StepParams.INPUTS)}
    assert re.search(rf"N_STEP_INPUTS = {len(ops.StepParams.INPUTS)}\b", body)


needs_ext = pytest.mark.skipif(
    not torch.cuda.is_available() or "cuda" not in available_backends("cuda"),
    reason="needs a CUDA GPU and the built extension (pip install --no-build-isolation -e .)",
)

CONFIGS = [
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", dict(variance_type="learned_range", prediction_type="v_prediction"), {}),
    ("DDPMScheduler", dict(thresholding=True, sample_max_value=1.5), {}),
    ("DDIMScheduler", dict(prediction_type="sample"), dict(eta=0.7, use_clipped_model_output=True)),
    ("DDIMScheduler", dict(clip_sample=False), dict(eta=0.0)),
]


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,config,kwargs", CONFIGS)
@pytest.mark.parametrize("guided", [False, True])
@pytest.mark.parametrize("hw", [(9, 13), (16, 16)])  # odd rows (scalar path) and 16-byte aligned rows (vector path)
def test_three_backends_agree(name, config, kwargs, dtype, guided, hw):
    if guided and "learned" in config.get("variance_type", ""):
        pytest.skip("guidance does not combine with a learned variance (an error, tested elsewhere)")
    scheds = {b: getattr(fastdiff, name)(**config, backend=b) for b in ("reference", "triton", "cuda")}
    ref32 = getattr(fastdiff, name)(**config, backend="reference")
    for s in (*scheds.values(), ref32):
        s.set_timesteps(6, device="cuda")
    channels = 3
    learned = "learned" in config.get("variance_type", "")
    for t_i in range(6):
        x = torch.randn(2, channels, *hw, device="cuda").to(dtype)
        m = torch.randn(4 if guided else 2, channels * (2 if learned else 1), *hw, device="cuda").to(dtype)
        if learned:
            m[:, channels:] = torch.rand_like(m[:, channels:]) * 2 - 1
        extra = dict(guidance_scale=3.0) if guided else {}
        outs = {b: s.step(m, s.timesteps[t_i], x, noise_seed=[7, 8], **kwargs, **extra) for b, s in scheds.items()}
        assert scheds["cuda"].last_backend == "cuda", "the extension itself must run, not the Triton fallback"
        # triton and cuda compute the same float32 expression: they agree to float32 rounding, or to one
        # rounding of the low-precision output
        close = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(outs["cuda"].prev_sample, outs["triton"].prev_sample, **close)
        torch.testing.assert_close(outs["cuda"].pred_original_sample, outs["triton"].pred_original_sample, **close)
        if dtype == torch.float32:
            torch.testing.assert_close(outs["cuda"].prev_sample, outs["reference"].prev_sample, rtol=1e-5, atol=1e-5)
        else:  # the reference rounds after every op at low precision: hold cuda to twice its error vs float32
            want = ref32.step(m.float(), ref32.timesteps[t_i], x.float(), noise_seed=[7, 8], **kwargs, **extra)
            assert_lowp(outs["cuda"].prev_sample, outs["reference"].prev_sample, want.prev_sample, f"{name} t{t_i}")


@needs_ext
@pytest.mark.parametrize("stream", [coefs.STREAM_STEP, coefs.STREAM_LATENTS, coefs.STREAM_ADD_NOISE])
def test_philox_cuda_equals_triton(stream):
    from test_philox import _kernel_noise

    seeds = torch.tensor([1, 2, 1 << 40, -3], dtype=torch.int64, device="cuda")
    a = _kernel_noise("cuda", "cuda", seeds, 4099, 5, stream)
    b = _kernel_noise("cuda", "triton", seeds, 4099, 5, stream)
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-5)
