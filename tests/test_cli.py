"""The command line: `fastdiff sample` end to end on the embedded model, and its errors (every argument checked
before a model is loaded; outputs written whole or not at all). `fastdiff generate` is in test_generate.py."""

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastdiff import cli


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
    args = ["-n", "4", "--steps", "4", "--guidance", "2.0", "--labels", "3,7", "--sampler", "dpm++2m"]
    code, _, err = main("sample", *args, "--backend", "reference", "--save-array", str(npy), "-q")
    assert code == 0, err
    assert np.load(npy).shape == (4, 1, 16, 16)


def test_model_folder_that_is_not_a_diffusion_model(no_model):
    folder = no_model / "not-a-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    code, _, err = main("sample", "--model", str(folder), "-n", "1", "--steps", "2", "-q")
    assert code == 2 and "not a UNet2DModel" in err and "Traceback" not in err
    empty = no_model / "empty"
    empty.mkdir()
    code, _, err = main("sample", "--model", str(empty), "-n", "1", "--steps", "2", "-q")
    assert code == 2 and "not a diffusers model folder" in err


def test_sample_local_unet_folder(tmp_path):
    pytest.importorskip("diffusers")
    from test_pipelines import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "unet")
    npy = tmp_path / "u.npy"
    args = ["--model", str(tmp_path / "unet"), "-n", "2", "--steps", "3", "--backend", "reference", "-q"]
    code, _, err = main("sample", *args, "--save-array", str(npy))
    assert code == 0, err
    assert np.load(npy).shape == (2, 3, 8, 8)


# ----------------------------------------------------------------------------------------------- in process


@pytest.fixture
def no_model(monkeypatch, tmp_path):
    """Run in an empty folder; loading a model fails the test (errors must come before it)."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(cli, "_load_model", load)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def main(*args):
    """(exit code, stdout, stderr) of the command line in this process."""
    out, err = io.StringIO(), io.StringIO()
    saved, threads = (sys.stdout, sys.stderr), torch.get_num_threads()
    sys.stdout, sys.stderr = out, err
    try:
        code = cli.main(list(args))
    except SystemExit as exc:  # argparse
        code = exc.code
    finally:
        sys.stdout, sys.stderr = saved
        torch.set_num_threads(threads)  # --threads must not leak into the next test
    return code, out.getvalue(), err.getvalue()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--sampler", "heun"], "invalid choice: 'heun'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--steps", "2000"], "--steps 2000"),
        (["--out", "/nonexistent-dir/x.png"], "does not exist"),
        (["--out", "grid.txt"], "--out grid.txt: the extension '.txt' names no image format"),
        (["--out", "grid"], "--out grid: no extension names no image format"),
        (["--out", "."], "is a folder"),
        (["--save-array", "samples.npz"], "--save-array samples.npz: expected a .npy file name"),
        (["--labels", "3,11"], "digits must be 0..9"),
        (["--eta", "1", "--sampler", "euler"], "--eta applies to --sampler ddim"),
        (["--eta", "-7"], "--eta must be >= 0, got -7"),
        (["--eta", "nan"], "--eta must be a finite number, got 'nan'"),
        (["--guidance", "nan"], "--guidance must be a finite number, got 'nan'"),
        (["--guidance", "inf"], "--guidance must be a finite number, got 'inf'"),
        (["--threads", "0"], "--threads must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--graph", "on", "--device", "cpu"], "--graph on needs a CUDA GPU"),
        (["-n", "100000000"], "-n 100000000: keeping the samples needs 95.4 GiB"),
    ],
)
def test_sample_arguments_checked_before_the_model_loads(no_model, args, message):
    code, out, err = main("sample", "-n", "2", "--steps", "3", "-q", *args)
    assert code == 2, (out, err)
    assert message in err, err
    assert "Traceback" not in err
    assert list(no_model.iterdir()) == [], "a failed run left files behind"


def test_huge_n_names_the_memory_and_the_way_out(no_model, monkeypatch):
    monkeypatch.setattr(cli, "_available_memory", lambda: 8 * 2**30)
    code, _, err = main("sample", "-n", "10000000", "-q")
    assert code == 2
    assert re.search(r"needs 9\.5 GiB .* and the --out grid .*, more than the 8\.0 GiB of memory available", err), err
    assert "--batch-size" in err and "fastdiff generate" in err


def test_judge_without_scikit_learn(no_model, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # `import sklearn` raises ImportError
    code, _, err = main("sample", "-n", "2", "--judge")
    assert code == 2 and "--judge needs scikit-learn: pip install 'fastdiff[quality]'" in err, err


def test_generate_arguments_checked_before_the_model_loads(no_model):
    (no_model / "a-file").write_text("")
    for args, message in [
        (["--out-dir", "a-file"], "--out-dir a-file: is a file"),
        (["--out-dir", "missing/job"], "does not exist"),
        (["--out-dir", "job", "--labels", "x"], "expected 'all' or digits"),
        (["--out-dir", "job", "--guidance", "nan"], "--guidance must be a finite number"),
    ]:
        code, _, err = main("generate", "--num", "4", *args)
        assert code == 2 and message in err, (args, err)
    assert sorted(p.name for p in no_model.iterdir()) == ["a-file"]


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    """Sampling succeeded, writing the array failed (a full disk): neither the grid nor a temporary file stays."""
    monkeypatch.chdir(tmp_path)

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", full_disk)
    args = ["-n", "2", "--steps", "2", "--backend", "reference", "-q", "--out", "g.png", "--save-array", "s.npy"]
    code, _, err = main("sample", *args)
    assert code == 1 and "No space left on device" in err, err
    assert list(tmp_path.iterdir()) == []


def test_unloadable_model_leaves_nothing(tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "unet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel", "sample_size": 8, "in_channels": 3}))
    code, _, err = main("sample", "--model", str(folder), "-n", "1", "--steps", "2", "-q", "--save-array", "s.npy")
    assert code == 2 and "cannot load it as a diffusion model" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["unet"]


def test_version():
    from fastdiff import __version__

    code, out, _ = main("--version")
    assert code == 0 and out.strip() == f"fastdiff {__version__}"


@pytest.mark.parametrize("command", ["sample", "generate", "bench"])
def test_help_shows_every_default(command):
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, cli.argparse._SubParsersAction)).choices[command]
    code, out, _ = main(command, "--help")
    assert code == 0
    text = " ".join(out.split())  # the help is wrapped
    shown = 0
    for action in sub._actions:
        default = action.default
        if action.option_strings and default is not None and default is not False and default != cli.argparse.SUPPRESS:
            assert f"(default: {action.default})" in text, f"{command} {action.option_strings[0]}"
            shown += 1
    # --sampler's default depends on --model (ddim; flow-euler for digits-flow), so its help names both instead
    assert shown >= {"sample": 7, "generate": 7, "bench": 0}[command]


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    for load, expected in [(0.2, 2), (1.7, 1), (6.0, 1)]:
        monkeypatch.setattr(cli.os, "getloadavg", lambda load=load: (load, load, load))
        assert cli.default_threads() == expected, load


def test_threads_batches_and_plain_progress(tmp_path, monkeypatch):
    """--threads is applied and reported; a large -n runs in automatic batches; with stderr not a terminal the
    progress is whole lines (no carriage returns)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FASTDIFF_PROGRESS_INTERVAL", "0")
    args = ["-n", "300", "--steps", "1", "--threads", "1", "--backend", "reference", "--save-array", "s.npy"]
    code, out, err = main("sample", *args)
    assert code == 0, err
    assert "on cpu, 1 thread [" in out and "2 batches of 256" in out, out
    assert np.load(tmp_path / "s.npy").shape == (300, 1, 16, 16)
    assert "\r" not in err
    lines = r"sample: 1/2 steps \(50%\), .* left\nsample: 2/2 steps \(100%\), .*\nsample: 2/2 steps in \d+:\d\d, .*/s\n"
    assert re.fullmatch(lines, err), err


def test_progress_draws_a_bar_on_a_terminal():
    from fastdiff.progress import NullProgress, PlainProgress, progress

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term, log = Terminal(), io.StringIO()
    with progress(5, desc="x", unit="images", stream=term) as bar:
        bar.update(5)
    assert "\r" in term.getvalue() and "5/5" in term.getvalue()
    with progress(5, desc="x", unit="images", stream=log, interval=3600) as bar:
        assert isinstance(bar, PlainProgress)
        for _ in range(5):
            bar.update(1)
    lines = log.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("x: 1/5 images (20%)") and lines[1].startswith("x: 5/5 images in")
    assert isinstance(progress(5, desc="x", enabled=False), NullProgress)


def test_torchrun_separator_is_dropped():
    assert cli._drop_separator(["generate", "--", "--num", "8"]) == ["generate", "--num", "8"]
    assert cli._drop_separator(["generate", "--num", "8"]) == ["generate", "--num", "8"]
    args = cli.build_parser().parse_args(cli._drop_separator(["generate", "--", "--num", "8", "--out-dir", "d"]))
    assert (args.num, args.out_dir) == (8, "d")
