"""The command line: `fastdiff sample` end to end on the embedded model, and its errors."""

import json
import subprocess
import sys

import numpy as np
import pytest


def run(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "fastdiff", *args], capture_output=True, text=True, cwd=cwd, timeout=600
    )


def test_doctor():
    r = run("doctor")
    assert r.returncode == 0, r.stderr
    assert "backends on cpu" in r.stdout and "reference" in r.stdout


def test_sample_writes_grid_and_array(tmp_path):
    png, npy = tmp_path / "grid.png", tmp_path / "samples.npy"
    r = run("sample", "-n", "6", "--steps", "5", "--out", str(png), "--save-array", str(npy), "-q")
    assert r.returncode == 0, r.stderr
    assert "images/s" in r.stdout and "backend" in r.stdout
    arr = np.load(npy)
    assert arr.shape == (6, 1, 16, 16) and arr.dtype == np.float32
    assert arr.min() >= 0 and arr.max() <= 1 and arr.std() > 0.05
    from PIL import Image

    assert Image.open(png).size[0] > 16 * 2


def test_sample_guided_labels(tmp_path):
    npy = tmp_path / "g.npy"
    r = run(
        "sample",
        "-n",
        "4",
        "--steps",
        "4",
        "--guidance",
        "2.0",
        "--labels",
        "3,7",
        "--sampler",
        "dpm++2m",
        "--save-array",
        str(npy),
        "-q",
    )
    assert r.returncode == 0, r.stderr
    assert np.load(npy).shape == (4, 1, 16, 16)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sampler", "plms"], "invalid choice: 'plms'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "2000"], "--steps 2000"),
        (["--out", "/nonexistent-dir/x.png"], "does not exist"),
        (["--labels", "3,11"], "digits must be 0..9"),
        (["--eta", "1", "--sampler", "euler"], "--eta applies to --sampler ddim"),
        (["--graph", "on", "--device", "cpu"], "--graph on needs a CUDA GPU"),
    ],
)
def test_sample_errors_are_clear(args, message, tmp_path):
    r = run("sample", "-n", "2", "--steps", "3", "-q", *args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def test_model_folder_that_is_not_a_diffusion_model(tmp_path):
    folder = tmp_path / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    r = run("sample", "--model", str(folder), "-n", "1", "--steps", "2", "-q", cwd=tmp_path)
    assert r.returncode == 2 and "not a UNet2DModel" in r.stderr and "Traceback" not in r.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    r = run("sample", "--model", str(empty), "-n", "1", "--steps", "2", "-q", cwd=tmp_path)
    assert r.returncode == 2 and "not a diffusers model folder" in r.stderr


def test_sample_local_unet_folder(tmp_path):
    pytest.importorskip("diffusers")
    from test_pipelines import tiny_unet

    unet = tiny_unet()
    unet.save_pretrained(tmp_path / "unet")
    npy = tmp_path / "u.npy"
    r = run(
        "sample",
        "--model",
        str(tmp_path / "unet"),
        "-n",
        "2",
        "--steps",
        "3",
        "--save-array",
        str(npy),
        "-q",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    assert np.load(npy).shape == (2, 3, 8, 8)
