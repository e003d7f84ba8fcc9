"""pytest-benchmark configuration: device facts, the copy-bandwidth roofline measured once per run, host-sync
counts, and a results writer (JSON + markdown per device under $FASTDIFF_BENCH_RESULTS, rewritten after every
row so that a run cut short by a time limit keeps what it measured).

Environment:
  FASTDIFF_BENCH_RESULTS    folder for <device>.json and <device>.md (nothing is written without it)
  FASTDIFF_BENCH_APPEND=1   keep the rows already in those files (several pytest runs, one results file)
  FASTDIFF_BENCH_PLAN=cuda  list the GPU cases on any machine (``--collect-only`` checks on a CPU machine)
  FASTDIFF_BENCH_QUICK=1    leave out the costliest GPU cases (the batch-16 UNet compile)
  FASTDIFF_BENCH_CPU_SIZES=all   the CPU subset at every size of bench.CPU_STEP_SIZES, not only the smallest
  FASTDIFF_BENCH_BUSY_FILE  while this file exists, rows are marked as measured beside a busy neighbour
                            (scripts/gpu_check.sh: the CUDA extension compiling in the background)
"""

import json
import os
import re
import signal
import threading
import time

import pytest
import torch

from fastdiff import bench

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
GPU_PLAN = os.environ.get("FASTDIFF_BENCH_PLAN", DEVICE) == "cuda"
QUICK = os.environ.get("FASTDIFF_BENCH_QUICK") == "1"
ROWS: list = []


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def copy_gbps():
    """The device-to-device copy bandwidth, measured once per run: every row's roofline share uses it."""
    return bench.copy_bandwidth(DEVICE) if CUDA else None


@pytest.fixture(scope="session")
def syncs_counted():
    """Whether the host-sync counter works here (it counts only on CUDA, and is checked on a known sync)."""
    return bench.sync_counter_works(DEVICE)


def build(make, *args, **kwargs) -> bench.Case:
    """Build a case, skipping (with the reason) when it cannot run here."""
    try:
        return make(*args, **kwargs)
    except bench.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.fixture
def measure(benchmark, copy_gbps, syncs_counted):
    """measure(case, **labels): time ``case`` with pytest-benchmark (synchronized calls after warm-up; per unit,
    median and spread), add its device time as GB/s against this run's copy bandwidth and its host-sync
    counts when it has them, and keep a row for the results files."""

    def run(case: bench.Case, rounds=20, warmup=3, **labels):
        iterations = 1
        if case.setup is None:
            once = bench.time_case(case, DEVICE, warmup=warmup, rounds=3, min_time=0.02)["median_s"] * case.units
            iterations = max(1, int(0.01 / max(once, 1e-7)))
            warmup = 1
        benchmark.pedantic(case.fn, setup=case.setup, rounds=rounds, iterations=iterations, warmup_rounds=warmup)
        stats = benchmark.stats.stats
        per = 1e6 / case.units
        row = dict(
            labels,
            median_us=stats.median * per,
            min_us=stats.min * per,
            iqr_us=stats.iqr * per,
            rounds=rounds,
            iterations=iterations,
            units=case.units,
            setup_s=case.setup_seconds or None,
            **case.info,
        )
        if case.device_fn is not None and CUDA:
            d = bench.device_time(case.device_fn, DEVICE)
            row.update(device_us=d["median_s"] * 1e6, device_iqr_us=d["iqr_s"] * 1e6)
            row["GBps"] = case.nbytes / d["median_s"] / 1e9
            if copy_gbps:
                row.update(pct_copy=row["GBps"] / copy_gbps * 100, copy_GBps=copy_gbps)
        if case.probe is not None:
            counts = case.probe()
            if CUDA and not syncs_counted:
                counts = dict.fromkeys(counts, "counter not working")
            row.update(counts)
        busy = os.environ.get("FASTDIFF_BENCH_BUSY_FILE")
        if busy and os.path.exists(busy):
            row["beside"] = "CUDA extension build"
        benchmark.extra_info.update({k: v for k, v in row.items() if isinstance(v, (int, float, str, type(None)))})
        ROWS.append(row)
        _write_results(copy_gbps)
        return row

    return run


# ------------------------------------------------------------------------------------------ results files


def slug(name: str) -> str:
    """The results file stem for a device name ("NVIDIA H200" -> "nvidia-h200")."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "device"


_ENV: dict = {}
_PRIOR: list = []


def _write_results(copy_gbps) -> None:
    """Rewrite this device's JSON and markdown with every row so far (called after each measurement)."""
    out = os.environ.get("FASTDIFF_BENCH_RESULTS")
    if not out or not ROWS:
        return
    os.makedirs(out, exist_ok=True)
    if not _ENV:
        _ENV.update(bench.environment(), date=time.strftime("%Y-%m-%d"))
        if copy_gbps:
            _ENV["copy_GBps"] = copy_gbps
        path = os.path.join(out, slug(_ENV["device"]) + ".json")
        if os.environ.get("FASTDIFF_BENCH_APPEND") == "1" and os.path.exists(path):
            with open(path) as fh:
                old = json.load(fh)
            _PRIOR.extend(old.get("results", []))
            for key, value in old.get("environment", {}).items():
                _ENV.setdefault(key, value)
            if old.get("environment", {}).get("copy_GBps"):  # the first run's figure heads the file
                _ENV["copy_GBps"] = old["environment"]["copy_GBps"]
    rows = _PRIOR + ROWS
    base = os.path.join(out, slug(_ENV["device"]))
    for path, text in (
        (base + ".json", json.dumps({"environment": _ENV, "results": rows}, indent=1, default=str)),
        (base + ".md", markdown(_ENV, rows)),
    ):
        with open(path + ".tmp", "w") as fh:  # whole files only, even when a time limit interrupts the run
            fh.write(text)
        os.replace(path + ".tmp", path)


def _us(v):
    if v is None:
        return ""
    return f"{v / 1000:.2f} ms" if v >= 1000 else f"{v:.1f} us"


def _num(fmt):
    def cell(v):
        if v is None:
            return ""
        return v if isinstance(v, str) else fmt.format(v)

    return cell


# per table: title, the keys that group rows (one speedup baseline per group), then the columns shown
TABLES = (
    (
        "step",
        f"Scheduler step at latent size: per step of {bench.STEPS}-step walks (wall time, host overhead included)",
        ("preset", "size", "dtype", "noise"),
        (
            ("median", "median_us", _us),
            ("IQR", "iqr_us", _us),
            ("syncs in set_timesteps / step 0 / per later step", None, None),
            ("compile", "setup_s", _num("{:.1f} s")),
        ),
    ),
    (
        "bandwidth",
        "Scheduler step at pixel size: device time per step (CUDA events), GB/s of x, model output, prev and x0",
        ("preset", "size", "dtype", "noise"),
        (
            ("wall per call", "median_us", _us),
            ("device", "device_us", _us),
            ("GB/s", "GBps", _num("{:.0f}")),
            ("% of copy", "pct_copy", _num("{:.0f}%")),
        ),
    ),
    (
        "loop",
        "Whole sampling loop (wall time per loop)",
        ("model", "batch", "steps", "dtype"),
        (
            ("median", "median_us", _us),
            ("IQR", "iqr_us", _us),
            ("syncs per loop", "syncs_per_loop", _num("{}")),
            ("compile / capture", "setup_s", _num("{:.2f} s")),
        ),
    ),
    (
        "add_noise",
        "add_noise (q_sample)",
        ("size", "dtype"),
        (("median", "median_us", _us), ("IQR", "iqr_us", _us)),
    ),
)


def _syncs(r) -> str:
    keys = ("syncs_set_timesteps", "syncs_first_step", "syncs_per_step")
    if all(r.get(k) is None for k in keys):
        return ""
    if any(isinstance(r.get(k), str) for k in keys):
        return next(r[k] for k in keys if isinstance(r.get(k), str))
    return " / ".join(str(r.get(k)) if not isinstance(r.get(k), float) else f"{r[k]:g}" for k in keys)


def markdown(env: dict, rows: list) -> str:
    lines = [
        f"# fastdiff benchmarks on {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, diffusers {env['diffusers']}, "
        f"python {env['python']}, driver {env.get('driver')}, fastdiff {env.get('fastdiff')}; measured {env['date']}.",
    ]
    if env.get("copy_GBps"):
        lines.append(f"Device-to-device copy bandwidth in the same run: {env['copy_GBps']:.0f} GB/s (read + write).")
    lines.append(
        "Medians after warm-up; spread is the interquartile range; compile and capture time are apart from it. "
        "Speedup: diffusers' median over this row's (device time for the bandwidth rows)."
    )
    if any(r.get("beside") for r in rows):
        lines.append("Rows marked * were measured while the CUDA extension compiled in the background (nice 19).")
    for kind, title, keys, cols in TABLES:
        sel = [r for r in rows if r.get("kind") == kind]
        if not sel:
            continue
        lines += ["", f"## {title}", ""]
        heads = [c[0] for c in cols]
        lines.append("| " + " | ".join(keys) + " | provider | " + " | ".join(heads) + " | speedup vs diffusers |")
        lines.append("|" + "---|" * (len(keys) + len(cols) + 2))
        groups: dict = {}
        for r in sel:
            groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
        speed_key = "device_us" if kind == "bandwidth" else "median_us"
        for key, group in groups.items():
            base = next((r.get(speed_key) for r in group if r.get("provider") == "diffusers"), None)
            for r in group:
                cells = []
                for _, field, fmt in cols:
                    cells.append(_syncs(r) if field is None else fmt(r.get(field)))
                mine = r.get(speed_key)
                sp = f"{base / mine:.2f}x" if base and mine else ""
                prov = (
                    r["provider"]
                    + (f" [{r['backend']}]" if r.get("backend") else "")
                    + ("*" if r.get("beside") else "")
                )
                lines.append(
                    "| " + " | ".join(str(k) for k in key) + f" | {prov} | " + " | ".join(cells) + f" | {sp} |"
                )
        lines += [
            f"\n{r['provider']}, {' '.join(str(r.get(k)) for k in keys)}: {r['compile_note']}"
            for r in sel
            if r.get("compile_note")
        ]
    return "\n".join(lines) + "\n"


def pytest_configure(config):
    # a time limit's SIGTERM (`timeout`, a CI runner) ends the run like Ctrl-C: pytest still prints its summary
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
