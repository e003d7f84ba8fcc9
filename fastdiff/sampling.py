"""``sample()``: the whole sampling loop in one call, eager (no host sync inside) or, on CUDA, replayed as a
CUDA graph by a cached ``GraphSampler``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Optional

import torch

from . import ops
from .graph import GraphSampler
from .loop import (
    check_finite_latents,
    denoise,
    initial_noise,
    nonfinite_counts,
    prepare,
    raise_if_nonfinite,
    schedule_key,
    set_schedule,
)
from .progress import progress as progress_display

_SAMPLERS: dict = {}
_MAX_SAMPLERS = 4


def _cached_sampler(
    model,
    scheduler,
    shape,
    dtype,
    steps,
    guidance_scale,
    guidance_rescale,
    step_kwargs,
    adapter,
    schedule_kwargs,
    check_finite,
):
    """GraphSamplers behind ``sample(graph=...)``, reused across calls for the same model, scheduler config
    and loop options (a capture costs about two eager loops). Each keeps its model alive; the oldest of more
    than four is released, and ``release_cached_samplers()`` frees them all."""
    key = (
        id(model),
        type(scheduler).__name__,
        tuple(sorted((k, repr(v)) for k, v in scheduler.config.items())),
        scheduler.backend,
        guidance_scale is not None,
        float(guidance_rescale),
        tuple(sorted((step_kwargs or {}).items())),
        adapter,
        schedule_key(schedule_kwargs),
        check_finite,
    )
    sampler = _SAMPLERS.get(key)
    if sampler is not None:  # its model is alive (the sampler holds it), so id(model) names it
        return sampler
    sampler = GraphSampler(
        model,
        scheduler,
        shape,
        dtype=dtype,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        guidance_rescale=guidance_rescale,
        step_kwargs=step_kwargs,
        fallback="eager",
        adapter=adapter,
        schedule_kwargs=schedule_kwargs,
        check_finite=check_finite,
    )
    if len(_SAMPLERS) >= _MAX_SAMPLERS:
        _SAMPLERS.pop(next(iter(_SAMPLERS))).release()
    _SAMPLERS[key] = sampler
    return sampler


def release_cached_samplers() -> None:
    """Free the CUDA graphs that ``sample()`` keeps for reuse."""
    while _SAMPLERS:
        _SAMPLERS.popitem()[1].release()


@torch.no_grad()
def sample(
    model,
    scheduler,
    *,
    shape=None,
    latents=None,
    num_inference_steps: int = 50,
    guidance_scale=None,
    guidance_rescale: float = 0.0,
    model_kwargs: Optional[dict] = None,
    uncond_kwargs: Optional[dict] = None,
    generator=None,
    seed=None,
    graph="auto",
    progress: bool = True,
    callback: Optional[Callable] = None,
    step_kwargs: Optional[dict] = None,
    dtype: Optional[torch.dtype] = None,
    device=None,
    backend: Optional[str] = None,
    adapter=None,
    schedule_kwargs: Optional[dict] = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """Sample from ``model`` with ``scheduler``; returns the final sample, shaped like ``shape``.

    model: ``model(x, t, **kwargs)`` returning a tensor (diffusers UNets' ``.sample`` is unwrapped); t
    arrives as a device tensor. Either ``shape`` (starting noise drawn from ``generator``, like diffusers'
    ``randn_tensor``, or from Philox with ``seed``: an int gives seeds seed..seed+B-1, or one per sample)
    or ``latents`` (the starting noise, scaled by ``init_noise_sigma``). With ``guidance_scale``, the model
    runs once per step on the doubled batch (``uncond_kwargs`` then ``model_kwargs``) and the guidance
    combine happens inside the fused step. ``graph``: "auto" captures the whole loop as a CUDA graph on
    CUDA (Philox noise from ``seed``; a fresh seed when none is given) and runs eagerly elsewhere, or when a
    ``generator`` or ``callback`` is given (a graph has no per-step Python); True requires the graph; False
    runs eagerly. The graphs are kept for the next call (see ``release_cached_samplers``); a graph run
    shows no per-step progress. ``step_kwargs`` go to every ``scheduler.step`` (e.g. ``eta``);
    ``schedule_kwargs`` to ``scheduler.set_timesteps`` (custom ``sigmas``, Flux's ``mu``).

    ``adapter`` says how the model is called ("auto" or None: from its class, see ``fastdiff.loop.adapter_for``):
    diffusers' ``SD3Transformer2DModel`` (latents (B, C, H, W), ``model_kwargs`` ``encoder_hidden_states`` and
    ``pooled_projections``), ``FluxTransformer2DModel`` (packed latents (B, sequence, C), ``txt_ids`` and
    ``img_ids`` without a batch dimension, ``guidance`` for guidance-distilled models) and
    ``WanTransformer3DModel`` (latents (B, C, F, H, W)) get their timestep by name, expanded to the batch;
    anything else is called as ``model(x, t, **kwargs)``.

    ``shape``/``latents``: 3 to 5 dimensions, batch first ((B, C, L) or packed (B, tokens, C), (B, C, H, W),
    (B, C, F, H, W)); ``dtype``: float32, float16, bfloat16 or float64 (default: the model's). Every argument is
    checked before the first model call; an error names the argument, the value and what was expected.
    ``check_finite``: count NaN/inf in every step's model output and result on the device, and raise
    ``FloatingPointError`` after the loop naming the first step that went non-finite (one host read).
    """
    p = prepare(
        model,
        scheduler,
        shape=shape,
        latents=latents,
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        model_kwargs=model_kwargs,
        uncond_kwargs=uncond_kwargs,
        generator=generator,
        seed=seed,
        dtype=dtype,
        device=device,
        backend=backend,
        guidance_rescale=guidance_rescale,
        step_kwargs=step_kwargs,
        adapter=adapter,
    )
    step_kwargs = p["step_kwargs"]
    if graph not in ("auto", True, False):
        raise ValueError(f"`graph` must be 'auto', True or False, got {graph!r}")
    if callback is not None and not callable(callback):
        raise TypeError(f"`callback` must be callable as callback(i, t, latents), got {type(callback).__name__}")
    if check_finite not in (True, False):
        raise TypeError(f"`check_finite` must be True or False, got {check_finite!r}")
    if check_finite and latents is not None:
        check_finite_latents(latents)
    use_graph = graph is True or (
        graph == "auto" and p["device"].type == "cuda" and generator is None and callback is None
    )
    if use_graph:
        if p["device"].type != "cuda":
            raise ValueError(f"`graph=True` needs CUDA tensors; the model runs on {p['device']}")
        if generator is not None:
            raise ValueError("`graph=True` draws noise with Philox: pass `seed` instead of `generator`")
        if callback is not None:
            raise ValueError("`graph=True` replays the whole loop at once: a per-step `callback` needs graph=False")
        if seed is None:  # a fresh seed per call, from torch's global (CPU) generator: no device sync
            seed = int(torch.randint(0, 2**62, (1,)).item())
        sampler = _cached_sampler(
            model,
            p["scheduler"],
            p["shape"],
            p["dtype"],
            num_inference_steps,
            guidance_scale,
            guidance_rescale,
            step_kwargs,
            p["adapter"],
            schedule_kwargs,
            check_finite,
        )
        return sampler(
            latents=latents,
            seed=seed,
            model_kwargs=model_kwargs,
            uncond_kwargs=uncond_kwargs,
            guidance_scale=guidance_scale,
            shape=p["shape"],
            dtype=p["dtype"],
            num_inference_steps=num_inference_steps,
        )
    sched = p["scheduler"]
    set_schedule(sched, num_inference_steps, p["device"], schedule_kwargs)
    backend_now = ops.select(sched.backend, p["device"], p["dtype"])
    if latents is None:
        latents = initial_noise(p["shape"], p["dtype"], p["device"], generator, p["seeds"], sched.backend)
    else:
        latents = latents.to(dtype=p["dtype"])
    latents = latents * sched.init_noise_sigma
    counts = nonfinite_counts(len(sched.timesteps), p["device"]) if check_finite else None
    bar = progress_display(len(sched.timesteps), desc=f"fastdiff [{backend_now}]", unit="step", enabled=progress)
    try:
        out = denoise(
            model,
            sched,
            latents,
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
            cond_kwargs=p["call_kwargs"],
            generator=generator,
            noise_seed=p["seeds"],
            step_kwargs=step_kwargs,
            progress=bar,
            callback=callback,
            adapter=p["adapter"],
            nonfinite=counts,
        )
    finally:
        bar.close()
    if counts is not None:
        raise_if_nonfinite(counts, sched)
    return out
