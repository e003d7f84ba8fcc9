"""Bad input to the Python API fails at once, before any model call, with an error that names the argument, the
value and what was expected; ``check_finite=True`` names the first step whose output went non-finite."""

import pytest
import torch
from test_capturable import no_host_reads

import fastdiff
from fastdiff.graph import GraphSampler
from fastdiff.loop import raise_if_nonfinite


class Calls(torch.nn.Module):
    """A tiny eps model that counts its calls: an argument error must come before the first."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = 0

    def forward(self, x, t, **kwargs):
        self.calls += 1
        return self.scale * x


def _sample(model, **kw):
    kw = {"shape": (2, 3, 4, 4), "num_inference_steps": 3, "seed": 0, "progress": False, **kw}
    return fastdiff.sample(model, fastdiff.DDIMScheduler(), **kw)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(dtype=torch.int32), TypeError, r"`dtype` must be one of torch.float32, .* got torch.int32"),
        (dict(dtype="float16"), TypeError, r"`dtype` must be one of .* got str 'float16'"),
        (dict(dtype=torch.float8_e4m3fn), TypeError, r"`dtype` .* got torch.float8_e4m3fn"),
        (dict(shape=(8, 8)), ValueError, r"`shape` must have 3 to 5 dimensions, batch first: .* got \(8, 8\)"),
        (dict(shape=(8,)), ValueError, r"`shape` must have 3 to 5 dimensions"),
        (dict(shape=(1, 2, 3, 4, 5, 6)), ValueError, r"`shape` must have 3 to 5 dimensions.* got \(1, 2, 3, 4, 5, 6\)"),
        (dict(shape=(2, 0, 4)), ValueError, r"every size positive; got \(2, 0, 4\)"),
        (dict(shape=(2, 3.5, 4)), TypeError, r"`shape` must be a tuple of ints .* got \(2, 3.5, 4\)"),
        (dict(shape=(2, True, 4)), TypeError, r"`shape` must be a tuple of ints"),
        (dict(shape="2x3x4"), TypeError, r"`shape` must be a tuple of ints .* got '2x3x4'"),
        (dict(shape=None, latents=torch.randn(2, 8)), ValueError, r"`latents` must have 3 to 5 dimensions"),
        (dict(shape=None, latents=torch.ones(2, 3, 4, dtype=torch.int64)), TypeError, r"`latents` .* torch.int64"),
        (dict(num_inference_steps=0), ValueError, r"`num_inference_steps` must be an int >= 1, got 0"),
        (dict(num_inference_steps=2.5), ValueError, r"`num_inference_steps` must be an int >= 1, got 2.5"),
        (dict(guidance_scale=float("nan"), model_kwargs={}, uncond_kwargs={}), ValueError, r"`guidance_scale` .* nan"),
        (dict(guidance_rescale=1.5), ValueError, r"`guidance_rescale` must be a number in \[0, 1\], got 1.5"),
        (dict(model_kwargs=[1]), TypeError, r"`model_kwargs` must be a dict"),
        (dict(seed=None, generator=0), TypeError, r"`generator` must be a torch.Generator"),
        (dict(seed="x"), TypeError, r"`seed` must be an int"),
        (dict(seed=[1, 2, 3]), ValueError, r"`seed` must give one seed per sample: batch is 2, got 3"),
        (dict(step_kwargs={"eta": 0.5, "s_churn": 1.0}), ValueError, r"`step_kwargs` has \['s_churn'\], which"),
        (dict(step_kwargs={"generator": None}), ValueError, r"`step_kwargs` has \['generator'\]"),
        (dict(step_kwargs=(("eta", 1.0),)), TypeError, r"`step_kwargs` must be a dict"),
        (dict(callback=3), TypeError, r"`callback` must be callable"),
        (dict(graph="yes"), ValueError, r"`graph` must be 'auto', True or False, got 'yes'"),
        (dict(device="cuda:99" if torch.cuda.is_available() else "cuda"), ValueError, r"`device` is cuda"),
        (dict(device="gpu"), ValueError, r"`device`='gpu' is not a device"),
        (dict(check_finite="yes"), TypeError, r"`check_finite` must be True or False, got 'yes'"),
        (dict(backend="fast"), ValueError, r"`backend` .* must be one of .* got 'fast'"),
    ],
)
def test_sample_rejects_bad_arguments_before_the_model_runs(kwargs, error, match):
    model = Calls()
    with pytest.raises(error, match=match):
        _sample(model, **kwargs)
    assert model.calls == 0, "the error came after the model ran"


@pytest.mark.parametrize("shape", [(1, 5, 7), (2, 16, 3), (2, 3, 4, 5), (1, 2, 3, 4, 5)])
def test_sample_takes_3d_to_5d_shapes(shape):
    """(B, C, L) and packed latents (B, tokens, C), images (B, C, H, W), video (B, C, F, H, W)."""
    x = _sample(Calls(), shape=shape)
    assert x.shape == shape and torch.isfinite(x).all()


def test_graph_sampler_without_cuda_says_so():
    """A model without parameters has no device: GraphSampler assumes CUDA, and says when there is none."""
    model = lambda x, t: 0.5 * x  # noqa: E731
    if torch.cuda.is_available():
        assert GraphSampler(model, fastdiff.DDIMScheduler(), (1, 3, 4, 4)).device.type == "cuda"
        return
    with pytest.raises(ValueError, match=r"needs a CUDA GPU; `model` \(function\) has no parameters.*fastdiff.sample"):
        GraphSampler(model, fastdiff.DDIMScheduler(), (1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"`device` is cuda, but this torch sees no CUDA GPU"):
        GraphSampler(Calls(), fastdiff.DDIMScheduler(), (1, 3, 4, 4), device="cuda")
    on_cpu = GraphSampler(Calls(), fastdiff.DDIMScheduler(), (1, 3, 4, 4), dtype=torch.float32)
    with pytest.raises(ValueError, match=r"needs a CUDA model, the model is on cpu.*fastdiff.sample"):
        on_cpu(seed=0)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(shape=(8, 8)), ValueError, r"`shape` must have 3 to 5 dimensions"),
        (dict(dtype=torch.int32), TypeError, r"`dtype` must be one of"),
        (dict(num_inference_steps=-1), ValueError, r"`num_inference_steps` must be an int >= 1, got -1"),
        (dict(guidance_scale=float("inf")), ValueError, r"`guidance_scale` must be a finite number"),
        (dict(step_kwargs={"eta": 1.0, "bogus": 1}), ValueError, r"`step_kwargs` has \['bogus'\]"),
        (dict(max_graphs=0), ValueError, r"`max_graphs` must be an int >= 1, got 0"),
        (dict(warmup=-1), ValueError, r"`warmup` must be an int >= 0, got -1"),
        (dict(fallback="cpu"), ValueError, r"`fallback` must be 'error' or 'eager', got 'cpu'"),
    ],
)
def test_graph_sampler_checks_its_arguments_at_construction(kwargs, error, match):
    kwargs = {"shape": (1, 3, 4, 4), "dtype": torch.float32, "device": "cpu", **kwargs}
    with pytest.raises(error, match=match):
        GraphSampler(Calls(), fastdiff.DDIMScheduler(), kwargs.pop("shape"), **kwargs)


@pytest.mark.parametrize("name", sorted(fastdiff.SCHEDULERS))
@pytest.mark.parametrize(
    "noise_seed,error,match",
    [
        ("x", TypeError, r"`noise_seed` must be an int, a list of 2 ints or an int64 tensor of 2 seeds.*got 'x'"),
        (1.5, TypeError, r"got 1.5"),
        (True, TypeError, r"got True"),
        ([1, "2"], TypeError, r"got \[1, '2'\]"),
        (torch.tensor([1.0, 2.0]), TypeError, r"got a torch.float32 tensor of 2 elements"),
        ([1, 2, 3], ValueError, r"`noise_seed` must give one seed per sample: batch is 2, got \[1, 2, 3\]"),
    ],
)
def test_noise_seed_checked_also_where_no_noise_is_drawn(name, noise_seed, error, match):
    """DDIM with eta=0, Euler without churn, DPM-Solver++ and DDPM's last step draw no noise: a bad
    ``noise_seed`` is refused there all the same, at the first and the last step."""
    sched = fastdiff.SCHEDULERS[name]()
    sched.set_timesteps(4)
    x = torch.randn(2, 3, 4, 4)
    for i in (0, len(sched.timesteps) - 1):
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(i)
        with pytest.raises(error, match=match):
            sched.step(torch.randn_like(x), sched.timesteps[i], x, noise_seed=noise_seed)
    sched.set_timesteps(4)
    out = sched.step(torch.randn_like(x), sched.timesteps[0], x, noise_seed=torch.tensor([3, 4]))  # valid forms pass
    assert torch.isfinite(out.prev_sample).all()


# ------------------------------------------------------------------ check_finite


class NaNAfter(Calls):
    """Finite output for the first ``n`` calls, then NaN in one element."""

    def __init__(self, n):
        super().__init__()
        self.n = n

    def forward(self, x, t, **kwargs):
        out = super().forward(x, t)
        if self.calls > self.n:
            out = out.clone()
            out.view(-1)[5] = float("nan")
        return out


def test_check_finite_names_the_step_whose_model_output_went_nan():
    sched = fastdiff.DDIMScheduler()
    with pytest.raises(
        FloatingPointError, match=r"check_finite: step 3 of 6 \(timestep \d+\): the model output holds 1 NaN"
    ):
        fastdiff.sample(
            NaNAfter(3), sched, shape=(2, 3, 4, 4), num_inference_steps=6, seed=0, progress=False, check_finite=True
        )
    # without the check, the NaN spreads silently (the reason for the option)
    x = fastdiff.sample(NaNAfter(3), sched, shape=(2, 3, 4, 4), num_inference_steps=6, seed=0, progress=False)
    assert torch.isnan(x).any()


@pytest.mark.filterwarnings(
    "ignore:overflow encountered:RuntimeWarning", "ignore:invalid value encountered:RuntimeWarning"
)
def test_check_finite_names_a_step_that_overflows():
    """A finite but huge model output: the step's own arithmetic overflows (x0 = (x - sqrt(1 - abar) eps) /
    sqrt(abar) at abar ~ 4e-5), and the message says the model output was finite."""
    huge = lambda x, t: torch.full_like(x, 3e38)  # noqa: E731
    with pytest.raises(
        FloatingPointError,
        match=r"step 0 of 4.* the step.s result holds \d+ NaN and \d+ inf values, from a finite model output: the DDPM",
    ):
        fastdiff.sample(
            huge,
            fastdiff.DDPMScheduler(clip_sample=False),
            shape=(1, 3, 4, 4),
            num_inference_steps=4,
            seed=0,
            progress=False,
            check_finite=True,
        )


def test_check_finite_changes_nothing_when_finite():
    model = Calls()
    kw = dict(shape=(2, 3, 5, 3), num_inference_steps=5, seed=1, progress=False)
    a = fastdiff.sample(model, fastdiff.EulerAncestralDiscreteScheduler(), **kw)
    b = fastdiff.sample(model, fastdiff.EulerAncestralDiscreteScheduler(), check_finite=True, **kw)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_check_finite_refuses_nonfinite_latents():
    latents = torch.randn(1, 3, 4, 4)
    latents[0, 1, 2, 3] = float("inf")
    model = Calls()
    with pytest.raises(ValueError, match=r"`latents` holds 1 NaN or inf values of 48"):
        fastdiff.sample(model, fastdiff.DDIMScheduler(), latents=latents, num_inference_steps=3, check_finite=True)
    assert model.calls == 0


def test_graph_check_finite_counts_on_the_device_without_host_reads():
    """The captured program under check_finite: counts written by device ops inside the loop (no host read
    there), read once afterwards."""
    sampler = GraphSampler(
        NaNAfter(2),
        fastdiff.DDIMScheduler(),
        (1, 3, 4, 4),
        dtype=torch.float32,
        device="cpu",
        num_inference_steps=5,
        check_finite=True,
    )
    st = sampler._static_inputs((1, 3, 4, 4), torch.float32, 5, None, {})
    sampler._run(st)  # the uncaptured first pass (it builds the scheduler copy's device tables)
    sampler.model.calls = 0
    with torch.no_grad(), no_host_reads():
        sampler._run(st)  # the pass a capture records
    assert st.nonfinite.shape == (5, 4) and st.nonfinite.dtype == torch.int64
    with pytest.raises(FloatingPointError, match=r"step 2 of 5 .* the model output holds 1 NaN"):
        raise_if_nonfinite(st.nonfinite, st.scheduler)


class Scaled(torch.nn.Module):
    """model(x, t, s) = s * x: the scale is conditioning, so a replay reads a new one from the static buffer."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x, t, s):
        return s * x


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CUDA graph replay)")
def test_graph_sampler_check_finite_after_replay():
    sampler = GraphSampler(
        Scaled().cuda(),
        fastdiff.DDIMScheduler(),
        (2, 3, 4, 4),
        dtype=torch.float32,
        num_inference_steps=5,
        check_finite=True,
    )
    scale = lambda v: {"s": torch.full((2, 1, 1, 1), v, device="cuda")}  # noqa: E731
    assert torch.isfinite(sampler(seed=0, model_kwargs=scale(0.5))).all()  # captures
    with pytest.raises(FloatingPointError, match=r"step 0 of 5 .* the model output holds 0 NaN and 96 inf"):
        sampler(seed=0, model_kwargs=scale(float("inf")))  # a replay: no Python ran inside the loop
    assert sampler.num_graphs == 1
    assert torch.isfinite(sampler(seed=1, model_kwargs=scale(0.5))).all()  # the counts are rewritten per replay
