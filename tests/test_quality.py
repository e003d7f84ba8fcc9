"""The embedded digits model samples real digits through fastdiff (the issue's quality bar), and the judge is
calibrated: confident on real digits, not on noise."""

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.models import SCHEDULER_CONFIG, load_default_model, to_unit_range

quality = pytest.importorskip("fastdiff.quality")
pytest.importorskip("sklearn")


@pytest.fixture(autouse=True)
def _as_a_user_runs_it(monkeypatch):
    """The model's quality, not the kernels (the equivalence tests cover those): `auto` picks what a user's CPU
    runs, not the Triton interpreter conftest enables (3.5x slower here: 354 s against 102 s for the DDIM 50 run
    on a loaded machine)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.mark.long  # fits the judge's classifier: 30 s on this 2-core machine
def test_judge_is_calibrated():
    cal = quality.calibration()
    for way in ("8x8", "bilinear"):
        assert cal[way]["accuracy"] > 0.95 and cal[way]["mean_top_prob"] > 0.9, cal
    noise = np.random.default_rng(0).random((200, 1, 16, 16)).astype(np.float32)
    assert quality.judge(noise)["mean_top_prob"] < 0.5


@pytest.mark.long  # 200 samples x 50 steps of the model: 100-265 s on this 2-core machine
def test_ddim50_samples_are_confident_digits_of_every_class():
    model = load_default_model()
    sched = fastdiff.DDIMScheduler.from_config(SCHEDULER_CONFIG, timestep_spacing="trailing")
    x = fastdiff.sample(model, sched, shape=(200, 1, 16, 16), seed=0, num_inference_steps=50, progress=False)
    q = quality.judge(to_unit_range(x).numpy())
    assert q["mean_top_prob"] >= 0.8, q
    assert q["min_class_fraction"] >= 0.04, q  # every digit well represented (uniform is 10%)
    assert all(c > 0 for c in q["class_counts"])


@pytest.mark.long  # 40 doubled samples x 30 steps
def test_guided_samples_follow_their_labels():
    model = load_default_model()
    sched = fastdiff.DDIMScheduler.from_config(SCHEDULER_CONFIG, timestep_spacing="trailing")
    labels = torch.arange(40) % 10
    x = fastdiff.sample(
        model,
        sched,
        shape=(40, 1, 16, 16),
        seed=1,
        num_inference_steps=30,
        progress=False,
        guidance_scale=3.0,
        model_kwargs={"class_labels": labels},
        uncond_kwargs={"class_labels": torch.full_like(labels, 10)},
        step_kwargs={"use_clipped_model_output": True},
    )
    predicted = quality.predict(to_unit_range(x).numpy())
    assert (predicted == labels.numpy()).mean() >= 0.9
