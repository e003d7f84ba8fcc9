"""Run a diffusers pipeline's denoising loop through fastdiff (``sample`` / ``GraphSampler``), keeping the
pipeline's own prompt encoding and VAE decode. Needs diffusers.

    images = fastdiff.integrations.run_pipeline(pipe, batch_size=16, generator=g)          # DDPM/DDIM
    images = fastdiff.integrations.run_pipeline(sd_pipe, prompt="a cat", seed=0)            # SD-style
    images = fastdiff.integrations.run_pipeline(flux_pipe, prompt="a cat", generator=g)     # SD3, Flux, Wan

With a ``generator`` the starting noise is drawn exactly as the pipeline draws it, so outputs match the
pipeline's to rounding; a loop that draws noise every step from that generator (DDPM, DDIM with
eta > 0, Euler ancestral, SDE solvers) then runs eagerly to keep those draws identical. With ``seed``
(or neither) noise is Philox in the kernels and, on CUDA, the whole loop is one CUDA graph.

For ``StableDiffusion3Pipeline``, ``FluxPipeline`` and ``WanPipeline`` the pipeline's own methods encode the
prompt, prepare the latents (Flux's packing and image ids), compute ``mu`` for dynamic shifting and decode; only
the denoising loop is fastdiff's, with guidance as one doubled batch (Flux's and Wan's pipelines call the
transformer twice per step).
"""

from __future__ import annotations

import inspect
import logging
import sys

import torch

from .loop import as_fastdiff_scheduler, initial_noise
from .noise import as_seed_tensor, randn_tensor
from .sampling import sample

logger = logging.getLogger("fastdiff")


def _device(pipe) -> torch.device:
    return getattr(pipe, "_execution_device", None) or next(pipe.unet.parameters()).device


@torch.no_grad()
def run_pipeline(pipe, *args, graph="auto", seed=None, backend=None, **kwargs):
    """Call ``pipe`` with its usual arguments, the denoising loop run by fastdiff. Supports diffusers'
    ``DDPMPipeline`` / ``DDIMPipeline`` (a ``UNet2DModel``) and Stable-Diffusion-style text-to-image
    pipelines (``encode_prompt``, ``vae``, ``image_processor``, a ``UNet2DConditionModel``). Returns what the
    pipeline returns (``ImagePipelineOutput`` / ``StableDiffusionPipelineOutput`` or a tuple).

    Also diffusers' ``StableDiffusion3Pipeline``, ``FluxPipeline`` (dev and schnell; true CFG with
    ``negative_prompt`` and ``true_cfg_scale``) and ``WanPipeline`` (one transformer), with their own
    arguments; an argument of theirs that changes the loop itself (``callback_on_step_end``, IP-adapter images,
    SD3's skip-layer guidance) raises ``TypeError``: call the pipeline with fastdiff's scheduler swapped in."""
    for cls in type(pipe).__mro__:
        run = _TRANSFORMER_PIPELINES.get(cls.__name__)
        if run is not None:
            _check_supported(run, pipe, kwargs)
            return run(pipe, *args, graph=graph, seed=seed, backend=backend, **kwargs)
    if hasattr(pipe, "encode_prompt") and hasattr(pipe, "vae"):
        return _text_to_image(pipe, *args, graph=graph, seed=seed, backend=backend, **kwargs)
    if hasattr(pipe, "unet") and hasattr(pipe, "scheduler"):
        return _unconditional(pipe, *args, graph=graph, seed=seed, backend=backend, **kwargs)
    raise TypeError(f"`pipe` ({type(pipe).__name__}) is neither a DDPM/DDIM-style nor an SD-style pipeline")


def _unconditional(
    pipe,
    batch_size: int = 1,
    generator=None,
    num_inference_steps=None,
    eta: float = 0.0,
    use_clipped_model_output=None,
    output_type: str = "pil",
    return_dict: bool = True,
    *,
    graph="auto",
    seed=None,
    backend=None,
):
    from diffusers.pipelines.pipeline_utils import ImagePipelineOutput

    if num_inference_steps is None:
        num_inference_steps = 1000 if type(pipe).__name__ == "DDPMPipeline" else 50
    unet = pipe.unet
    size = unet.config.sample_size
    shape = (batch_size, unet.config.in_channels, *((size, size) if isinstance(size, int) else size))
    scheduler = as_fastdiff_scheduler(pipe.scheduler, backend)
    device = _device(pipe)
    step_kwargs = {}
    if type(scheduler).__name__ == "DDIMScheduler":
        step_kwargs = dict(eta=eta, use_clipped_model_output=bool(use_clipped_model_output))
    image = _loop(unet, scheduler, shape, unet.dtype, device, generator, seed, graph, num_inference_steps, step_kwargs)
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        image = image.cpu().permute(0, 2, 3, 1).numpy()
        if output_type == "pil":
            image = pipe.numpy_to_pil(image)
    return ImagePipelineOutput(images=image) if return_dict else (image,)


def _loop(model, scheduler, shape, dtype, device, generator, seed, graph, steps, step_kwargs, **guidance):
    """Starting noise like the pipeline (from ``generator``) unless ``seed``; the loop eager when it must draw
    from ``generator`` every step, else through ``sample`` (a CUDA graph on CUDA)."""
    if seed is not None:
        return sample(
            model,
            scheduler,
            shape=shape,
            seed=seed,
            num_inference_steps=steps,
            graph=graph,
            progress=False,
            step_kwargs=step_kwargs,
            dtype=dtype,
            device=device,
            **guidance,
        )
    latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
    if generator is not None and scheduler.draws_noise(step_kwargs):
        return sample(
            model,
            scheduler,
            latents=latents,
            generator=generator,
            num_inference_steps=steps,
            graph=False,
            progress=False,
            step_kwargs=step_kwargs,
            **guidance,
        )
    return sample(
        model,
        scheduler,
        latents=latents,
        num_inference_steps=steps,
        graph=graph,
        progress=False,
        step_kwargs=step_kwargs,
        **guidance,
    )


def _text_to_image(
    pipe,
    prompt=None,
    height=None,
    width=None,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    negative_prompt=None,
    num_images_per_prompt: int = 1,
    eta: float = 0.0,
    generator=None,
    latents=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    output_type: str = "pil",
    return_dict: bool = True,
    guidance_rescale: float = 0.0,
    *,
    graph="auto",
    seed=None,
    backend=None,
):
    from diffusers.pipelines.stable_diffusion.pipeline_output import StableDiffusionPipelineOutput

    unet = pipe.unet
    scale = pipe.vae_scale_factor
    height = height or unet.config.sample_size * scale
    width = width or unet.config.sample_size * scale
    device = _device(pipe)
    do_cfg = guidance_scale > 1 and getattr(unet.config, "time_cond_proj_dim", None) is None
    prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
        prompt,
        device,
        num_images_per_prompt,
        do_cfg,
        negative_prompt,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
    )
    scheduler = as_fastdiff_scheduler(pipe.scheduler, backend)
    shape = (prompt_embeds.shape[0], unet.config.in_channels, int(height) // scale, int(width) // scale)
    step_kwargs = {"eta": eta} if "eta" in inspect.signature(scheduler.step).parameters else {}
    guidance = dict(model_kwargs={"encoder_hidden_states": prompt_embeds})
    if do_cfg:
        guidance = dict(
            guidance,
            uncond_kwargs={"encoder_hidden_states": negative_prompt_embeds},
            guidance_scale=guidance_scale,
            guidance_rescale=guidance_rescale,
        )
    if latents is not None:
        out = sample(
            unet,
            scheduler,
            latents=latents.to(device=device, dtype=prompt_embeds.dtype),
            num_inference_steps=num_inference_steps,
            graph=graph,
            progress=False,
            step_kwargs=step_kwargs,
            **guidance,
        )
    else:
        out = _loop(
            unet,
            scheduler,
            shape,
            prompt_embeds.dtype,
            device,
            generator,
            seed,
            graph,
            num_inference_steps,
            step_kwargs,
            **guidance,
        )
    if output_type == "latent":
        image, has_nsfw = out, None
    else:
        image = pipe.vae.decode(out / pipe.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
        has_nsfw = None
        if getattr(pipe, "safety_checker", None) is not None:
            image, has_nsfw = pipe.run_safety_checker(image, device, prompt_embeds.dtype)
    denormalize = [True] * image.shape[0] if has_nsfw is None else [not flag for flag in has_nsfw]
    image = pipe.image_processor.postprocess(image, output_type=output_type, do_denormalize=denormalize)
    if not return_dict:
        return (image, has_nsfw)
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=has_nsfw)


# ---------------------------------------------------------------------------------------------- transformer pipelines


def _check_supported(run, pipe, kwargs) -> None:
    """An argument of the pipeline's ``__call__`` that ``run`` does not take changes the loop itself: refuse it
    by name (a silent drop would change the images)."""
    ours = inspect.signature(run).parameters
    theirs = inspect.signature(type(pipe).__call__).parameters
    for name in kwargs:
        if name not in ours and name in theirs:
            raise TypeError(
                f"run_pipeline does not support `{name}` for {type(pipe).__name__} (it changes the denoising loop); "
                "call the pipeline itself with fastdiff's scheduler swapped in "
                "(pipe.scheduler = fastdiff.<Class>.from_config(pipe.scheduler.config))"
            )


def _batch(prompt, prompt_embeds) -> int:
    if isinstance(prompt, str):
        return 1
    return len(prompt) if prompt is not None else prompt_embeds.shape[0]


def _seeded(latents, seed, shape, dtype, device, pipe, backend):
    """The starting latents: the caller's, or Philox normals (per-sample ``seed``) in the layout the pipeline's
    ``prepare_latents`` returns (Flux's packed one), or None for the pipeline to draw from its generator."""
    if latents is not None or seed is None:
        return latents
    scheduler = as_fastdiff_scheduler(pipe.scheduler, backend)
    seeds = as_seed_tensor(seed, shape[0], device)
    return initial_noise(shape, dtype, device, seeds=seeds, backend=scheduler.backend)


def _denoise(pipe, model, latents, steps, generator, seed, graph, backend, schedule_kwargs, **guidance):
    """The pipeline's loop through fastdiff: from ``latents`` (already drawn), eager when the scheduler draws
    noise from ``generator`` every step (to draw what the pipeline draws), else through ``sample``."""
    scheduler = as_fastdiff_scheduler(pipe.scheduler, backend)
    per_step = generator is not None and scheduler.draws_noise({})
    return sample(
        model,
        scheduler,
        latents=latents,
        num_inference_steps=steps,
        generator=generator if per_step else None,
        seed=seed,
        graph=False if per_step else graph,
        progress=False,
        schedule_kwargs=schedule_kwargs,
        **guidance,
    )


def _guided(cond: dict, uncond: dict, scale, do_cfg: bool) -> dict:
    if not do_cfg:
        return dict(model_kwargs=cond)
    return dict(model_kwargs=cond, uncond_kwargs=uncond, guidance_scale=scale)


def _calculate_shift(pipe):
    """The pipeline module's own ``calculate_shift`` (SD3's and Flux's defaults differ: max_shift 1.16 / 1.15)."""
    return sys.modules[type(pipe).__module__].calculate_shift


def _sd3_schedule(pipe, latents, sigmas, mu) -> dict:
    """SD3's ``set_timesteps`` arguments: custom ``sigmas``; ``mu`` from the image sequence length (patches of
    the latents) when the scheduler shifts dynamically and none is given (SD3's defaults: max_shift 1.16)."""
    schedule = {"sigmas": sigmas} if sigmas is not None else {}
    config = pipe.scheduler.config
    if config.get("use_dynamic_shifting", None) and mu is None:
        patch = pipe.transformer.config.patch_size
        mu = _calculate_shift(pipe)(
            (latents.shape[2] // patch) * (latents.shape[3] // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    if mu is not None:
        schedule["mu"] = mu
    return schedule


def _flux_schedule(pipe, image_seq_len: int, steps: int, sigmas) -> dict:
    """Flux's ``set_timesteps`` arguments: sigmas linspace(1, 1/steps) unless given (none for a scheduler with
    ``use_flow_sigmas``), and ``mu`` from the packed sequence length, always (schnell's static shift ignores
    it; Flux's defaults: max_shift 1.15)."""
    import numpy as np

    config = pipe.scheduler.config
    if config.get("use_flow_sigmas", False):
        sigmas = None
    elif sigmas is None:
        sigmas = np.linspace(1.0, 1 / steps, steps)
    mu = _calculate_shift(pipe)(
        image_seq_len,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    return dict(mu=mu, **({"sigmas": sigmas} if sigmas is not None else {}))


def _sd3(
    pipe,
    prompt=None,
    prompt_2=None,
    prompt_3=None,
    height=None,
    width=None,
    num_inference_steps: int = 28,
    sigmas=None,
    guidance_scale: float = 7.0,
    negative_prompt=None,
    negative_prompt_2=None,
    negative_prompt_3=None,
    num_images_per_prompt: int = 1,
    generator=None,
    latents=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    pooled_prompt_embeds=None,
    negative_pooled_prompt_embeds=None,
    output_type: str = "pil",
    return_dict: bool = True,
    joint_attention_kwargs=None,
    clip_skip=None,
    max_sequence_length: int = 256,
    mu=None,
    *,
    graph="auto",
    seed=None,
    backend=None,
):
    """StableDiffusion3Pipeline.__call__ with the loop run by fastdiff (SD3Transformer2DModel, (B, C, H, W))."""
    from diffusers.pipelines.stable_diffusion_3.pipeline_output import StableDiffusion3PipelineOutput

    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(
        prompt,
        prompt_2,
        prompt_3,
        height,
        width,
        negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2,
        negative_prompt_3=negative_prompt_3,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        max_sequence_length=max_sequence_length,
    )
    pipe._guidance_scale, pipe._clip_skip, pipe._joint_attention_kwargs = (
        guidance_scale,
        clip_skip,
        joint_attention_kwargs,
    )
    pipe._interrupt = False
    batch = _batch(prompt, prompt_embeds) * num_images_per_prompt
    device = pipe._execution_device
    do_cfg = pipe.do_classifier_free_guidance
    pe, npe, ppe, nppe = pipe.encode_prompt(
        prompt=prompt,
        prompt_2=prompt_2,
        prompt_3=prompt_3,
        negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2,
        negative_prompt_3=negative_prompt_3,
        do_classifier_free_guidance=do_cfg,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        device=device,
        clip_skip=clip_skip,
        num_images_per_prompt=num_images_per_prompt,
        max_sequence_length=max_sequence_length,
        lora_scale=(joint_attention_kwargs or {}).get("scale"),
    )
    transformer, scale = pipe.transformer, pipe.vae_scale_factor
    channels = transformer.config.in_channels
    shape = (batch, channels, int(height) // scale, int(width) // scale)
    latents = _seeded(latents, seed, shape, pe.dtype, device, pipe, backend)
    latents = pipe.prepare_latents(batch, channels, height, width, pe.dtype, device, generator, latents)
    schedule = _sd3_schedule(pipe, latents, sigmas, mu)
    extra = {"joint_attention_kwargs": joint_attention_kwargs}
    cond = dict(encoder_hidden_states=pe, pooled_projections=ppe, **extra)
    uncond = dict(encoder_hidden_states=npe, pooled_projections=nppe, **extra)
    guidance = _guided(cond, uncond, guidance_scale, do_cfg)
    latents = _denoise(
        pipe, transformer, latents, num_inference_steps, generator, seed, graph, backend, schedule, **guidance
    )
    image = latents if output_type == "latent" else _decode_image(pipe, latents, output_type)
    pipe.maybe_free_model_hooks()
    return StableDiffusion3PipelineOutput(images=image) if return_dict else (image,)


def _flux(
    pipe,
    prompt=None,
    prompt_2=None,
    negative_prompt=None,
    negative_prompt_2=None,
    true_cfg_scale: float = 1.0,
    height=None,
    width=None,
    num_inference_steps: int = 28,
    sigmas=None,
    guidance_scale: float = 3.5,
    num_images_per_prompt: int = 1,
    generator=None,
    latents=None,
    prompt_embeds=None,
    pooled_prompt_embeds=None,
    negative_prompt_embeds=None,
    negative_pooled_prompt_embeds=None,
    output_type: str = "pil",
    return_dict: bool = True,
    joint_attention_kwargs=None,
    max_sequence_length: int = 512,
    *,
    graph="auto",
    seed=None,
    backend=None,
):
    """FluxPipeline.__call__ with the loop run by fastdiff: packed latents (B, sequence, 4C), image and text ids
    shared by both halves of the doubled batch, ``guidance_scale`` as the guidance embedding of a
    guidance-distilled transformer, true CFG (``negative_prompt``, ``true_cfg_scale`` > 1) as a doubled batch."""
    from diffusers.pipelines.flux.pipeline_output import FluxPipelineOutput

    height = height or pipe.default_sample_size * pipe.vae_scale_factor
    width = width or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(
        prompt,
        prompt_2,
        height,
        width,
        negative_prompt=negative_prompt,
        negative_prompt_2=negative_prompt_2,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
        max_sequence_length=max_sequence_length,
    )
    pipe._guidance_scale, pipe._joint_attention_kwargs = guidance_scale, joint_attention_kwargs
    pipe._current_timestep, pipe._interrupt = None, False
    batch = _batch(prompt, prompt_embeds) * num_images_per_prompt
    device = pipe._execution_device
    lora_scale = (joint_attention_kwargs or {}).get("scale")
    has_negative = negative_prompt is not None or (
        negative_prompt_embeds is not None and negative_pooled_prompt_embeds is not None
    )
    do_cfg = true_cfg_scale > 1 and has_negative
    if do_cfg and prompt_embeds is not None and negative_prompt_embeds is not None:
        if prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"`prompt_embeds` {tuple(prompt_embeds.shape)} and `negative_prompt_embeds` "
                f"{tuple(negative_prompt_embeds.shape)} must have the same shape"
            )
    encode = dict(device=device, num_images_per_prompt=num_images_per_prompt, lora_scale=lora_scale)
    pe, ppe, text_ids = pipe.encode_prompt(
        prompt=prompt,
        prompt_2=prompt_2,
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds,
        max_sequence_length=max_sequence_length,
        **encode,
    )
    if do_cfg:
        npe, nppe, negative_text_ids = pipe.encode_prompt(
            prompt=negative_prompt,
            prompt_2=negative_prompt_2,
            prompt_embeds=negative_prompt_embeds,
            pooled_prompt_embeds=negative_pooled_prompt_embeds,
            max_sequence_length=max_sequence_length,
            **encode,
        )
    transformer, scale = pipe.transformer, pipe.vae_scale_factor
    channels = transformer.config.in_channels // 4
    h, w = 2 * (int(height) // (scale * 2)), 2 * (int(width) // (scale * 2))
    shape = (batch, (h // 2) * (w // 2), channels * 4)
    latents = _seeded(latents, seed, shape, pe.dtype, device, pipe, backend)
    latents, image_ids = pipe.prepare_latents(batch, channels, height, width, pe.dtype, device, generator, latents)
    schedule = _flux_schedule(pipe, latents.shape[1], num_inference_steps, sigmas)
    extra = dict(joint_attention_kwargs=joint_attention_kwargs or {}, img_ids=image_ids)
    if transformer.config.guidance_embeds:
        extra["guidance"] = float(guidance_scale)
    cond = dict(encoder_hidden_states=pe, pooled_projections=ppe, txt_ids=text_ids, **extra)
    uncond = (
        dict(encoder_hidden_states=npe, pooled_projections=nppe, txt_ids=negative_text_ids, **extra) if do_cfg else {}
    )
    guidance = _guided(cond, uncond, true_cfg_scale, do_cfg)
    latents = _denoise(
        pipe, transformer, latents, num_inference_steps, generator, seed, graph, backend, schedule, **guidance
    )
    if output_type == "latent":
        image = latents
    else:
        image = _decode_image(pipe, pipe._unpack_latents(latents, height, width, scale), output_type)
    pipe.maybe_free_model_hooks()
    return FluxPipelineOutput(images=image) if return_dict else (image,)


def _wan(
    pipe,
    prompt=None,
    negative_prompt=None,
    height: int = 480,
    width: int = 832,
    num_frames: int = 81,
    num_inference_steps: int = 50,
    guidance_scale: float = 5.0,
    guidance_scale_2=None,
    num_videos_per_prompt: int = 1,
    generator=None,
    latents=None,
    prompt_embeds=None,
    negative_prompt_embeds=None,
    output_type: str = "np",
    return_dict: bool = True,
    attention_kwargs=None,
    max_sequence_length: int = 512,
    *,
    graph="auto",
    seed=None,
    backend=None,
):
    """WanPipeline.__call__ with the loop run by fastdiff: 5-D latents (B, C, F, H, W) kept float32, the
    transformer's input cast to its dtype, guidance as a doubled batch. One transformer (Wan 2.1 and 2.2 A14B
    without ``boundary_ratio``); the two-expert and per-token-timestep (``expand_timesteps``) variants raise."""
    from diffusers.pipelines.wan.pipeline_output import WanPipelineOutput

    _check_wan_variant(pipe)
    pipe.check_inputs(prompt, negative_prompt, height, width, prompt_embeds, negative_prompt_embeds, None, None)
    temporal = pipe.vae_scale_factor_temporal
    if num_frames % temporal != 1:  # the pipeline's own rounding, with its warning
        logger.warning("`num_frames - 1` has to be divisible by %d. Rounding to the nearest number.", temporal)
        num_frames = num_frames // temporal * temporal + 1
    num_frames = max(num_frames, 1)
    transformer = pipe.transformer
    patch = transformer.config.patch_size
    h_mult, w_mult = pipe.vae_scale_factor_spatial * patch[1], pipe.vae_scale_factor_spatial * patch[2]
    if height % h_mult or width % w_mult:
        logger.warning("`height` and `width` must be multiples of (%d, %d); rounding down.", h_mult, w_mult)
        height, width = height // h_mult * h_mult, width // w_mult * w_mult
    pipe._guidance_scale, pipe._guidance_scale_2, pipe._attention_kwargs = guidance_scale, None, attention_kwargs
    pipe._current_timestep, pipe._interrupt = None, False
    batch = _batch(prompt, prompt_embeds) * num_videos_per_prompt
    device = pipe._execution_device
    do_cfg = pipe.do_classifier_free_guidance
    pe, npe = pipe.encode_prompt(
        prompt=prompt,
        negative_prompt=negative_prompt,
        do_classifier_free_guidance=do_cfg,
        num_videos_per_prompt=num_videos_per_prompt,
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_prompt_embeds,
        max_sequence_length=max_sequence_length,
        device=device,
    )
    pe = pe.to(transformer.dtype)
    npe = npe.to(transformer.dtype) if npe is not None else None
    channels, spatial = transformer.config.in_channels, pipe.vae_scale_factor_spatial
    shape = (batch, channels, (num_frames - 1) // temporal + 1, int(height) // spatial, int(width) // spatial)
    latents = _seeded(latents, seed, shape, torch.float32, device, pipe, backend)
    latents = pipe.prepare_latents(
        batch, channels, height, width, num_frames, torch.float32, device, generator, latents
    )
    extra = {"attention_kwargs": attention_kwargs}
    guidance = _guided(
        dict(encoder_hidden_states=pe, **extra), dict(encoder_hidden_states=npe, **extra), guidance_scale, do_cfg
    )
    latents = _denoise(pipe, transformer, latents, num_inference_steps, generator, seed, graph, backend, {}, **guidance)
    video = latents if output_type == "latent" else _decode_video(pipe, latents, output_type)
    pipe.maybe_free_model_hooks()
    return WanPipelineOutput(frames=video) if return_dict else (video,)


def _check_wan_variant(pipe) -> None:
    """run_pipeline runs Wan with one transformer and one timestep per sample; the rest raise, naming why."""
    for name, value in (("boundary_ratio", pipe.config.boundary_ratio), ("transformer_2", pipe.transformer_2)):
        if value is not None:
            raise NotImplementedError(
                f"run_pipeline runs a WanPipeline with one transformer; this one has `{name}`={value!r} (two experts "
                "switched by timestep): swap fastdiff's scheduler into the pipeline instead"
            )
    if pipe.config.get("expand_timesteps", False):
        raise NotImplementedError(
            "run_pipeline does not run WanPipeline with `expand_timesteps`=True (per-token timesteps); swap "
            "fastdiff's scheduler into the pipeline instead"
        )


def _decode_image(pipe, latents, output_type):
    """SD3's and Flux's decode: unscale and shift (``scaling_factor``, ``shift_factor``), VAE, postprocess."""
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(pipe.vae.device), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=output_type)


def _decode_video(pipe, latents, output_type):
    """Wan's decode: per-channel ``latents_mean`` / ``latents_std`` in the VAE's dtype, VAE, video postprocess."""
    vae = pipe.vae
    latents = latents.to(vae.device, dtype=vae.dtype)
    view = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean).view(view).to(latents.device, latents.dtype)
    inv_std = 1.0 / torch.tensor(vae.config.latents_std).view(view).to(latents.device, latents.dtype)
    video = vae.decode(latents / inv_std + mean, return_dict=False)[0]
    return pipe.video_processor.postprocess_video(video, output_type=output_type)


_TRANSFORMER_PIPELINES = {"StableDiffusion3Pipeline": _sd3, "FluxPipeline": _flux, "WanPipeline": _wan}
