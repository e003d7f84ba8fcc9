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
