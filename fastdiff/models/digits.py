"""The embedded default model: a small class-conditional UNet denoiser for 16x16 digits.

The model is trained (``scripts/train_digits.py``) on scikit-learn's 8x8 ``load_digits`` images,
scaled to ``[-1, 1]`` and upsampled 2x (bilinear) to 16x16, with the standard epsilon-prediction DDPM
loss under :data:`SCHEDULER_CONFIG`. Its weights ship with the package
(``fastdiff/models/digits_unet.safetensors``, fp32), so examples, tests and benchmarks have a real
denoiser that needs no download. See ``MODEL_CARD.md`` beside this file.

A second model, ``digits-flow`` (:func:`load_flow_model`, ``fastdiff/models/digits_flow.safetensors``), is the
same network trained with rectified flow in diffusers' ``FlowMatchEulerDiscreteScheduler`` convention: the sample
is ``x = (1 - sigma) x0 + sigma noise``, the timestep input is ``1000 sigma`` and the output is the velocity
``v = noise - x0``. Sample it with ``FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)``, or UniPC in
flow mode with :data:`FLOW_MODE_OVERRIDES`.

``DigitsUNet.forward`` is written to be captured in a CUDA graph: it has no host synchronisation
(no ``.item()``, ``.cpu()``, ``.nonzero()`` nor Python branching on tensor values); only shapes,
dtypes and ``None``-ness steer Python control flow.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CHANNELS",
    "DEFAULT_CONFIG",
    "IMAGE_SIZE",
    "NULL_CLASS",
    "NUM_CLASSES",
    "SCHEDULER_CONFIG",
    "WEIGHTS_PATH",
    "FLOW_MODEL_CONFIG",
    "FLOW_MODE_OVERRIDES",
    "FLOW_SCHEDULER_CONFIG",
    "FLOW_WEIGHTS_PATH",
    "DigitsUNet",
    "from_unit_range",
    "load_default_model",
    "load_flow_model",
    "to_unit_range",
]

IMAGE_SIZE = 16
CHANNELS = 1
NUM_CLASSES = 10
#: The class label that means "no label" (unconditional); used for classifier-free guidance.
NULL_CLASS = 10

#: The noise schedule the shipped weights were trained with; a valid ``diffusers.DDPMScheduler`` config
#: (``DDPMScheduler(**SCHEDULER_CONFIG)``, ``DDIMScheduler(**SCHEDULER_CONFIG)``).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="squaredcos_cap_v2",
    prediction_type="epsilon",
    clip_sample=True,
)

#: Architecture of the shipped weights (``DigitsUNet(**DEFAULT_CONFIG)``).
DEFAULT_CONFIG = dict(
    base_channels=32,
    channel_mults=(1, 2, 2),
    emb_dim=128,
    num_classes=NUM_CLASSES,
    groups=8,
    attention=False,
)

WEIGHTS_PATH = Path(__file__).parent / "digits_unet.safetensors"

#: Architecture of the flow-matching model ``digits-flow``: :data:`DEFAULT_CONFIG` on 2x2-pixel patches folded into
#: channels (8x8 positions of 4 channels). The training data are bilinear 2x upsamplings of 8x8 digits, so nothing
#: lives below the 2x2 scale, and the patches cut the compute 3.5x (one training step at batch 128 on this project's
#: shared 2-core CPU, load ~12: 2.9 s against 10-13 s), which made 3,000 training steps a matter of hours, not ten.
FLOW_MODEL_CONFIG = dict(DEFAULT_CONFIG, patch=2)

#: The flow model's weights, trained with rectified flow (``scripts/train_digits.py --objective flow``); it predicts
#: the velocity ``v = noise - x0``.
FLOW_WEIGHTS_PATH = Path(__file__).parent / "digits_flow.safetensors"

#: The flow model's sampling schedule: a valid ``FlowMatchEulerDiscreteScheduler`` config
#: (``FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG)``). Shift 1 (evenly spaced sigmas): at 20 steps,
#: shift 1.5 scored 0.933 and 0.5 scored 0.922 against 0.930, within the spread between seeds (``MODEL_CARD.md``).
FLOW_SHIFT = 1.0
FLOW_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=FLOW_SHIFT)

#: What puts a multistep solver in flow mode for the flow model, by scheduler class name (``flow_shift`` is
#: FlowMatchEuler's ``shift``): ``UniPCMultistepScheduler(num_train_timesteps=1000, **FLOW_MODE_OVERRIDES[...])``,
#: the form of Wan's published UniPC config.
FLOW_MODE_OVERRIDES = {
    "UniPCMultistepScheduler": dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=FLOW_SHIFT),
}


def to_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Map model space ``[-1, 1]`` to image space ``[0, 1]``: ``(x + 1) / 2``, clamped to ``[0, 1]``."""
    return ((x + 1) * 0.5).clamp(0, 1)


def from_unit_range(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_unit_range`: map image space ``[0, 1]`` to model space ``[-1, 1]``: ``2x - 1``."""
    return x * 2 - 1


def timestep_embedding(t: torch.Tensor, dim: int, freqs: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of (B,) timesteps: ``[cos(t f), sin(t f)]`` in fp32, shape (B, dim)."""
    args = t.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the (time + class) embedding as a scale and shift in between."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the spatial positions (used at the 4x4 bottleneck only)."""

    def __init__(self, ch: int, groups: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.proj = nn.Conv2d(ch, ch, 1)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hh, ww = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, hh * ww)
        q, k, v = qkv.transpose(-1, -2).unbind(1)  # each (b, heads, hw, c/heads)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(-1, -2).reshape(b, c, hh, ww)
        return x + self.proj(out)


class DigitsUNet(nn.Module):
    """Small UNet (16 -> 8 -> 4) predicting the noise ``eps`` (or, trained with flow matching, the velocity) of
    1-channel 16x16 images.

    ``forward(x, t, class_labels=None)``:

    * ``x``: (B, 1, 16, 16) float tensor (fp32, fp16 or bf16) in model space ``[-1, 1]`` (noised).
    * ``t``: timesteps 0..999, int or float tensor of shape () or (B,) on ``x``'s device (broadcast
      with ``expand``); a Python number also works but costs a host-to-device copy.
    * ``class_labels``: int64 (B,) tensor with digits 0..9, or :data:`NULL_CLASS` (10) for "no label";
      ``None`` means every sample is unconditional.

    Returns ``eps`` with ``x``'s shape and dtype. The network runs in its parameters' dtype (``x`` is
    cast to it and the output cast back), so ``model.to(torch.bfloat16)`` runs in bf16 and an fp32
    model accepts bf16/fp16 inputs. Timestep embeddings are always computed in fp32 first.

    ``patch=2`` (the flow model's :data:`FLOW_MODEL_CONFIG`) folds each 2x2 pixel block into channels
    (``pixel_unshuffle``: (B, 1, 16, 16) -> (B, 4, 8, 8)) before the first convolution and unfolds the output, so
    the UNet runs 8 -> 4 -> 2 at a quarter of the positions; inputs and outputs keep their (B, 1, 16, 16) shape.
    """

    def __init__(
        self,
        base_channels: int = 32,
        channel_mults: tuple = (1, 2, 2),
        emb_dim: int = 128,
        num_classes: int = NUM_CLASSES,
        groups: int = 8,
        attention: bool = True,
        in_channels: int = CHANNELS,
        patch: int = 1,
    ):
        super().__init__()
        self.num_classes = num_classes
        self.null_class = num_classes
        self.in_channels = in_channels
        self.patch = patch
        self.freq_dim = base_channels
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs, persistent=False)

        self.time_mlp = nn.Sequential(
            nn.Linear(self.freq_dim, emb_dim),
            nn.SiLU(),
            nn.Linear(emb_dim, emb_dim),
        )
        # num_classes digits + 1 learned "no label" embedding (index NULL_CLASS).
        self.class_emb = nn.Embedding(num_classes + 1, emb_dim)

        chs = [base_channels * m for m in channel_mults]
        # patch > 1: the network runs on (patch x patch)-pixel blocks folded into channels (pixel_unshuffle)
        self.conv_in = nn.Conv2d(in_channels * patch * patch, chs[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = chs[0]
        for i, ch in enumerate(chs):
            self.down.append(ResBlock(prev, ch, emb_dim, groups))
            prev = ch
            if i < len(chs) - 1:
                self.downsample.append(nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.mid1 = ResBlock(prev, prev, emb_dim, groups)
        self.mid_attn = Attention(prev, groups) if attention else nn.Identity()
        self.mid2 = ResBlock(prev, prev, emb_dim, groups)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i in reversed(range(len(chs))):
            self.up.append(ResBlock(prev + chs[i], chs[i], emb_dim, groups))
            prev = chs[i]
            if i > 0:
                self.upsample.append(nn.Conv2d(chs[i], chs[i], 3, padding=1))
        self.norm_out = nn.GroupNorm(groups, prev)
        self.conv_out = nn.Conv2d(prev, in_channels * patch * patch, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv_in.weight.device

    def forward(
        self,
        x: torch.Tensor,
        t: Union[torch.Tensor, int, float],
        class_labels: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        b = x.shape[0]
        dtype = self.conv_in.weight.dtype
        if not torch.is_tensor(t):
            t = torch.tensor(t, device=x.device)
        # () or (1,) or (B,) -> (B,) without looking at the values; .to() is a no-op (and so capture-safe)
        # when t is already on x's device, as it must be inside a CUDA graph.
        t = t.to(x.device).reshape(-1).expand(b)
        if class_labels is None:
            class_labels = torch.full((b,), self.null_class, dtype=torch.long, device=x.device)
        else:
            class_labels = class_labels.to(x.device).reshape(-1).expand(b).long()

        emb = self.time_mlp(timestep_embedding(t, self.freq_dim, self.freqs).to(dtype))
        emb = F.silu(emb + self.class_emb(class_labels))

        h = self.conv_in(F.pixel_unshuffle(x.to(dtype), self.patch) if self.patch > 1 else x.to(dtype))
        skips = []
        for i, block in enumerate(self.down):
            h = block(h, emb)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = self.mid1(h, emb)
        h = self.mid_attn(h)
        h = self.mid2(h, emb)
        for i, block in enumerate(self.up):
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
            if i < len(self.upsample):
                h = self.upsample[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.conv_out(F.silu(self.norm_out(h)))
        if self.patch > 1:
            h = F.pixel_shuffle(h, self.patch)
        return h.to(x.dtype)


def _load(path: Path, config: dict, device, dtype: torch.dtype) -> DigitsUNet:
    from safetensors.torch import load_file

    model = DigitsUNet(**config)
    model.load_state_dict(load_file(str(path)))
    model.to(device=device if device is not None else "cpu", dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model


def load_default_model(
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
) -> DigitsUNet:
    """The shipped digits denoiser (:data:`DEFAULT_CONFIG`, weights from :data:`WEIGHTS_PATH`), in eval mode.

    ``device`` defaults to the CPU; ``dtype`` is the parameters' dtype (fp32, fp16 or bf16). It predicts
    ``eps`` under :data:`SCHEDULER_CONFIG`.
    """
    return _load(WEIGHTS_PATH, DEFAULT_CONFIG, device, dtype)


def load_flow_model(
    device: Union[str, torch.device, None] = None,
    dtype: torch.dtype = torch.float32,
) -> DigitsUNet:
    """The shipped flow-matching digits model ``digits-flow`` (:data:`FLOW_MODEL_CONFIG`, weights from
    :data:`FLOW_WEIGHTS_PATH`), in eval mode, on ``device`` (default the CPU) in ``dtype`` (fp32, fp16 or bf16).

    ``model(x, 1000 * sigma, class_labels)`` returns the velocity ``v = noise - x0`` for
    ``x = (1 - sigma) x0 + sigma noise``, (B, 1, 16, 16) in ``x``'s dtype; sample it with
    :data:`FLOW_SCHEDULER_CONFIG` / :data:`FLOW_MODE_OVERRIDES`.
    """
    return _load(FLOW_WEIGHTS_PATH, FLOW_MODEL_CONFIG, device, dtype)
