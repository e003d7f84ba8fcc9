"""Swapping fastdiff's schedulers into diffusers' own pipelines gives the same images."""

import numpy as np
import pytest
import torch
from conftest import DEVICES, available_backends

import fastdiff

diffusers = pytest.importorskip("diffusers")

BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]


def tiny_unet(seed=0, **overrides):
    torch.manual_seed(seed)
    config = dict(
        sample_size=8,
        in_channels=3,
        out_channels=3,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
    )
    config.update(overrides)
    return diffusers.UNet2DModel(**config).eval()


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize(
    "pipeline,scheduler,kwargs",
    [
        ("DDPMPipeline", "DDPMScheduler", dict(num_inference_steps=20)),
        ("DDIMPipeline", "DDIMScheduler", dict(num_inference_steps=12, eta=0.0)),
        ("DDIMPipeline", "DDIMScheduler", dict(num_inference_steps=12, eta=1.0)),
    ],
)
def test_pipeline_same_images(device, backend, pipeline, scheduler, kwargs):
    unet = tiny_unet().to(device)
    d_sched = getattr(diffusers, scheduler)(num_train_timesteps=1000, clip_sample=True)
    pipe = getattr(diffusers, pipeline)(unet=unet, scheduler=d_sched).to(device)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, generator=torch.Generator(device).manual_seed(0), output_type="np", **kwargs).images

    pipe.scheduler = getattr(fastdiff, scheduler).from_config(pipe.scheduler.config, backend=backend)
    got = pipe(batch_size=2, generator=torch.Generator(device).manual_seed(0), output_type="np", **kwargs).images
    assert pipe.scheduler.last_backend == backend
    err = np.abs(got - expected).max()
    assert err <= 2e-4, f"max |diff| {err:.3e}"
    assert np.abs(expected).max() > 0.05  # the images are not trivially empty


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize(
    "scheduler", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"]
)
def test_sigma_schedulers_in_a_diffusers_pipeline(device, backend, scheduler):
    """DiTPipeline (no transformers needed) calls scale_model_input and steps the doubled guidance batch with
    the scheduler's own step counter: the sigma-space samplers' whole API surface inside a real pipeline."""
    torch.manual_seed(0)
    transformer = (
        diffusers.DiTTransformer2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            out_channels=8,
            num_layers=1,
            sample_size=8,
            patch_size=2,
            num_embeds_ada_norm=1000,
        )
        .to(device)
        .eval()
    )
    vae = (
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
    images = []
    for sched in (getattr(diffusers, scheduler)(), getattr(fastdiff, scheduler)(backend=backend)):
        pipe = diffusers.DiTPipeline(transformer=transformer, vae=vae, scheduler=sched).to(device)
        pipe.set_progress_bar_config(disable=True)
        generator = torch.Generator(device).manual_seed(0)
        torch.manual_seed(1)  # DiT steps without a generator: ancestral noise comes from the global RNG
        images.append(
            pipe(
                class_labels=[1, 2], num_inference_steps=6, guidance_scale=3.0, generator=generator, output_type="np"
            ).images
        )
    err = np.abs(images[1] - images[0]).max()
    assert err <= 2e-4, f"max |diff| {err:.3e}"
    assert images[0].std() > 0.05


# ---------------------------------------------------------------------------------------------- SD3, Flux, Wan


def _fastdiff_scheduler(cls_name, config, backend):
    """fastdiff's class of that name from ``config`` (via from_config, as a user swaps it in), or a skip that
    names what is missing: the class (another branch is writing it) or the mode (DPM-Solver's flow mode)."""
    cls = fastdiff.SCHEDULERS.get(cls_name)
    if cls is None:
        pytest.skip(f"fastdiff has no {cls_name} yet")
    try:
        return cls.from_config(config, backend=backend)
    except (NotImplementedError, ValueError) as exc:
        pytest.skip(f"fastdiff's {cls_name} does not take this config yet: {exc}")


_PIPES = {}


def transformer_pipeline(name, device):
    """The tiny pipeline of swap ``name`` with diffusers' scheduler, built once per session (3-7 s each here)."""
    pytest.importorskip("transformers")
    import tiny_pipelines

    builder, cls_name, config, _ = tiny_pipelines.SWAPS[name]
    key = (builder, device)
    if key not in _PIPES:
        _PIPES[key] = builder(diffusers.FlowMatchEulerDiscreteScheduler(), device=device)
    pipe = _PIPES[key]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(config)
    return pipe


def transformer_images(pipe, name, device, **kwargs):
    import tiny_pipelines

    out = pipe(**tiny_pipelines.call_arguments(name, device=device), **kwargs)
    return out.frames if name.startswith("wan") else out.images


SWAP_NAMES = [
    "sd3",
    "sd3-dynamic-shift",
    "flux-dev",
    "flux-dev-true-cfg",
    "flux-schnell",
    "flux-schnell-true-cfg",
    "wan-unipc",
    "wan-flow-euler",
    "wan-dpm-flow",
    "sd3-dpm++",
    "wan-dpm++",
]


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", SWAP_NAMES)
def test_transformer_pipeline_scheduler_swap_same_images(name, device, backend):
    """diffusers' StableDiffusion3Pipeline / FluxPipeline / WanPipeline with fastdiff's scheduler swapped in via
    from_config give diffusers' images (2e-4) on every backend: SD3 (static and dynamic shift), Flux dev
    (dynamic shifting, guidance embedding) and schnell (static shift), each also with true CFG, Wan with UniPC
    in flow mode, FlowMatchEuler and DPM-Solver in flow mode."""
    import tiny_pipelines

    pipe = transformer_pipeline(name, device)
    cls_name, config = tiny_pipelines.SWAPS[name][1:3]
    expected = transformer_images(pipe, name, device)
    pipe.scheduler = _fastdiff_scheduler(cls_name, pipe.scheduler.config, backend)
    got = transformer_images(pipe, name, device)
    assert pipe.scheduler.last_backend == backend
    assert got.shape == expected.shape
    err = np.abs(got - expected).max()
    assert err <= 2e-4, f"{name} [{backend}]: max |diff| {err:.3e}"
    assert expected.std() > 0.05  # the images are not trivially flat
