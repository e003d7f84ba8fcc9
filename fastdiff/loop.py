"""The pieces of the sampling loop that ``sample()`` (eager) and ``GraphSampler`` (captured) share: the
model adapters, argument checks, starting noise and the loop body.

One loop body, :func:`denoise`, serves both: the eager path runs it directly, the graph path runs it
once under CUDA-graph capture and replays it. It walks ``scheduler.timesteps`` the way a hand-written
diffusers loop does (scale_model_input, model, guidance, step), so with a ``generator`` it draws
exactly what that loop draws. Imports go one way: loop <- graph <- sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import torch

from . import coefs, ops
from .noise import as_seed_tensor, philox_normal, randn_tensor
from .schedulers import SCHEDULERS
from .schedulers._base import SchedulerBase


def call_model(model, x: torch.Tensor, t: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Run ``model(x, t, **kwargs)`` and return a tensor: a diffusers UNet's ``.sample`` or a tuple's first
    element is unwrapped."""
    out = model(x, t, **kwargs)
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"`model` returned {type(out).__name__}; expected a tensor, a diffusers output with `.sample`, or a tuple"
    )


def doubled_kwargs(uncond_kwargs: dict, model_kwargs: dict, batch: int) -> dict:
    """The model kwargs for one call on the (unconditional, conditional) doubled batch: tensors whose
    first dimension is the batch are concatenated (unconditional first), also inside nested dicts, lists
    and tuples (SDXL's ``added_cond_kwargs``); other values must agree."""
    return _doubled(uncond_kwargs, model_kwargs, batch, "")


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
) -> torch.Tensor:
    """The loop body shared by ``sample`` and ``GraphSampler``: every step of ``scheduler.timesteps``.

    ``cond_kwargs`` are the model kwargs for the call (already doubled under guidance); ``noise_seed`` a
    device int64 tensor of per-sample seeds (Philox), or None to draw from ``generator`` like diffusers.
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
        out = call_model(model, model_in, t, cond_kwargs)
        if check_output and i == 0:
            _check_model_output(out, model_in, scheduler)
        latents = scheduler.step(out, t, latents, **kw).prev_sample
        if callback is not None:
            callback(i, t, latents)
        if progress is not None:
            progress.update(1)
    return latents


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
) -> dict[str, Any]:
    """Validate ``sample``/``GraphSampler`` arguments; returns the pieces both need."""
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
    if latents is not None:
        if not isinstance(latents, torch.Tensor) or not latents.is_floating_point():
            raise TypeError("`latents` must be a floating-point tensor")
        shape = tuple(latents.shape)
        device = latents.device if device is None else torch.device(device)
        dtype = latents.dtype if dtype is None else dtype
    else:
        shape = tuple(int(s) for s in shape)
        if len(shape) < 2 or any(s < 1 for s in shape):
            raise ValueError(f"`shape` must be (batch, channels, ...) with positive sizes, got {shape}")
        device = model_device(model) if device is None else torch.device(device)
        dtype = model_dtype(model) if dtype is None else dtype
    sched = as_fastdiff_scheduler(scheduler, backend)
    batch = shape[0]
    model_kwargs = dict(model_kwargs or {})
    call_kwargs = (
        doubled_kwargs(dict(uncond_kwargs), model_kwargs, batch) if guidance_scale is not None else model_kwargs
    )
    seeds = as_seed_tensor(seed, batch, device) if seed is not None else None
    return dict(scheduler=sched, shape=shape, device=device, dtype=dtype, call_kwargs=call_kwargs, seeds=seeds)
