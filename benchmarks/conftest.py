"""pytest-benchmark configuration: device facts, the copy-bandwidth roofline measured once per run, and
a results writer (JSON + markdown per device under $FASTDIFF_BENCH_RESULTS, e.g. benchmarks/results)."""

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
ROWS: list = []


@pytest.fixture(scope="session")
def device():
    return DEVICE


@pytest.fixture(scope="session")
def copy_gbps():
    """The device-to-device copy bandwidth, measured once per run: every row's roofline share uses it."""
    return bench.copy_bandwidth(DEVICE) if CUDA else None


@pytest.fixture
def measure(benchmark, copy_gbps):
    """measure(case, **labels): time ``case`` with pytest-benchmark (synchronized calls, warm-up, median and
    spread), convert to GB/s against this run's copy bandwidth, and keep a row for the results files."""

    def run(case: bench.Case, rounds=20, warmup=5, **labels):
        once = bench.time_case(case, DEVICE, warmup=warmup, rounds=3, min_time=0.02)["median_s"]
        iterations = max(1, int(0.01 / max(once, 1e-7)))
        benchmark.pedantic(case.fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup)
        stats = benchmark.stats.stats
        row = dict(
            labels,
            median_us=stats.median * 1e6,
            min_us=stats.min * 1e6,
            iqr_us=stats.iqr * 1e6,
            rounds=rounds,
            iterations=iterations,
            setup_s=case.setup_seconds or None,
            **case.info,
        )
        if case.nbytes:
            row["GBps"] = case.nbytes / stats.median / 1e9
            if copy_gbps:
                row["pct_copy"] = row["GBps"] / copy_gbps * 100
        benchmark.extra_info.update(row)
        ROWS.append(row)
        _write_results(copy_gbps)  # after every row: a run cut short by a time limit keeps what it measured
        return row

    return run


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


_ENV: dict = {}


def _write_results(copy_gbps) -> None:
    """Rewrite this device's JSON and markdown with every row so far (called after each measurement)."""
    out = os.environ.get("FASTDIFF_BENCH_RESULTS")
    if not out or not ROWS:
        return
    if not _ENV:
        _ENV.update(bench.environment(), date=time.strftime("%Y-%m-%d"))
    env = dict(_ENV)
    if copy_gbps:
        env["copy_GBps"] = copy_gbps
    os.makedirs(out, exist_ok=True)
    base = os.path.join(out, _slug(env["device"]))
    for path, text in (
        (base + ".json", json.dumps({"environment": env, "results": ROWS}, indent=1, default=str)),
        (base + ".md", markdown(env, ROWS)),
    ):
        with open(path + ".tmp", "w") as fh:  # whole files only, even when a time limit interrupts the run
            fh.write(text)
        os.replace(path + ".tmp", path)


def markdown(env: dict, rows: list) -> str:
    lines = [
        f"# fastdiff benchmarks on {env['device']}",
        "",
        f"torch {env['torch']} (CUDA {env['cuda']}), triton {env['triton']}, diffusers {env['diffusers']}, "
        f"python {env['python']}; measured {env['date']}.",
    ]
    if env.get("copy_GBps"):
        lines.append(f"Device-to-device copy bandwidth in the same run: {env['copy_GBps']:.0f} GB/s (read + write).")
    lines.append("Times are medians of synchronized calls after warm-up; spread is the interquartile range.")
    for kind, title, keys in (
        ("step", "Scheduler step", ("scheduler", "size", "dtype")),
        ("add_noise", "add_noise (q_sample)", ("size", "dtype")),
        ("loop", "Whole sampling loop", ("model", "batch", "steps", "dtype")),
    ):
        sel = [r for r in rows if r.get("kind") == kind]
        if not sel:
            continue
        lines += ["", f"## {title}", ""]
        groups: dict = {}
        for r in sel:
            groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
        base_name = "diffusers"
        lines.append(
            "| " + " | ".join(keys) + " | provider | median | IQR | speedup vs diffusers | GB/s | % of copy "
            "| setup (compile/capture) |"
        )
        lines.append("|" + "---|" * (len(keys) + 7))
        for key, group in groups.items():
            base = next((r["median_us"] for r in group if r["provider"] == base_name), None)
            for r in group:
                med = r["median_us"]
                t = f"{med / 1000:.2f} ms" if med >= 1000 else f"{med:.1f} us"
                iqr = f"{r['iqr_us'] / 1000:.2f} ms" if med >= 1000 else f"{r['iqr_us']:.1f} us"
                sp = f"{base / med:.2f}x" if base else ""
                gb = f"{r['GBps']:.0f}" if r.get("GBps") else ""
                pct = f"{r['pct_copy']:.0f}%" if r.get("pct_copy") else ""
                setup = f"{r['setup_s']:.2f} s" if r.get("setup_s") else ""
                prov = r["provider"] + (f" [{r['backend']}]" if r.get("backend") else "")
                lines.append(
                    "| " + " | ".join(str(k) for k in key) + f" | {prov} | {t} | {iqr} | {sp} | {gb} | {pct} "
                    f"| {setup} |"
                )
    return "\n".join(lines) + "\n"


def pytest_configure(config):
    # a time limit's SIGTERM (`timeout`, a CI runner) ends the run like Ctrl-C: pytest still prints its summary
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.default_int_handler)
