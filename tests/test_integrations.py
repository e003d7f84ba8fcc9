"""fastdiff.integrations.run_pipeline: the pipeline's output, with the loop run by fastdiff."""

import numpy as np
import pytest
import torch
from conftest import DEVICES, available_backends

from fastdiff import integrations

diffusers = pytest.importorskip("diffusers")
BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]
from test_pipelines import SWAP_NAMES  # noqa: E402


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize(
    "pipeline,scheduler,kwargs",
    [
        ("DDPMPipeline", "DDPMScheduler", dict(num_inference_steps=15)),
        ("DDIMPipeline", "DDIMScheduler", dict(num_inference_steps=10, eta=0.0)),
        ("DDIMPipeline", "DDIMScheduler", dict(num_inference_steps=10, eta=1.0)),
    ],
)
def test_run_pipeline_matches_the_pipeline(device, backend, pipeline, scheduler, kwargs):
    from test_pipelines import tiny_unet

    pipe = getattr(diffusers, pipeline)(unet=tiny_unet().to(device), scheduler=getattr(diffusers, scheduler)())
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, generator=torch.Generator(device).manual_seed(1), output_type="np", **kwargs).images
    got = integrations.run_pipeline(
        pipe,
        batch_size=2,
        generator=torch.Generator(device).manual_seed(1),
        output_type="np",
        backend=backend,
        **kwargs,
    ).images
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 2e-4
    pil = integrations.run_pipeline(pipe, batch_size=1, seed=3, backend=backend, **kwargs).images
    assert pil[0].size == (8, 8)


class StubTextToImage:
    """The parts of a StableDiffusionPipeline that run_pipeline uses, with real diffusers components and
    a stub prompt encoder (CLIP needs transformers): fixed embeddings per prompt."""

    def __init__(self, device):
        from diffusers.image_processor import VaeImageProcessor

        torch.manual_seed(0)
        self.unet = (
            diffusers.UNet2DConditionModel(
                sample_size=8,
                in_channels=4,
                out_channels=4,
                layers_per_block=1,
                block_out_channels=(32, 64),
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=8,
                norm_num_groups=8,
            )
            .to(device)
            .eval()
        )
        self.vae = (
            diffusers.AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                block_out_channels=(16, 32),
                norm_num_groups=8,
                down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2,
            )
            .to(device)
            .eval()
        )
        self.vae_scale_factor = 2
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self.scheduler = diffusers.DPMSolverMultistepScheduler()
        self._execution_device = torch.device(device)
        self.safety_checker = None

    def encode_prompt(
        self,
        prompt,
        device,
        num_images_per_prompt,
        do_cfg,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
    ):
        g = torch.Generator().manual_seed(len(prompt))
        pos = torch.randn(1, 5, 32, generator=g).to(device).repeat(num_images_per_prompt, 1, 1)
        neg = torch.zeros_like(pos) if do_cfg else None
        return pos, neg

    def reference(self, prompt, steps, guidance_scale, generator):
        """The denoising loop as StableDiffusionPipeline.__call__ writes it."""
        pos, neg = self.encode_prompt(prompt, self._execution_device, 1, True)
        embeds = torch.cat([neg, pos])
        self.scheduler.set_timesteps(steps, device=self._execution_device)
        latents = torch.randn((1, 4, 8, 8), generator=generator, device=self._execution_device)
        latents = latents * self.scheduler.init_noise_sigma
        for t in self.scheduler.timesteps:
            inp = self.scheduler.scale_model_input(torch.cat([latents] * 2), t)
            noise_pred = self.unet(inp, t, encoder_hidden_states=embeds, return_dict=False)[0]
            u, c = noise_pred.chunk(2)
            noise_pred = u + guidance_scale * (c - u)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False)[0]
        image = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="np", do_denormalize=[True])


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_run_text_to_image_matches_the_pipeline_loop(device, backend):
    with torch.no_grad():
        pipe = StubTextToImage(device)
        expected = pipe.reference("a cat", 8, 4.0, torch.Generator(device).manual_seed(2))
        got = integrations.run_pipeline(
            pipe,
            prompt="a cat",
            num_inference_steps=8,
            guidance_scale=4.0,
            generator=torch.Generator(device).manual_seed(2),
            output_type="np",
            backend=backend,
        )
    assert np.abs(got.images - expected).max() <= 2e-4
    assert got.nsfw_content_detected is None


# ---------------------------------------------------------------------------------------------- SD3, Flux, Wan


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", SWAP_NAMES)
def test_run_pipeline_transformer_pipelines_match(name, device, backend):
    """run_pipeline on diffusers' StableDiffusion3Pipeline / FluxPipeline / WanPipeline (their own scheduler,
    converted to fastdiff's class of the same name): the pipeline's images (2e-4), the loop run by fastdiff with
    guidance as one doubled batch."""
    import tiny_pipelines
    from test_pipelines import _fastdiff_scheduler, transformer_images, transformer_pipeline

    pipe = transformer_pipeline(name, device)
    _fastdiff_scheduler(*tiny_pipelines.SWAPS[name][1:3], backend)  # skips, naming it, while fastdiff lacks it
    expected = transformer_images(pipe, name, device)
    out = integrations.run_pipeline(pipe, **tiny_pipelines.call_arguments(name, device=device), backend=backend)
    got = out.frames if name.startswith("wan") else out.images
    assert got.shape == expected.shape
    err = np.abs(got - expected).max()
    assert err <= 2e-4, f"{name} [{backend}]: max |diff| {err:.3e}"


@pytest.mark.parametrize("name", ["flux-dev-true-cfg", "wan-dpm++"])
def test_run_pipeline_transformer_seeds_and_outputs(name):
    """Philox starting noise from per-sample seeds (Flux's in the packed layout), tuple and latent outputs."""
    import tiny_pipelines
    from test_pipelines import _fastdiff_scheduler, transformer_pipeline

    pipe = transformer_pipeline(name, "cpu")
    _fastdiff_scheduler(*tiny_pipelines.SWAPS[name][1:3], None)
    args = tiny_pipelines.call_arguments(name)
    del args["generator"]
    latents = {}
    for seed in (3, 3, 4):
        out = integrations.run_pipeline(pipe, **{**args, "output_type": "latent"}, seed=seed, return_dict=False)
        assert isinstance(out, tuple) and len(out) == 1
        latents.setdefault(seed, []).append(out[0])
    assert torch.equal(latents[3][0], latents[3][1]), "the same seed must give the same latents"
    assert not torch.allclose(latents[3][0], latents[4][0])
    assert torch.isfinite(latents[3][0]).all()
    if name.startswith("flux"):
        assert latents[3][0].shape == (1, 16, 16)  # packed: (batch, 4x4 tokens, 4 latent channels x 2x2)


def test_run_pipeline_refuses_what_changes_the_loop():
    from test_pipelines import transformer_pipeline

    pipe = transformer_pipeline("sd3-dpm++", "cpu")
    with pytest.raises(TypeError, match=r"does not support `callback_on_step_end` for StableDiffusion3Pipeline"):
        integrations.run_pipeline(pipe, prompt="a cat", callback_on_step_end=lambda *a: {})
    with pytest.raises(TypeError, match=r"does not support `skip_guidance_layers`"):
        integrations.run_pipeline(pipe, prompt="a cat", skip_guidance_layers=[0])
    wan = transformer_pipeline("wan-dpm++", "cpu")
    wan.register_to_config(boundary_ratio=0.875)
    try:
        with pytest.raises(NotImplementedError, match=r"one transformer; this one has `boundary_ratio`=0.875"):
            integrations.run_pipeline(wan, prompt="a cat")
    finally:
        wan.register_to_config(boundary_ratio=None)
