"""Many samples on many processes: :func:`generate` and :func:`load_samples`, the engine of ``fastdiff generate``.

The guarantee: sample i depends only on (seed, i), the batch size and the job's settings; never on the number
of processes, the rank that ran it, or how often the job was interrupted and resumed. Three rules give it:

1. **A seed per sample.** Sample i draws all its noise with Philox keyed on :func:`sample_seed` (seed, i), the
   i-th output of a SplitMix64 generator started at ``mix64(seed)``, so neighbouring seeds give unrelated
   streams (seed S sample 1 and seed S+1 sample 0 differ) and nothing else enters a sample's noise.
2. **Fixed chunks.** Chunk k holds the indices kB..kB+B-1 and always runs as one batch of B, whichever rank
   runs it: a model's floating-point forward can change with the batch size (the digits UNet on the CPU gives
   a few different uint8 samples between batch 1, 8 and 24; README), so B belongs to the job like its seed.
   The last chunk also runs B rows; those past ``num`` are computed and dropped, so sample i of a 24-sample
   job is sample i of a 96-sample job.
3. **Atomic files.** A finished chunk is written to a temporary file and renamed, so a killed process leaves
   nothing that counts as done; a re-run skips finished chunks. ``manifest.json`` holds the job's identity
   and a different job for the same folder is refused, naming what differs.

Layout of ``out_dir``::

    manifest.json          {"format": ..., "job": {identity}, "info": {versions, first run}}
    chunks/00000000.npy    uint8 (n, H, W, C): the samples of chunk 0 (n = B, fewer in the last chunk)
    samples.npz            arr_0 uint8 (num, H, W, C) in index order; arr_1 int64 (num,) labels when given
    png/000000.png         one image per sample with ``png=True``

Ranks split the chunks still to do round-robin and report after each round (one ``all_reduce``), which is
what rank 0's progress bar counts. Every rank writes its own chunk files, so on several nodes ``out_dir``
must be a folder that all of them see.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

FORMAT = "fastdiff-generate/1"
MANIFEST = "manifest.json"
SAMPLES = "samples.npz"
CHUNKS = "chunks"
PNGS = "png"
_TMP = ".tmp"

MASK64 = (1 << 64) - 1
GOLDEN64 = 0x9E3779B97F4A7C15  # SplitMix64's increment, 2^64 / golden ratio
# labels are stored in the manifest as a list up to this length, as a hash beyond it
_LABELS_INLINE = 64


# ----------------------------------------------------------------------------------------------- seeds


def mix64(x: int) -> int:
    """SplitMix64's finaliser (Steele, Lea, Flood 2014; the constants of Vigna's splitmix64.c): a bijection
    of 64-bit integers in which every input bit flips about half the output bits."""
    x &= MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def sample_seed(seed: int, index: int) -> int:
    """The Philox seed of sample ``index`` of a job seeded ``seed``, as a signed int64.

    It is output ``index`` (from 0) of a SplitMix64 generator whose state starts at ``mix64(seed mod 2^64)``:
    ``mix64(mix64(seed) + (index + 1) * 0x9E3779B97F4A7C15 mod 2^64)``. Mixing the seed first keeps jobs with
    nearby seeds apart: ``sample_seed(S, 1) != sample_seed(S + 1, 0)``.
    """
    state = (mix64(seed) + (index + 1) * GOLDEN64) & MASK64
    value = mix64(state)
    return value - (1 << 64) if value >= 1 << 63 else value


def chunk_seeds(seed: int, start: int, count: int) -> torch.Tensor:
    """int64 (count,): :func:`sample_seed` for the indices start..start+count-1."""
    return torch.tensor([sample_seed(seed, i) for i in range(start, start + count)], dtype=torch.int64)


# ----------------------------------------------------------------------------------------------- job


class JobMismatchError(ValueError):
    """``out_dir`` holds another job (the message names what differs) or the ranks disagree on the job."""


@dataclass(frozen=True)
class GenerateResult:
    """What :func:`generate` did: ``path`` of samples.npz, ``num`` samples in it, ``generated`` of them made by
    this call (over all ranks), ``seconds`` it took and the ``world_size`` it ran on."""

    path: str
    num: int
    generated: int
    seconds: float
    world_size: int


@dataclass(frozen=True)
class _Job:
    """A validated job: the settings every chunk needs."""

    out_dir: str
    num: int
    batch_size: int
    seed: int
    shape: tuple
    steps: int
    guidance_scale: Optional[float]
    guidance_rescale: float
    labels: Optional[tuple]
    label_key: str
    null_label: Optional[int]
    step_kwargs: dict
    png: bool

    @property
    def num_chunks(self) -> int:
        return math.ceil(self.num / self.batch_size)

    def rows(self, k: int) -> int:
        """How many of chunk k's rows are samples of the job (the rest are dropped)."""
        return min(self.batch_size, self.num - k * self.batch_size)

    def labels_for(self, start: int, count: int) -> list:
        return [self.labels[i % len(self.labels)] for i in range(start, start + count)]


def _check_int(name: str, value, minimum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}")
    return int(value)


def _check_labels(labels, guidance_scale, null_label) -> Optional[tuple]:
    if guidance_scale is not None:
        if not math.isfinite(float(guidance_scale)):
            raise ValueError(f"`guidance_scale` must be a finite number, got {guidance_scale!r}")
        if labels is None or null_label is None:
            raise ValueError(
                "`guidance_scale` needs `labels` (the class of each sample) and `null_label` (the unconditional class)"
            )
    if labels is None:
        return None
    values = tuple(_check_int("labels[]", v) for v in np.asarray(labels).reshape(-1).tolist())
    if not values:
        raise ValueError("`labels` is empty; pass at least one label (they are cycled over the sample indices)")
    return values


def _check_shape(shape) -> tuple:
    shape = tuple(shape)
    if len(shape) != 3 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in shape):
        raise ValueError(
            f"`shape` must be one sample's (channels, height, width) with positive ints, got {shape!r}; "
            "the batch is `batch_size`"
        )
    return shape


# ----------------------------------------------------------------------------------------------- identity


def model_fingerprint(model) -> str:
    """sha256 of a module's parameters and buffers (names, dtypes, shapes and bytes), in hex."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(
            f"`model` is a {type(model).__name__}, not a torch.nn.Module, so its weights cannot be fingerprinted: "
            "pass `model_id`, a string that names the model and its weights"
        )
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.generic, np.ndarray)):
        return value.tolist()
    return repr(value)


def _normalised(obj) -> Any:
    """``obj`` as it reads back from JSON (tuples become lists, odd values their repr)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_jsonable))


def _labels_identity(labels: Optional[tuple]):
    if labels is None or len(labels) <= _LABELS_INLINE:
        return labels
    digest = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()
    return {"count": len(labels), "sha256": digest}


def _identity(job: _Job, scheduler, model_id: str, dtype, device, backend: str, job_info: Optional[dict]) -> dict:
    """Everything that decides the samples' values: a re-run must match it exactly."""
    config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
    return _normalised(
        {
            "num": job.num,
            "seed": job.seed,
            "batch_size": job.batch_size,
            "shape": job.shape,
            "model": model_id,
            "scheduler": type(scheduler).__name__,
            "scheduler_config": config,
            "steps": job.steps,
            "step_kwargs": job.step_kwargs,
            "guidance_scale": job.guidance_scale,
            "guidance_rescale": job.guidance_rescale,
            "labels": _labels_identity(job.labels),
            "label_key": job.label_key if job.labels is not None else None,
            "null_label": job.null_label,
            "dtype": str(dtype).replace("torch.", ""),
            "device": device.type,
            "backend": backend,
            # a CPU forward's float results can change with the thread count (the digits UNet at batch 1 and 8:
            # up to 1.4e-6 between 1 and 2 threads), so on the CPU it is part of the job
            "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
            "job_info": job_info or {},
        }
    )


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 80 else f"{text[:60]}... (sha256 {hashlib.sha256(text.encode()).hexdigest()[:12]})"


def _mismatch(stored: dict, wanted: dict) -> list[str]:
    keys = sorted(set(stored) | set(wanted))
    return [
        f"{k}: {_short(stored.get(k))} there, {_short(wanted.get(k))} now"
        for k in keys
        if stored.get(k) != wanted.get(k)
    ]


# ----------------------------------------------------------------------------------------------- files


def _chunk_path(out_dir: str, k: int) -> str:
    return os.path.join(out_dir, CHUNKS, f"{k:08d}.npy")


def _png_path(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, PNGS, f"{index:06d}.png")


def atomic_write(path: str, write: Callable) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``:
    readers see the old file or the whole new one, never a part."""
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}{_TMP}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _remove_temporaries(folder: str) -> None:
    """Temporary files a killed process left behind (they never count as done)."""
    if os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith(".") and name.endswith(_TMP):
                os.remove(os.path.join(folder, name))


def _write_json(path: str, obj) -> None:
    atomic_write(path, lambda fh: fh.write((json.dumps(obj, indent=2, sort_keys=True) + "\n").encode()))


def _open_job(job: _Job, identity: dict) -> list[int]:
    """(rank 0) Create or check the manifest, clear temporaries, and list the chunks still to do."""
    for sub in (CHUNKS, PNGS if job.png else None):
        if sub:
            os.makedirs(os.path.join(job.out_dir, sub), exist_ok=True)
    path = os.path.join(job.out_dir, MANIFEST)
    if os.path.exists(path):
        with open(path) as fh:
            stored = json.load(fh)
        if stored.get("format") != FORMAT:
            raise ValueError(f"`out_dir` {job.out_dir}: {MANIFEST} has format {stored.get('format')!r}, not {FORMAT!r}")
        diffs = _mismatch(stored.get("job", {}), identity)
        if diffs:
            raise JobMismatchError(
                f"`out_dir` {job.out_dir} holds a different job ({'; '.join(diffs)}): use another folder, or the "
                "settings it was started with"
            )
    else:
        from ._version import __version__

        info = {
            "fastdiff": __version__,
            "torch": torch.__version__,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        _write_json(path, {"format": FORMAT, "job": identity, "info": info})
    for sub in (CHUNKS, PNGS):
        _remove_temporaries(os.path.join(job.out_dir, sub))
    done = set(os.listdir(os.path.join(job.out_dir, CHUNKS)))
    return [k for k in range(job.num_chunks) if os.path.basename(_chunk_path(job.out_dir, k)) not in done]


def _save_chunk(job: _Job, k: int, images: np.ndarray) -> None:
    if job.png:
        _write_pngs(job, k * job.batch_size, images)
    atomic_write(_chunk_path(job.out_dir, k), lambda fh: np.save(fh, images, allow_pickle=False))


def _write_pngs(job: _Job, start: int, images: np.ndarray, only_missing: bool = False) -> None:
    from PIL import Image

    for j, img in enumerate(images):
        path = _png_path(job.out_dir, start + j)
        if only_missing and os.path.exists(path):
            continue
        pil = Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img)
        atomic_write(path, lambda fh, pil=pil: pil.save(fh, format="PNG"))


def _load_chunk(job: _Job, k: int, image_shape: Optional[tuple]) -> np.ndarray:
    path = _chunk_path(job.out_dir, k)
    arr = np.load(path, allow_pickle=False)
    want = (job.rows(k), *image_shape) if image_shape else None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[0] != job.rows(k) or (want and arr.shape != want):
        raise ValueError(
            f"{path}: {arr.dtype} {arr.shape}, expected uint8 ({job.rows(k)}, H, W, C)"
            + (f" = {want}" if want else "")
            + "; delete it and re-run to make it again"
        )
    return arr


def _write_samples(job: _Job) -> str:
    """(rank 0) samples.npz from the chunk files, streamed one chunk at a time, byte-for-byte reproducible:
    stored (uncompressed) like ``np.savez``, with a fixed timestamp instead of the time of writing."""
    first = _load_chunk(job, 0, None)
    image_shape = first.shape[1:]
    path = os.path.join(job.out_dir, SAMPLES)

    def entry(zf, name, header_shape, dtype, parts):
        info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
        with zf.open(info, "w", force_zip64=True) as fh:
            header = {
                "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                "fortran_order": False,
                "shape": header_shape,
            }
            np.lib.format.write_array_header_2_0(fh, header)
            for part in parts:
                fh.write(np.ascontiguousarray(part).tobytes())

    def write(fh):
        with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            chunks = (first if k == 0 else _load_chunk(job, k, image_shape) for k in range(job.num_chunks))
            entry(zf, "arr_0", (job.num, *image_shape), np.uint8, chunks)
            if job.labels is not None:
                entry(zf, "arr_1", (job.num,), np.int64, [np.asarray(job.labels_for(0, job.num), dtype=np.int64)])

    atomic_write(path, write)
    return path


def load_samples(out_dir) -> np.ndarray:
    """The finished samples of a :func:`generate` job: uint8 (num, H, W, C) in sample-index order (``arr_0``
    of ``out_dir/samples.npz``; ``np.load`` it for ``arr_1``, the int64 labels, when the job had labels)."""
    path = os.path.join(os.fspath(out_dir), SAMPLES)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`out_dir` {out_dir}: no {SAMPLES}; the job has not finished (re-run it to resume)")
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"]


# ----------------------------------------------------------------------------------------------- processes


@dataclass(frozen=True)
class _Group:
    """This process's place in the job: rank, world size, where collective tensors live, and whether this call
    initialised the process group (and so destroys it)."""

    rank: int
    world: int
    device: torch.device
    owned: bool


def _join_group(device: torch.device) -> _Group:
    """The process group torchrun (or the caller) set up; one is initialised from torchrun's environment when
    WORLD_SIZE > 1 and none exists yet: NCCL for CUDA models, gloo otherwise."""
    import torch.distributed as dist

    owned = False
    if not (dist.is_available() and dist.is_initialized()):
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return _Group(0, 1, torch.device("cpu"), False)
        if device.type == "cuda" and device.index is not None:
            torch.cuda.set_device(device)  # NCCL talks through the current device: the model's, one per rank
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        owned = True
    if dist.get_backend() != "nccl":
        where = torch.device("cpu")
    elif device.type == "cuda":
        where = device if device.index is not None else torch.device("cuda", torch.cuda.current_device())
    else:
        where = torch.device("cuda", torch.cuda.current_device())
    return _Group(dist.get_rank(), dist.get_world_size(), where, owned)


def _broadcast(obj, g: _Group):
    """Rank 0's ``obj`` on every rank."""
    if g.world == 1:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0, device=g.device)
    return box[0]


def _sum(value: int, g: _Group) -> int:
    """The sum of ``value`` over all ranks (also a barrier)."""
    if g.world == 1:
        return value
    import torch.distributed as dist

    t = torch.tensor([value], dtype=torch.int64, device=g.device)
    dist.all_reduce(t)
    return int(t.item())


def _agree(identity: dict, g: _Group) -> None:
    """Every rank must run the same job: a rank given other settings would write other samples."""
    mine = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    differs = _sum(int(_broadcast(mine, g) != mine), g)
    if differs:
        raise JobMismatchError(
            f"{differs} of {g.world} ranks run a different job than rank 0 (other arguments, thread count or "
            "model weights): every rank must run the same command"
        )


# ----------------------------------------------------------------------------------------------- sampling


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] -> uint8 (B, H, W, C): ``round((x + 1) * 127.5)`` clamped to 0..255."""
    if x.ndim != 4:
        raise ValueError(f"samples must be images (batch, channels, height, width), got shape {tuple(x.shape)}")
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


def _run_chunk(model, scheduler, job: _Job, k: int, sample_kwargs: dict, decode: Optional[Callable]) -> np.ndarray:
    """uint8 (rows, H, W, C): chunk k run as one batch of ``batch_size``, the rows past ``num`` dropped."""
    from .sampling import sample

    start, b = k * job.batch_size, job.batch_size
    kwargs = dict(sample_kwargs)
    if job.labels is not None:
        device = kwargs["device"]
        labels = torch.tensor(job.labels_for(start, b), dtype=torch.int64, device=device)
        kwargs["model_kwargs"] = {job.label_key: labels}
        if job.guidance_scale is not None:
            kwargs["uncond_kwargs"] = {job.label_key: torch.full_like(labels, job.null_label)}
    x = sample(model, scheduler, shape=(b, *job.shape), seed=chunk_seeds(job.seed, start, b), **kwargs)
    if decode is not None:
        x = decode(x)
    bad = int((~torch.isfinite(x)).sum())
    if bad:
        raise FloatingPointError(
            f"chunk {k} (samples {start}..{start + job.rows(k) - 1}): {bad} of {x.numel()} output values are NaN "
            "or inf; nothing was written for it"
        )
    return to_uint8(x)[: job.rows(k)]


def _backend_name(scheduler, device: torch.device) -> str:
    from . import ops

    return ops.select(getattr(scheduler, "backend", None), device)


def generate(
    model,
    scheduler,
    num: int,
    out_dir,
    *,
    shape: Sequence[int],
    seed: int = 0,
    batch_size: int = 64,
    num_inference_steps: int = 50,
    guidance_scale: Optional[float] = None,
    guidance_rescale: float = 0.0,
    labels: Optional[Sequence[int]] = None,
    null_label: Optional[int] = None,
    label_key: str = "class_labels",
    step_kwargs: Optional[dict] = None,
    dtype: Optional[torch.dtype] = None,
    backend: Optional[str] = None,
    decode: Optional[Callable] = None,
    model_id: Optional[str] = None,
    job_info: Optional[dict] = None,
    png: bool = False,
    progress: bool = True,
) -> GenerateResult:
    """Generate ``num`` samples into ``out_dir``, resumably, split over the ranks of the process group.

    Run it in every process of a torchrun job (it joins the process group the caller set up, or initialises
    one from torchrun's environment: NCCL for a CUDA model, gloo otherwise) or in a single process: the result
    is the same file. See the module docstring for the guarantee and the folder's layout.

    model, scheduler: as for :func:`fastdiff.sample` (on CUDA a captured graph is replayed per chunk).
    shape: one sample's (C, H, W). batch_size: rows per chunk, part of the job like ``seed``.
    labels: int class labels cycled over the sample indices (sample i gets ``labels[i % len(labels)]``),
    passed to the model as ``model_kwargs={label_key: ...}``; with ``guidance_scale``, ``null_label`` is the
    unconditional class. decode: maps the sampler's output (B, C, H, W) to images in [-1, 1] (e.g. a VAE
    decode); without it the output itself is the image. Images are stored as uint8 ``round((x + 1) * 127.5)``.
    model_id: names the model in the job's identity; default: a sha256 of its parameters and buffers.
    job_info: extra JSON values that identify the job (checked on resume like the rest).
    Returns a :class:`GenerateResult`; every rank returns once samples.npz is complete.
    """
    job = _Job(
        out_dir=os.fspath(out_dir),
        num=_check_int("num", num, 1),
        batch_size=_check_int("batch_size", batch_size, 1),
        seed=_check_int("seed", seed),
        shape=_check_shape(shape),
        steps=_check_int("num_inference_steps", num_inference_steps, 1),
        guidance_scale=None if guidance_scale is None else float(guidance_scale),
        guidance_rescale=float(guidance_rescale),
        labels=_check_labels(labels, guidance_scale, null_label),
        label_key=label_key,
        null_label=None if null_label is None else _check_int("null_label", null_label),
        step_kwargs=dict(step_kwargs or {}),
        png=bool(png),
    )
    if job.png and decode is None and job.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"`png=True` writes 1, 3 or 4 channels (gray, RGB, RGBA), but `shape` {job.shape} has {job.shape[0]}"
        )
    from .loop import as_fastdiff_scheduler, model_device, model_dtype

    device = model_device(model)
    dtype = model_dtype(model) if dtype is None else dtype
    scheduler = as_fastdiff_scheduler(scheduler, backend)
    model_id = model_fingerprint(model) if model_id is None else str(model_id)
    identity = _identity(job, scheduler, model_id, dtype, device, _backend_name(scheduler, device), job_info)
    g = _join_group(device)
    try:
        return _generate(model, scheduler, job, identity, g, device, dtype, decode, progress)
    finally:
        if g.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _generate(model, scheduler, job, identity, g, device, dtype, decode, show) -> GenerateResult:
    t0 = time.perf_counter()
    _agree(identity, g)
    pending = _pending_chunks(job, identity, g)
    path = os.path.join(job.out_dir, SAMPLES)
    if not pending and os.path.isfile(path):  # a finished job: nothing to do (PNGs asked for only now aside)
        if g.rank == 0 and job.png:
            _finish_pngs(job)
        _sum(0, g)
        return GenerateResult(path, job.num, 0, time.perf_counter() - t0, g.world)
    sample_kwargs = dict(
        num_inference_steps=job.steps,
        guidance_scale=job.guidance_scale,
        guidance_rescale=job.guidance_rescale,
        step_kwargs=job.step_kwargs,
        dtype=dtype,
        device=device,
        progress=False,
    )
    generated = _run_chunks(model, scheduler, job, pending, g, sample_kwargs, decode, show)
    if g.rank == 0:
        _write_samples(job)
        if job.png:
            _finish_pngs(job)
    _sum(0, g)  # every rank returns once samples.npz is there
    return GenerateResult(path, job.num, generated, time.perf_counter() - t0, g.world)


def _pending_chunks(job: _Job, identity: dict, g: _Group) -> list[int]:
    """Rank 0 opens the job folder; every rank gets the chunks still to do, or rank 0's error."""
    opened = None
    if g.rank == 0:
        try:
            opened = _open_job(job, identity)
        except (ValueError, OSError) as exc:  # every rank raises it, none waits for rank 0
            opened = exc
    pending = _broadcast(opened, g)
    if isinstance(pending, BaseException):
        raise pending
    return pending


def _run_chunks(model, scheduler, job, pending, g: _Group, sample_kwargs, decode, show) -> int:
    """Run this rank's round-robin share of ``pending``, one chunk per round; after each round the ranks add up
    the samples finished (rank 0's progress counts them). Returns the samples all ranks made."""
    from .progress import progress

    mine = pending[g.rank :: g.world]
    done_before = job.num - sum(job.rows(k) for k in pending)
    generated = 0
    with progress(job.num, desc="generate", unit="images", initial=done_before, enabled=show and g.rank == 0) as bar:
        for r in range(math.ceil(len(pending) / g.world)):
            rows = 0
            if r < len(mine):
                images = _run_chunk(model, scheduler, job, mine[r], sample_kwargs, decode)
                _save_chunk(job, mine[r], images)
                rows = len(images)
            finished = _sum(rows, g)
            generated += finished
            bar.update(finished)
    return generated


def _finish_pngs(job: _Job) -> None:
    """(rank 0) PNGs a run without ``png=True`` did not write."""
    os.makedirs(os.path.join(job.out_dir, PNGS), exist_ok=True)
    for k in range(job.num_chunks):
        start = k * job.batch_size
        if not all(os.path.exists(_png_path(job.out_dir, i)) for i in range(start, start + job.rows(k))):
            _write_pngs(job, start, _load_chunk(job, k, None), only_missing=True)
