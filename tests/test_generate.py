"""fastdiff.generate / `fastdiff generate`: the same samples for 1, 2 or 3 processes, resumable after Ctrl-C or a
killed rank, unchanged by a re-run, a different job refused.

Most tests run a tiny conv denoiser with DPM-Solver++ (its multistep history must not leak between chunks) on
the reference backend: the backend is not under test here and Triton's interpreter costs ~0.2 s per step. The CLI
tests run the embedded digits model as a user would (no TRITON_INTERPRET: `auto` is the reference on the CPU).
"""

import hashlib
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import fastdiff
from fastdiff.generate import GOLDEN64, chunk_seeds, load_samples, mix64, sample_seed

ROOT = Path(__file__).resolve().parents[1]
NUM, BATCH, SHAPE, STEPS = 22, 4, (3, 5, 6), 3  # 6 chunks, the last one partial (2 of 4 rows kept)
LABELS, NULL = (3, 1, 4), 10


class TinyDenoiser(torch.nn.Module):
    """A class-conditional eps model: one conv, a label embedding, a timestep factor. Fixed weights (seeded), so
    every process builds the same model. With ``die_at_call`` the process SIGKILLs itself on that forward call:
    a rank dying mid-chunk."""

    def __init__(self, die_at_call=None):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.emb = torch.nn.Embedding(NULL + 1, 3)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.die_at_call, self.calls = die_at_call, 0

    def forward(self, x, t, class_labels=None):
        self.calls += 1
        if self.calls == self.die_at_call:
            os.kill(os.getpid(), signal.SIGKILL)
        h = torch.tanh(self.conv(x)) * torch.cos(t.float() / 1000)
        if class_labels is not None:
            h = h + self.emb(class_labels)[:, :, None, None]
        return h


def scheduler():
    return fastdiff.DPMSolverMultistepScheduler(backend="reference")


def run_job(out_dir, model=None, **overrides):
    kwargs = dict(
        shape=SHAPE,
        seed=11,
        batch_size=BATCH,
        num_inference_steps=STEPS,
        guidance_scale=2.0,
        labels=LABELS,
        null_label=NULL,
        progress=False,
    )
    kwargs.update(overrides)
    num = kwargs.pop("num", NUM)
    return fastdiff.generate(model or TinyDenoiser(), scheduler(), num, out_dir, **kwargs)


@pytest.fixture(autouse=True)
def _one_thread():
    """Every process of a job runs one torch thread (a CPU forward's rounding can depend on the thread count)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """samples.npz of the job run in this process, as bytes."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("reference")
    run_job(out)
    torch.set_num_threads(saved)
    return (out / "samples.npz").read_bytes()


def _worker(rank, world, init_file, out_dir, die_at_call):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = TinyDenoiser(die_at_call if rank == world - 1 else None)
        result = run_job(out_dir, model)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps([result.world_size, result.generated, model.calls]))
    finally:
        dist.destroy_process_group()


def spawn(world, out_dir, tmp_path, die_at_call=None):
    init = tmp_path / f"init-{world}-{time.monotonic_ns()}"
    torch.multiprocessing.spawn(_worker, args=(world, str(init), str(out_dir), die_at_call), nprocs=world, join=True)


def snapshot(folder: Path) -> dict:
    """{relative path: (sha256, mtime_ns)} of every file under ``folder``."""
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# ----------------------------------------------------------------------------------------------- seeds


def test_sample_seed_is_splitmix64():
    # SplitMix64 started at state 0 returns 0xE220A8397B1DCDAF first (Vigna's splitmix64.c)
    assert mix64(GOLDEN64) == 0xE220A8397B1DCDAF
    s = sample_seed(5, 3)
    assert s == mix64((mix64(5) + 4 * GOLDEN64) % 2**64) - (2**64 if s < 0 else 0)
    seeds = {(S, i): sample_seed(S, i) for S in range(-3, 30) for i in range(300)}
    assert len(set(seeds.values())) == len(seeds), "two (seed, index) pairs share a Philox seed"
    assert all(-(2**63) <= v < 2**63 for v in seeds.values())
    assert all(seeds[S, 1] != seeds[S + 1, 0] for S in range(-3, 29))
    assert chunk_seeds(5, 8, 4).tolist() == [sample_seed(5, i) for i in range(8, 12)]


# ----------------------------------------------------------------------------------------------- processes


def test_one_process_matches_a_hand_run_chunk(reference):
    """The file holds each chunk exactly as fastdiff.sample makes it from the documented seeds and labels, in
    index order; the labels come back in order."""
    data = np.load(io.BytesIO(reference))
    images, labels = data["arr_0"], data["arr_1"]
    assert images.shape == (NUM, SHAPE[1], SHAPE[2], SHAPE[0]) and images.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.tolist() == [LABELS[i % 3] for i in range(NUM)]
    assert len({images[i].tobytes() for i in range(NUM)}) == NUM and images.std() > 20
    model = TinyDenoiser()
    for k in (0, 5):  # the first chunk and the partial last one (rows 20, 21 of 20..23)
        idx = list(range(k * BATCH, (k + 1) * BATCH))
        y = torch.tensor([LABELS[i % 3] for i in idx])
        x = fastdiff.sample(
            model,
            scheduler(),
            shape=(BATCH, *SHAPE),
            seed=[sample_seed(11, i) for i in idx],
            num_inference_steps=STEPS,
            guidance_scale=2.0,
            model_kwargs={"class_labels": y},
            uncond_kwargs={"class_labels": torch.full_like(y, NULL)},
            progress=False,
        )
        expected = ((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        rows = [i for i in idx if i < NUM]
        np.testing.assert_array_equal(images[rows], expected[: len(rows)], err_msg=f"chunk {k}")


@pytest.mark.long  # torchrun / process starts: 35-60 s each on this 2-core machine
@pytest.mark.parametrize("world", [2, 3])
def test_processes_give_the_identical_file(tmp_path, reference, world):
    out = tmp_path / "out"
    spawn(world, out, tmp_path)
    got = (out / "samples.npz").read_bytes()
    assert got == reference, f"{world} processes: samples.npz differs from one process's"
    chunks = -(-NUM // BATCH)
    for rank in range(world):  # each rank ran its round-robin share of the chunks, and counted everyone's samples
        size, generated, calls = json.loads((out / f"rank{rank}.json").read_text())
        assert (size, generated, calls) == (world, NUM, len(range(rank, chunks, world)) * STEPS)


@pytest.mark.long  # torchrun / process starts: 35-60 s each on this 2-core machine
def test_killed_rank_resumes_to_the_identical_file(tmp_path, reference):
    out = tmp_path / "out"
    # rank 1 of 2 finishes chunk 1 (3 model calls), then dies on the second call of chunk 3
    with pytest.raises(torch.multiprocessing.ProcessExitedException):
        spawn(2, out, tmp_path, die_at_call=STEPS + 2)
    chunks = sorted(p.name for p in (out / "chunks").iterdir())
    assert "00000001.npy" in chunks and "00000003.npy" not in chunks and not (out / "samples.npz").exists()
    result = run_job(out)
    assert result.generated == NUM - sum(min(BATCH, NUM - int(c[:8]) * BATCH) for c in chunks if c.endswith(".npy"))
    assert (out / "samples.npz").read_bytes() == reference


def test_temporary_files_never_count(tmp_path, reference):
    out = tmp_path / "out"
    run_job(out, num=NUM)
    (out / "samples.npz").unlink()
    (out / "chunks" / "00000002.npy").unlink()
    stray = out / "chunks" / ".00000002.npy.999.tmp"
    stray.write_bytes(b"\x93NUMPY half a file")  # what a process killed mid-write leaves
    result = run_job(out)
    assert result.generated == BATCH and not stray.exists()
    assert (out / "samples.npz").read_bytes() == reference


def test_finished_job_rerun_changes_nothing(tmp_path):
    out = tmp_path / "out"
    run_job(out, png=True)
    before = snapshot(out)
    result = run_job(out, png=True)
    assert result.generated == 0
    assert snapshot(out) == before


@pytest.mark.parametrize(
    "change,field",
    [(dict(seed=12), "seed"), (dict(batch_size=8), "batch_size"), (dict(num=23), "num"), (dict(labels=(1,)), "labels")],
)
def test_a_different_job_is_refused(tmp_path, change, field):
    out = tmp_path / "out"
    run_job(out, num=8)
    before = snapshot(out)
    with pytest.raises(ValueError, match=rf"holds a different job \(.*{field}: "):
        run_job(out, **{"num": 8, **change})
    assert snapshot(out) == before


def test_thread_count_is_part_of_the_job(tmp_path):
    out = tmp_path / "out"
    run_job(out, num=4)
    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="cpu_threads: 1 there, 2 now"):
        run_job(out, num=4)


def test_sample_i_does_not_depend_on_num(tmp_path):
    run_job(tmp_path / "n96", num=96, batch_size=8)
    run_job(tmp_path / "n24", num=24, batch_size=8)
    run_job(tmp_path / "n21", num=21, batch_size=8)  # a partial last chunk still runs 8 rows
    big = load_samples(tmp_path / "n96")
    np.testing.assert_array_equal(load_samples(tmp_path / "n24"), big[:24])
    np.testing.assert_array_equal(load_samples(tmp_path / "n21"), big[:21])
    assert not np.array_equal(big[24:48], big[:24])


def test_png_per_sample(tmp_path):
    from PIL import Image

    out = tmp_path / "out"
    run_job(out, num=6, png=True)
    images = load_samples(out)
    pngs = sorted((out / "png").iterdir())
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    for i, p in enumerate(pngs):
        np.testing.assert_array_equal(np.asarray(Image.open(p)), images[i])


def test_nonfinite_output_writes_nothing(tmp_path):
    class NaNModel(TinyDenoiser):
        def forward(self, x, t, class_labels=None):
            return super().forward(x, t, class_labels) * float("nan")

    out = tmp_path / "out"
    with pytest.raises(FloatingPointError, match=r"chunk 0 \(samples 0\.\.3\).*NaN or inf"):
        run_job(out, model=NaNModel())
    assert list((out / "chunks").iterdir()) == []


def test_unfinished_job_has_no_samples(tmp_path):
    with pytest.raises(FileNotFoundError, match="has not finished"):
        load_samples(tmp_path)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(shape=(2, 3, 5, 6)), "one sample's"),
        (dict(batch_size=0), "`batch_size` must be >= 1"),
        (dict(guidance_scale=float("nan")), "finite"),
        (dict(null_label=None), "needs `labels`"),
        (dict(labels=()), "`labels` is empty"),
        (dict(shape=(2, 5, 6), png=True), "`png=True` writes 1, 3 or 4 channels"),
    ],
)
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        run_job(tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_digits_sample_does_not_depend_on_its_batch_position():
    """Philox is keyed per sample and the model treats rows alike: permuting the seeds of a batch permutes its
    samples exactly (the batch size stays, so the float forward is the same computation per row)."""
    from fastdiff.models import digits

    model = digits.load_default_model()
    sched = fastdiff.DDIMScheduler(**digits.SCHEDULER_CONFIG, backend="reference")
    seeds = [sample_seed(3, i) for i in range(8)]
    perm = torch.randperm(8).tolist()
    y = torch.arange(8) % 10
    a = fastdiff.sample(
        model,
        sched,
        shape=(8, 1, 16, 16),
        seed=seeds,
        num_inference_steps=3,
        progress=False,
        model_kwargs={"class_labels": y},
    )
    b = fastdiff.sample(
        model,
        sched,
        shape=(8, 1, 16, 16),
        seed=[seeds[p] for p in perm],
        num_inference_steps=3,
        progress=False,
        model_kwargs={"class_labels": y[perm]},
    )
    assert torch.equal(a[perm], b), f"max |diff| {(a[perm] - b).abs().max():.3e}"


# ----------------------------------------------------------------------------------------------- command line

# --backend reference is what `auto` picks on a CPU without TRITON_INTERPRET; naming it lets this test process
# (where conftest sets TRITON_INTERPRET) run the same job in-process, without paying a process start (~4 s here)
CLI_JOB = [
    "--num",
    "40",
    "--batch-size",
    "8",
    "--steps",
    "8",
    "--labels",
    "all",
    "--guidance",
    "2",
    "--backend",
    "reference",
]


def cli_env(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # a user's environment
    env.update(FASTDIFF_PROGRESS_INTERVAL="0", **extra)
    return env


def fastdiff_in_process(*args) -> int:
    from fastdiff.cli import main

    saved = torch.get_num_threads()
    try:
        return main(list(args))
    finally:
        torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def cli_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "one"
    assert fastdiff_in_process("generate", *CLI_JOB, "--out-dir", str(out), "-q") == 0
    return (out / "samples.npz").read_bytes()


def readme_torchrun_command() -> list:
    """The single-node torchrun command of the README, as written."""
    text = (ROOT / "README.md").read_text()
    found = re.findall(r"^torchrun --standalone --nproc_per_node=\d+ -m fastdiff generate -- .*$", text, flags=re.M)
    assert found, "README: no `torchrun --standalone --nproc_per_node=P -m fastdiff generate -- ...` line"
    return found[0].split("#")[0].split()


@pytest.mark.long  # torchrun / process starts: 35-60 s each on this 2-core machine
def test_readme_torchrun_command_as_written(tmp_path, cli_reference):
    """The README's command (2 processes, this job's settings appended: later options win) gives the same file as
    one process; rank 0 shows the progress of both ranks, in plain lines when piped."""
    cmd = readme_torchrun_command()
    cmd[2] = "--nproc_per_node=2"
    out = tmp_path / "two"
    torchrun = Path(sys.executable).parent / "torchrun"  # this environment's, like the user's on PATH
    cmd = [str(torchrun), *cmd[1:], *CLI_JOB, "--out-dir", str(out)]
    r = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "samples.npz").read_bytes() == cli_reference
    assert "generate: 16/40 images" in r.stderr and "generate: 40/40 images" in r.stderr, r.stderr
    assert "\r" not in r.stderr
    assert "on 2 processes" in r.stdout


@pytest.mark.long  # torchrun / process starts: 35-60 s each on this 2-core machine
def test_ctrl_c_resumes_to_the_identical_file(tmp_path, cli_reference, capsys):
    out = tmp_path / "job"
    args = ["generate", *CLI_JOB, "--out-dir", str(out)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastdiff", *args],
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    chunks = out / "chunks"
    deadline = time.monotonic() + 120
    while not (chunks.is_dir() and any(p.suffix == ".npy" for p in chunks.iterdir())):
        assert proc.poll() is None and time.monotonic() < deadline, "no chunk written"
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    done = [p for p in chunks.iterdir() if p.suffix == ".npy"]
    assert 1 <= len(done) < 5 and not (out / "samples.npz").exists()
    assert not [p for p in chunks.iterdir() if p.name.endswith(".tmp")]
    capsys.readouterr()
    assert fastdiff_in_process(*args, "-q") == 0  # the same command again: resumes
    assert f"{40 - 8 * len(done)} made by this run" in capsys.readouterr().out
    assert (out / "samples.npz").read_bytes() == cli_reference
    # the same folder with another seed: refused, naming the difference
    assert fastdiff_in_process(*args, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "seed: 0 there, 1 now" in err and "Traceback" not in err


def test_local_diffusers_unet_folder(tmp_path, capsys):
    pytest.importorskip("diffusers")
    from test_pipelines import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "unet")
    args = ["generate", "--model", str(tmp_path / "unet"), "--num", "3", "--batch-size", "2", "--steps", "2"]
    assert fastdiff_in_process(*args, "--backend", "reference", "--out-dir", str(tmp_path / "job"), "-q") == 0
    images = load_samples(tmp_path / "job")
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8 and images.std() > 0
    assert "3 made by this run" in capsys.readouterr().out
