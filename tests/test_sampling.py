"""fastdiff.sample against the hand-written diffusers loop; argument errors."""

import pytest
import torch
from conftest import DEVICES, available_backends
from helpers import assert_rel

import fastdiff

diffusers = pytest.importorskip("diffusers")

BACKEND_CASES = [(d, b) for d in DEVICES for b in ["reference"] + available_backends(d)]


class TinyCondModel(torch.nn.Module):
    """A small conditional denoiser: conv trunk plus a projection of `encoder_hidden_states`."""

    def __init__(self, channels=3, cond_dim=5):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, 16, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(16, channels, 3, padding=1)
        self.proj = torch.nn.Linear(cond_dim, 16)
        self.temb = torch.nn.Linear(1, 16)

    def forward(self, x, t, encoder_hidden_states=None):
        t = t.to(x.dtype).reshape(-1)[:1].expand(x.shape[0]) / 1000
        h = self.conv1(x) + self.temb(t[:, None])[:, :, None, None]
        if encoder_hidden_states is not None:
            h = h + self.proj(encoder_hidden_states.mean(1))[:, :, None, None]
        return self.conv2(torch.nn.functional.silu(h))


def diffusers_loop(
    model, scheduler, latents, steps, generator=None, guidance_scale=None, cond=None, uncond=None, **step_kwargs
):
    """The loop as diffusers' pipelines write it."""
    scheduler.set_timesteps(steps, device=latents.device)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        if guidance_scale is not None:
            inp = scheduler.scale_model_input(torch.cat([latents] * 2), t)
            out = model(inp, t, encoder_hidden_states=torch.cat([uncond, cond]))
            uncond_out, cond_out = out.chunk(2)
            out = uncond_out + guidance_scale * (cond_out - uncond_out)
        else:
            out = model(scheduler.scale_model_input(latents, t), t)
        out = getattr(out, "sample", out)
        latents = scheduler.step(out, t, latents, generator=generator, **step_kwargs).prev_sample
    return latents


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize(
    "name,step_kwargs", [("DDIMScheduler", {}), ("DDIMScheduler", {"eta": 1.0}), ("DDPMScheduler", {})]
)
def test_sample_equals_diffusers_loop(device, backend, name, step_kwargs):
    # a random-weight UNet with attention amplifies 1e-7 step differences ~1000x over 15 steps (measured: 1.8e-4
    # for DDIM with the Triton backend), which would test the model's conditioning rather than the loop
    torch.manual_seed(1)
    unet = TinyCondModel().to(device).eval()
    d = getattr(diffusers, name)()
    shape = (2, 3, 8, 8)
    g = torch.Generator(device).manual_seed(0)
    noise = torch.randn(shape, generator=g, device=device)
    with torch.no_grad():
        expected = diffusers_loop(unet, d, noise, 15, generator=g, **step_kwargs)
    got = fastdiff.sample(
        unet,
        d,
        shape=shape,
        num_inference_steps=15,
        generator=torch.Generator(device).manual_seed(0),
        graph=False,
        progress=False,
        step_kwargs=step_kwargs,
        backend=backend,
    )
    assert_rel(got, expected, 1e-4, f"{name}{step_kwargs}")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
@pytest.mark.parametrize("name", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_guided_sample_equals_diffusers_loop(device, backend, name):
    torch.manual_seed(0)
    model = TinyCondModel().to(device).eval()
    d = getattr(diffusers, name)()
    cond = torch.randn(2, 4, 5, device=device)
    uncond = torch.zeros(2, 4, 5, device=device)
    latents = torch.randn(2, 3, 6, 6, device=device)
    with torch.no_grad():
        expected = diffusers_loop(model, d, latents, 12, guidance_scale=5.0, cond=cond, uncond=uncond)
    got = fastdiff.sample(
        model,
        d,
        latents=latents,
        num_inference_steps=12,
        guidance_scale=5.0,
        model_kwargs={"encoder_hidden_states": cond},
        uncond_kwargs={"encoder_hidden_states": uncond},
        graph=False,
        progress=False,
        backend=backend,
    )
    assert_rel(got, expected, 1e-4, "guided DDIM")


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_sample_with_seed_is_reproducible_and_batch_invariant(device, backend):
    torch.manual_seed(2)
    unet = TinyCondModel().to(device).eval()
    kw = dict(num_inference_steps=6, graph=False, progress=False, backend=backend)
    a = fastdiff.sample(unet, fastdiff.DDPMScheduler(), shape=(3, 3, 8, 8), seed=[5, 6, 7], **kw)
    b = fastdiff.sample(unet, fastdiff.DDPMScheduler(), shape=(3, 3, 8, 8), seed=[5, 6, 7], **kw)
    assert torch.equal(a, b)
    alone = fastdiff.sample(unet, fastdiff.DDPMScheduler(), shape=(1, 3, 8, 8), seed=[6], **kw)
    # the UNet's batched convolutions may round differently for another batch size: rounding, not bits
    torch.testing.assert_close(alone[0], a[1], rtol=1e-4, atol=1e-4)
    c = fastdiff.sample(unet, fastdiff.DDPMScheduler(), shape=(3, 3, 8, 8), seed=[5, 6, 8], **kw)
    assert not torch.allclose(c[2], a[2])


@pytest.mark.parametrize("device,backend", BACKEND_CASES)
def test_seeded_sample_fast_equals_reference(device, backend):
    torch.manual_seed(3)
    unet = TinyCondModel().to(device).eval()
    kw = dict(shape=(2, 3, 8, 8), seed=11, num_inference_steps=8, graph=False, progress=False)
    fast = fastdiff.sample(unet, fastdiff.DDPMScheduler(), backend=backend, **kw)
    ref = fastdiff.sample(unet, fastdiff.DDPMScheduler(), backend="reference", **kw)
    assert_rel(fast, ref, 2e-4, "DDPM with Philox noise")


def test_progress_and_callback(capsys):
    model = TinyCondModel()
    seen = []
    fastdiff.sample(
        model,
        fastdiff.DDIMScheduler(),
        shape=(1, 3, 4, 4),
        seed=0,
        num_inference_steps=4,
        graph=False,
        progress=True,
        callback=lambda i, t, x: seen.append((i, int(t), x.shape)),
    )
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert "fastdiff" in capsys.readouterr().err


def test_argument_errors():
    model = TinyCondModel()
    sched = fastdiff.DDIMScheduler()
    x = torch.randn(1, 3, 4, 4)
    with pytest.raises(ValueError, match="exactly one of `shape`.*`latents`"):
        fastdiff.sample(model, sched, progress=False)
    with pytest.raises(ValueError, match="exactly one of `shape`.*`latents`"):
        fastdiff.sample(model, sched, shape=(1, 3, 4, 4), latents=x, progress=False)
    with pytest.raises(ValueError, match="`guidance_scale` needs `model_kwargs`"):
        fastdiff.sample(model, sched, latents=x, guidance_scale=3.0, progress=False)
    with pytest.raises(ValueError, match="`guidance_scale` needs `uncond_kwargs`"):
        fastdiff.sample(
            model,
            sched,
            latents=x,
            guidance_scale=3.0,
            progress=False,
            model_kwargs={"encoder_hidden_states": torch.randn(1, 2, 5)},
        )
    with pytest.raises(ValueError, match=r"`model` returned shape \(1, 3, 2, 2\)"):
        fastdiff.sample(lambda x, t: x[..., :2, :2], sched, latents=x, progress=False, graph=False)
    with pytest.raises(ValueError, match="`generator`.*`seed`"):
        fastdiff.sample(model, sched, latents=x, seed=1, generator=torch.Generator(), progress=False)
    with pytest.raises(TypeError, match="`model` must be callable"):
        fastdiff.sample(3, sched, latents=x, progress=False)
    with pytest.raises(ValueError, match="`graph=True` needs CUDA"):
        fastdiff.sample(model, sched, latents=x, progress=False, graph=True)
    with pytest.raises(ValueError, match=r"`model_kwargs\['encoder_hidden_states'\]` has shape"):
        fastdiff.sample(
            model,
            sched,
            latents=x,
            guidance_scale=2.0,
            progress=False,
            model_kwargs={"encoder_hidden_states": torch.randn(2, 2, 5)},
            uncond_kwargs={"encoder_hidden_states": torch.randn(2, 2, 5)},
        )
    with pytest.raises(TypeError, match="`scheduler` must be a fastdiff scheduler"):
        fastdiff.sample(model, object(), latents=x, progress=False)
