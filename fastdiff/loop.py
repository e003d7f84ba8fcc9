"""The pieces of the sampling loop that ``sample()`` (eager) and ``GraphSampler`` (captured) share: the
model adapters, argument checks, starting noise and the loop body.

One loop body, :func:`denoise`, serves both: the eager path runs it directly, the graph path runs it
once under CUDA-graph capture and replays it. It walks ``scheduler.timesteps`` the way a hand-written
diffusers loop does (scale_model_input, model, guidance, step), so with a ``generator`` it draws
exactly what that loop draws. Imports go one way: loop <- graph <- sampling.
"""

from __future__ import annotations

import inspect
import math
import numbers
import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import torch

from . import coefs, ops
from .noise import as_seed_tensor, philox_normal, randn_tensor
from .schedulers import SCHEDULERS
from .schedulers._base import SchedulerBase

# ---------------------------------------------------------------------------------------------- model adapters


@dataclass(frozen=True)
class Adapter:
    """How the loop calls one family of denoisers.

    ``call(model, x, t, kwargs)`` returns the model output, a tensor shaped like ``x`` (the model input: the
    latents, doubled under guidance), for ``t`` a 0-d device timestep from ``scheduler.timesteps``; no host
    reads, so a CUDA graph can capture it. ``ndim``: the rank of the latents the model takes (None: any);
    ``channel_dim``: where ``model.config.in_channels`` is (None: not checked); ``required``: conditioning the
    model cannot run without; ``shared``: conditioning without a batch dimension (Flux's ``txt_ids`` and
    ``img_ids``), given once to the doubled batch instead of being concatenated."""

    name: str
    call: Callable
    ndim: Optional[int] = None
    channel_dim: Optional[int] = None
    required: tuple = ()
    shared: tuple = ()


def _unwrap(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"`model` returned {type(out).__name__}; expected a tensor, a diffusers output with `.sample`, or a tuple"
    )


def _call_positional(model, x, t, kwargs):
    """UNets and any callable: ``model(x, t, **kwargs)``, t the scheduler's 0-d timestep as is."""
    return _unwrap(model(x, t, **kwargs))


def _call_sd3(model, x, t, kwargs):
    """SD3Transformer2DModel: ``timestep`` is t (sigma * 1000) expanded to the batch, as SD3's pipeline does."""
    x = x.to(model_dtype(model, x.dtype))
    return _unwrap(model(hidden_states=x, timestep=t.expand(x.shape[0]), return_dict=False, **kwargs))


def _call_flux(model, x, t, kwargs):
    """FluxTransformer2DModel on packed latents (B, sequence, channels): ``timestep`` is t / 1000 in the latents'
    dtype (Flux's pipeline); a number ``guidance`` (guidance-distilled models) becomes a float32 (B,) tensor."""
    x = x.to(model_dtype(model, x.dtype))
    guidance = kwargs.get("guidance")
    if guidance is not None and not isinstance(guidance, torch.Tensor):
        # a fill, not a host-to-device copy: capturable, and the number is part of the graph's key
        kwargs = {**kwargs, "guidance": torch.full((x.shape[0],), float(guidance), device=x.device)}
    timestep = t.expand(x.shape[0]).to(x.dtype) / 1000
    return _unwrap(model(hidden_states=x, timestep=timestep, return_dict=False, **kwargs))


def _call_wan(model, x, t, kwargs):
    """WanTransformer3DModel on 5-D latents (B, C, F, H, W), cast to the model's dtype as Wan's pipeline does
    (its latents stay float32); ``timestep`` is t expanded to the batch."""
    x = x.to(model_dtype(model, x.dtype))
    return _unwrap(model(hidden_states=x, timestep=t.expand(x.shape[0]), return_dict=False, **kwargs))


ADAPTERS = {
    "unet": Adapter("unet", _call_positional),
    "sd3": Adapter("sd3", _call_sd3, ndim=4, channel_dim=1, required=("encoder_hidden_states", "pooled_projections")),
    "flux": Adapter(
        "flux",
        _call_flux,
        ndim=3,
        channel_dim=2,
        required=("encoder_hidden_states", "pooled_projections", "txt_ids", "img_ids"),
        shared=("txt_ids", "img_ids"),
    ),
    "wan": Adapter("wan", _call_wan, ndim=5, channel_dim=1, required=("encoder_hidden_states",)),
}
# diffusers' class names (a subclass counts): their forward takes `hidden_states` first and `timestep` by name
_FAMILIES = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux", "WanTransformer3DModel": "wan"}
_TIMESTEP_NAMES = ("t", "ts", "timestep", "timesteps", "time", "sigma", "sigmas", "noise_level")


def adapter_for(model, adapter=None) -> Adapter:
    """The adapter for ``model``: ``adapter`` when given (a name in ``ADAPTERS`` or an ``Adapter``), else chosen
    from the model's class (also under ``torch.compile``): SD3, Flux and Wan transformers by name, anything
    else called as ``model(x, t, **kwargs)``. A diffusers model whose forward does not take the timestep second
    (another transformer family) raises here, before any work."""
    if isinstance(adapter, Adapter):
        return adapter
    if adapter is not None and adapter != "auto":
        if adapter not in ADAPTERS:
            raise ValueError(f"`adapter` must be 'auto', one of {sorted(ADAPTERS)} or an Adapter, got {adapter!r}")
        return ADAPTERS[adapter]
    if not callable(model):
        raise TypeError(f"`model` must be callable as model(x, t, **kwargs), got {type(model).__name__}")
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    for cls in type(inner).__mro__:
        if cls.__name__ in _FAMILIES:
            return ADAPTERS[_FAMILIES[cls.__name__]]
    second = _second_parameter(inner)
    if type(inner).__module__.startswith("diffusers.") and second is not None and second not in _TIMESTEP_NAMES:
        raise TypeError(
            f"fastdiff cannot adapt `model` ({type(inner).__name__}): its forward takes `{second}` second, not the "
            f"timestep; fastdiff calls UNet-style models as model(x, t, **kwargs) and has adapters for "
            f"{sorted(_FAMILIES)}. Wrap it in a callable model(x, t, **kwargs) that calls it."
        )
    return ADAPTERS["unet"]


def _second_parameter(model) -> Optional[str]:
    fn = model.forward if isinstance(model, torch.nn.Module) else model
    try:
        params = [
            p
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return None
    return params[1].name if len(params) > 1 else None


def check_model_call(adapter: Adapter, model, shape: tuple, kwargs: dict) -> None:
    """Check, before any work, that ``adapter`` can call ``model`` on latents of ``shape`` with conditioning
    ``kwargs`` (the rank and channels the model takes, the conditioning it needs); raises saying what differs."""
    config = getattr(getattr(model, "_orig_mod", model), "config", None)
    name = type(getattr(model, "_orig_mod", model)).__name__
    if adapter.ndim is not None and len(shape) != adapter.ndim:
        layout = {3: "(batch, sequence, channels), packed", 4: "(batch, channels, height, width)"}.get(
            adapter.ndim, "(batch, channels, frames, height, width)"
        )
        raise ValueError(f"{name} takes {adapter.ndim}-D latents {layout}; got `shape` {tuple(shape)}")
    channels = getattr(config, "in_channels", None)
    if adapter.channel_dim is not None and isinstance(channels, int) and shape[adapter.channel_dim] != channels:
        raise ValueError(
            f"{name} has in_channels={channels}; got latents of shape {tuple(shape)} with {shape[adapter.channel_dim]} "
            f"in dimension {adapter.channel_dim}"
        )
    missing = [k for k in adapter.required if kwargs.get(k) is None]
    if missing:
        raise ValueError(f"{name} needs `model_kwargs` {missing}; got keys {sorted(kwargs)}")
    if adapter.name == "flux":
        embeds = bool(getattr(config, "guidance_embeds", False))
        if embeds != (kwargs.get("guidance") is not None):
            raise ValueError(
                f"{name} has guidance_embeds={embeds}: "
                + (
                    "pass `model_kwargs['guidance']` (the distilled guidance scale, a number or a (batch,) tensor)"
                    if embeds
                    else "it takes no `guidance` (use true CFG: `guidance_scale` with `uncond_kwargs`)"
                )
            )


def call_model(model, x: torch.Tensor, t: torch.Tensor, kwargs: dict, adapter: Optional[Adapter] = None):
    """The model output for input ``x`` at timestep ``t`` (a tensor like ``x``), through ``adapter`` (the
    UNet-style ``model(x, t, **kwargs)`` by default)."""
    return (adapter or ADAPTERS["unet"]).call(model, x, t, kwargs)


def doubled_kwargs(uncond_kwargs: dict, model_kwargs: dict, batch: int, shared: tuple = ()) -> dict:
    """The model kwargs for one call on the (unconditional, conditional) doubled batch: tensors whose
    first dimension is the batch are concatenated (unconditional first), also inside nested dicts, lists
    and tuples (SDXL's ``added_cond_kwargs``); other values must agree. Top-level keys in ``shared`` (an
    adapter's conditioning without a batch dimension, e.g. Flux's ``txt_ids``) are given once: the
    conditional value, which ``uncond_kwargs`` may omit or must equal."""
    if shared:
        unc = {k: v for k, v in uncond_kwargs.items() if k not in shared}
        cond = {k: v for k, v in model_kwargs.items() if k not in shared}
        out = _doubled(unc, cond, batch, "")
        for k in shared:
            if k in model_kwargs:
                out[k] = _shared_value(k, uncond_kwargs.get(k, model_kwargs[k]), model_kwargs[k])
            elif k in uncond_kwargs:
                raise ValueError(f"`uncond_kwargs[{k!r}]` is given but `model_kwargs[{k!r}]` is not")
        return out
    return _doubled(uncond_kwargs, model_kwargs, batch, "")


def _shared_value(key: str, unc, cond):
    """One value for both halves of the doubled batch; the check reads the device once per call, outside the
    loop (Flux's pipeline gives both halves the same ids: zeros for the text, the latent grid for the image)."""
    tensors = isinstance(unc, torch.Tensor) + isinstance(cond, torch.Tensor)
    if tensors == 2:
        same = unc is cond or (unc.shape == cond.shape and bool(torch.equal(unc, cond.to(unc.device))))
    else:
        same = tensors == 0 and unc == cond
    if not same:
        shapes = [tuple(v.shape) if isinstance(v, torch.Tensor) else repr(v) for v in (unc, cond)]
        raise ValueError(
            f"`uncond_kwargs[{key!r}]` {shapes[0]} differs from `model_kwargs[{key!r}]` {shapes[1]}; this "
            "conditioning has no batch dimension, so the doubled batch takes one value for both halves"
        )
    return cond


def _doubled(unc, cond, batch: int, path: str):
    names = f"`model_kwargs{path}` and `uncond_kwargs{path}`"
    if isinstance(cond, torch.Tensor) or isinstance(unc, torch.Tensor):
        if not (isinstance(cond, torch.Tensor) and isinstance(unc, torch.Tensor)):
            raise TypeError(f"{names} must both be tensors or neither")
        for name, v in ((f"model_kwargs{path}", cond), (f"uncond_kwargs{path}", unc)):
            if v.ndim == 0 or v.shape[0] != batch:
                raise ValueError(f"`{name}` has shape {tuple(v.shape)}; expected a leading batch dimension of {batch}")
        return torch.cat([unc, cond])
    if isinstance(cond, dict) and isinstance(unc, dict):
        if set(unc) != set(cond):
            raise ValueError(
                f"`uncond_kwargs{path}` keys {sorted(unc)} must match `model_kwargs{path}` keys {sorted(cond)}"
            )
        return {k: _doubled(unc[k], v, batch, f"{path}[{k!r}]") for k, v in cond.items()}
    if isinstance(cond, (list, tuple)) and type(unc) is type(cond) and len(unc) == len(cond):
        return type(cond)(_doubled(u, c, batch, f"{path}[{i}]") for i, (u, c) in enumerate(zip(unc, cond)))
    if type(unc) is not type(cond) or unc != cond:
        raise ValueError(f"non-tensor {names} differ: {unc!r} vs {cond!r}")
    return cond


def model_dtype(model, default=torch.float32) -> torch.dtype:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            if p.is_floating_point():
                return p.dtype
    return getattr(model, "dtype", default) if isinstance(getattr(model, "dtype", None), torch.dtype) else default


def model_device(model, default="cpu") -> torch.device:
    if isinstance(model, torch.nn.Module):
        for p in model.parameters():
            return p.device
    return torch.device(getattr(model, "device", default))


def as_fastdiff_scheduler(scheduler, backend: Optional[str] = None):
    """A fastdiff scheduler for ``scheduler``: itself, or the fastdiff class of the same name built from a
    diffusers scheduler's config."""
    if isinstance(scheduler, SchedulerBase):
        if backend is not None:
            scheduler.backend = backend
        return scheduler
    name = type(scheduler).__name__
    cls = SCHEDULERS.get(name)
    if cls is None or not hasattr(scheduler, "config"):
        raise TypeError(
            f"`scheduler` must be a fastdiff scheduler or a diffusers scheduler fastdiff mirrors, got {name}"
        )
    return cls.from_config(scheduler.config, backend=backend)


def set_schedule(scheduler, num_inference_steps, device, schedule_kwargs: Optional[dict] = None) -> None:
    """``scheduler.set_timesteps`` as diffusers' ``retrieve_timesteps`` calls it: with custom ``sigmas`` or
    ``timesteps`` in ``schedule_kwargs`` the step count comes from them, else ``num_inference_steps``; the other
    ``schedule_kwargs`` (Flux's and SD3's ``mu``) go along."""
    kwargs = dict(schedule_kwargs or {})
    if kwargs.get("sigmas") is not None or kwargs.get("timesteps") is not None:
        scheduler.set_timesteps(device=device, **kwargs)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)


def schedule_key(schedule_kwargs: Optional[dict]) -> tuple:
    """``schedule_kwargs`` as a hashable key (custom sigmas as a tuple of floats): part of a graph's key."""
    return tuple(
        sorted(
            (
                k,
                tuple(torch.as_tensor(v).reshape(-1).tolist())
                if isinstance(v, (list, tuple)) or hasattr(v, "shape")
                else v,
            )
            for k, v in (schedule_kwargs or {}).items()
        )
    )


def initial_noise(shape, dtype, device, generator=None, seeds: Optional[torch.Tensor] = None, backend=None):
    """Starting noise: drawn like diffusers' ``randn_tensor`` from ``generator``, or Philox normals
    (stream LATENTS, offset 0) from per-sample ``seeds``, one launch on the fast backends. ``backend``: the
    request (a scheduler's ``backend``), resolved by ``ops.select``."""
    if seeds is None:
        return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    batch = shape[0]
    numel = int(torch.Size(shape[1:]).numel())
    backend = ops.select(backend, device, dtype, [], [dtype])
    if backend == "reference":
        return philox_normal(seeds, numel, 0, coefs.STREAM_LATENTS).to(dtype).reshape(shape)
    # add_noise with the table row (0, 1) returns the noise itself; fills, not copies, so this is capturable
    table = torch.zeros(1, 2, device=device)
    table[:, 1] = 1.0
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    flat = torch.zeros((batch, numel), device=device, dtype=dtype)  # 0 * x must not meet NaN garbage
    return ops.add_noise(
        flat, table, zero, backend=backend, seed=seeds, offset=zero, stream=coefs.STREAM_LATENTS
    ).reshape(shape)


def denoise(
    model,
    scheduler,
    latents: torch.Tensor,
    *,
    guidance_scale=None,
    guidance_rescale: float = 0.0,
    cond_kwargs: Optional[dict] = None,
    generator=None,
    noise_seed: Optional[torch.Tensor] = None,
    step_kwargs: Optional[dict] = None,
    progress=None,
    callback: Optional[Callable] = None,
    check_output: bool = True,
    adapter: Optional[Adapter] = None,
    nonfinite: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The loop body shared by ``sample`` and ``GraphSampler``: every step of ``scheduler.timesteps``.

    ``cond_kwargs`` are the model kwargs for the call (already doubled under guidance); ``noise_seed`` a
    device int64 tensor of per-sample seeds (Philox), or None to draw from ``generator`` like diffusers;
    ``adapter`` how the model is called (:func:`adapter_for`; the UNet-style call by default).
    ``nonfinite``: a :func:`nonfinite_counts` buffer that each step fills on the device (``check_finite``).
    """
    cond_kwargs = cond_kwargs or {}
    step_kwargs = step_kwargs or {}
    guided = guidance_scale is not None
    if hasattr(scheduler, "set_begin_index"):
        # the loop starts at the first step; finding it by value would take the second of repeated timesteps
        # (diffusers' rule for schedules cut in the middle), which runs past the end when karras sigmas round
        # several steps to one timestep
        scheduler.set_begin_index(0)
    kw = dict(step_kwargs)
    if guided:
        kw.update(guidance_scale=guidance_scale, guidance_rescale=guidance_rescale)
    if noise_seed is not None:
        kw["noise_seed"] = noise_seed
    else:
        kw["generator"] = generator
    for i, t in enumerate(scheduler.timesteps):
        model_in = torch.cat([latents, latents]) if guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        out = call_model(model, model_in, t, cond_kwargs, adapter)
        if check_output and i == 0:
            _check_model_output(out, model_in, scheduler)
        latents = scheduler.step(out, t, latents, **kw).prev_sample
        if nonfinite is not None:
            nonfinite[i] = torch.stack(
                [out.isnan().sum(), out.isinf().sum(), latents.isnan().sum(), latents.isinf().sum()]
            )
        if callback is not None:
            callback(i, t, latents)
        if progress is not None:
            progress.update(1)
    return latents


def nonfinite_counts(steps: int, device) -> torch.Tensor:
    """The ``check_finite`` buffer: (steps, 4) int64 on the device, per step the NaN and inf counts of the model
    output and of the step's result, written by device ops (no host sync in the loop; capturable)."""
    return torch.zeros((steps, 4), dtype=torch.int64, device=device)


def raise_if_nonfinite(counts: torch.Tensor, scheduler) -> None:
    """After the loop, one host read of ``counts``: a FloatingPointError naming the first step whose model output
    or result holds NaN or inf (every later step inherits them)."""
    host = counts.cpu()
    bad = (host.sum(dim=1) > 0).nonzero().flatten().tolist()
    if not bad:
        return
    i = bad[0]
    m_nan, m_inf, x_nan, x_inf = host[i].tolist()
    where = f"step {i} of {len(host)} (timestep {scheduler.timesteps[i].item():g})"
    if m_nan or m_inf:
        what = f"the model output holds {m_nan} NaN and {m_inf} inf values, from a finite input"
    else:
        what = (
            f"the step's result holds {x_nan} NaN and {x_inf} inf values, from a finite model output: the "
            f"{type(scheduler).__name__} update overflowed or divided by zero there"
        )
    raise FloatingPointError(f"check_finite: {where}: {what}")


def check_finite_latents(latents: torch.Tensor) -> None:
    """``check_finite`` on the caller's starting noise (one host read, before the loop)."""
    bad = (~torch.isfinite(latents)).sum().item()
    if bad:
        raise ValueError(
            f"`latents` holds {bad} NaN or inf values of {latents.numel()}; expected finite starting noise"
        )


def _check_model_output(out: torch.Tensor, model_in: torch.Tensor, scheduler) -> None:
    expected = tuple(model_in.shape)
    learned = scheduler.config.get("variance_type") in ("learned", "learned_range")
    ok = tuple(out.shape) == expected or (
        learned
        and out.ndim == model_in.ndim
        and out.shape[1] == 2 * model_in.shape[1]
        and tuple(out.shape[2:]) == expected[2:]
        and out.shape[0] == expected[0]
    )
    if not ok:
        raise ValueError(
            f"`model` returned shape {tuple(out.shape)} for an input of shape {expected}; expected the same shape"
        )


# Sample shapes the loop takes: batch first, 3 to 5 dimensions. A scheduler step is elementwise per sample,
# so the layout of the rest is the model's business; 2-D (B, features) and 6-D+ shapes are no diffusion
# model's latents and are refused rather than guessed at.
SHAPE_DIMS = (3, 5)
SHAPES_EXPECTED = (
    "3 to 5 dimensions, batch first: (B, C, L) signals or packed transformer latents (B, tokens, C), "
    "(B, C, H, W) images or latents, (B, C, F, H, W) video"
)
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_shape(shape, name: str = "shape") -> tuple:
    """``shape`` as a tuple of ints, or a ValueError/TypeError naming ``name``, the value and what is expected."""
    sizes_are_ints = isinstance(shape, (tuple, list, torch.Size)) and all(
        hasattr(type(s), "__index__") and not isinstance(s, bool) for s in shape
    )
    if not sizes_are_ints:
        raise TypeError(f"`{name}` must be a tuple of ints ({SHAPES_EXPECTED}), got {shape!r}")
    dims = tuple(operator.index(s) for s in shape)
    lo, hi = SHAPE_DIMS
    if not lo <= len(dims) <= hi or any(s < 1 for s in dims):
        raise ValueError(f"`{name}` must have {SHAPES_EXPECTED}, every size positive; got {dims}")
    return dims


def check_dtype(dtype, name: str = "dtype") -> torch.dtype:
    if not isinstance(dtype, torch.dtype) or dtype not in DTYPES:
        shown = dtype if isinstance(dtype, torch.dtype) else f"{type(dtype).__name__} {dtype!r}"
        raise TypeError(f"`{name}` must be one of {', '.join(map(str, DTYPES))}, got {shown}")
    return dtype


def check_device(device, name: str = "device") -> torch.device:
    """``device`` as a torch.device that this process can allocate on (a CUDA device needs a CUDA torch and a
    visible GPU), or a ValueError saying why not."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"`{name}`={device!r} is not a device: {exc}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            f"`{name}` is {dev}, but this torch sees no CUDA GPU (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'})"
        )
    try:
        torch.empty(0, device=dev)
    except (RuntimeError, AssertionError) as exc:
        raise ValueError(f"`{name}` is {dev}, which this process cannot use: {exc}") from None
    return dev


def check_steps(num_inference_steps, name: str = "num_inference_steps") -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {num_inference_steps!r}")
    return num_inference_steps


def check_guidance(guidance_scale, guidance_rescale) -> None:
    if guidance_scale is not None and not _finite_number(guidance_scale):
        raise ValueError(f"`guidance_scale` must be a finite number (or None: no guidance), got {guidance_scale!r}")
    if not _finite_number(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise ValueError(f"`guidance_rescale` must be a number in [0, 1], got {guidance_rescale!r}")


def _finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


# the step arguments the loop passes itself
_LOOP_STEP_ARGS = ("model_output", "timestep", "sample", "generator", "noise_seed", "return_dict", "guidance_scale")


def check_step_kwargs(step_kwargs, scheduler) -> dict:
    """``step_kwargs`` as a dict of the scheduler's own ``step`` options (DDIM's ``eta``, Euler's ``s_churn``)."""
    if step_kwargs is None:
        return {}
    if not isinstance(step_kwargs, dict):
        raise TypeError(f"`step_kwargs` must be a dict of {type(scheduler).__name__}.step options, got {step_kwargs!r}")
    params = inspect.signature(scheduler.step).parameters
    options = [k for k in params if k not in _LOOP_STEP_ARGS + ("guidance_rescale", "variance_noise")]
    unknown = sorted(k for k in step_kwargs if k not in options)
    if unknown:
        raise ValueError(
            f"`step_kwargs` has {unknown}, which {type(scheduler).__name__}.step does not take from the loop; "
            f"expected some of {options}"
        )
    return dict(step_kwargs)


def check_model_kwargs(value, name: str) -> None:
    if value is not None and not isinstance(value, dict):
        raise TypeError(f"`{name}` must be a dict of keyword arguments for the model, got {type(value).__name__}")


def _check_generator(generator) -> None:
    gens = generator if isinstance(generator, list) else [generator]
    if generator is not None and not all(isinstance(g, torch.Generator) for g in gens):
        raise TypeError(f"`generator` must be a torch.Generator or a list of them, got {generator!r}")


def prepare(
    model,
    scheduler,
    *,
    shape=None,
    latents=None,
    num_inference_steps: int,
    guidance_scale=None,
    model_kwargs=None,
    uncond_kwargs=None,
    generator=None,
    seed=None,
    dtype=None,
    device=None,
    backend=None,
    adapter=None,
    guidance_rescale: float = 0.0,
    step_kwargs: Optional[dict] = None,
) -> dict[str, Any]:
    """Validate ``sample``/``GraphSampler`` arguments; returns the pieces both need (``adapter``: how the model
    is called, see :func:`adapter_for`)."""
    if (shape is None) == (latents is None):
        raise ValueError("pass exactly one of `shape` (noise is drawn) or `latents` (the starting noise)")
    if generator is not None and seed is not None:
        raise ValueError("pass either `generator` (torch draws, like diffusers) or `seed` (Philox), not both")
    if guidance_scale is not None:
        if model_kwargs is None:
            raise ValueError("`guidance_scale` needs `model_kwargs` (the conditional inputs) and `uncond_kwargs`")
        if uncond_kwargs is None:
            raise ValueError(
                "`guidance_scale` needs `uncond_kwargs` (the unconditional inputs), e.g. empty-prompt "
                "embeddings or a null class label"
            )
    elif uncond_kwargs is not None:
        raise ValueError("`uncond_kwargs` is only used with `guidance_scale`")
    if not callable(model):
        raise TypeError(f"`model` must be callable as model(x, t, **kwargs), got {type(model).__name__}")
    adapter = adapter_for(model, adapter)
    check_steps(num_inference_steps)
    check_guidance(guidance_scale, guidance_rescale)
    check_model_kwargs(model_kwargs, "model_kwargs")
    check_model_kwargs(uncond_kwargs, "uncond_kwargs")
    _check_generator(generator)
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            shown = f"a {latents.dtype} tensor" if isinstance(latents, torch.Tensor) else type(latents).__name__
            raise TypeError(f"`latents` must be a floating-point tensor (the starting noise), got {shown}")
        shape = check_shape(tuple(latents.shape), "latents")
        device = latents.device if device is None else check_device(device)
        dtype = latents.dtype if dtype is None else dtype
    else:
        shape = check_shape(shape)
        device = model_device(model) if device is None else check_device(device)
        dtype = model_dtype(model) if dtype is None else dtype
    check_dtype(dtype)
    sched = as_fastdiff_scheduler(scheduler, backend)
    step_kwargs = check_step_kwargs(step_kwargs, sched)
    batch = shape[0]
    model_kwargs = dict(model_kwargs or {})
    check_model_call(adapter, model, shape, model_kwargs)
    call_kwargs = (
        doubled_kwargs(dict(uncond_kwargs), model_kwargs, batch, adapter.shared)
        if guidance_scale is not None
        else model_kwargs
    )
    seeds = as_seed_tensor(seed, batch, device) if seed is not None else None
    return dict(
        scheduler=sched,
        shape=shape,
        device=device,
        dtype=dtype,
        call_kwargs=call_kwargs,
        seeds=seeds,
        adapter=adapter,
        step_kwargs=step_kwargs,
    )
