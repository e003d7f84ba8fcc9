"""Run a diffusers pipeline's denoising loop through fastdiff (``sample`` / ``GraphSampler``), keeping the
pipeline's own prompt encoding and VAE decode. Needs diffusers.

    images = fastdiff.integrations.run_pipeline(pipe, batch_size=16, generator=g)          # DDPM/DDIM
    images = fastdiff.integrations.run_pipeline(sd_pipe, prompt="a cat", seed=0)            # SD-style

With a ``generator`` the starting noise is drawn exactly as the pipeline draws it, so outputs match the
pipeline's to rounding; a loop that draws noise every step from that generator (DDPM, DDIM with
eta > 0, Euler ancestral, SDE solvers) then runs eagerly to keep those draws identical. With ``seed``
(or neither) noise is Philox in the kernels and, on CUDA, the whole loop is one CUDA graph.
"""

from __future__ import annotations

import inspect

import torch

from .loop import as_fastdiff_scheduler
from .noise import randn_tensor
from .sampling import sample


def _device(pipe) -> torch.device:
    return getattr(pipe, "_execution_device", None) or next(pipe.unet.parameters()).device


@torch.no_grad()
def run_pipeline(pipe, *args, graph="auto", seed=None, backend=None, **kwargs):
    """Call ``pipe`` with its usual arguments, the denoising loop run by fastdiff. Supports diffusers'
    ``DDPMPipeline`` / ``DDIMPipeline`` (a ``UNet2DModel``) and Stable-Diffusion-style text-to-image
    pipelines (``encode_prompt``, ``vae``, ``image_processor``, a ``UNet2DConditionModel``). Returns what the
    pipeline returns (``ImagePipelineOutput`` / ``StableDiffusionPipelineOutput`` or a tuple)."""
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
