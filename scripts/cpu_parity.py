"""Issue 11's CPU parity table: every sampler preset's whole walk, diffusers' step against fastdiff's
(``backend="auto"``, float32, one torch thread), interleaved rounds, medians and interquartile ranges.

    python scripts/cpu_parity.py --out benchmarks/results/cpu-parity-DATE.json [--rounds 15] [--sizes all]

Writes the rows (``fastdiff.bench.cpu_parity``) with the machine's facts: versions, the commit, the load
average before and after (this machine is shared; small-size ratios move with it). Run it on a quiet machine
(no test run beside it); the README's table is made from its output.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the JSON file to write")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--sizes", default="all", help="'all' or comma-separated keys of bench.CPU_STEP_SIZES")
    parser.add_argument("--presets", default=None, help="comma-separated presets (default: every registered one)")
    args = parser.parse_args(argv)

    import logging

    import torch

    from fastdiff import bench

    warnings.filterwarnings("ignore")
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    sizes = dict(bench.CPU_STEP_SIZES)
    if args.sizes != "all":
        wanted = args.sizes.split(",")
        unknown = [s for s in wanted if s not in sizes]
        if unknown:
            parser.error(f"--sizes: unknown {unknown}; expected 'all' or some of {list(sizes)}")
        sizes = {s: sizes[s] for s in wanted}
    presets = args.presets.split(",") if args.presets else None
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError:
        commit = None
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **bench.environment(),  # versions (torch, diffusers, fastdiff, python, ...)
        "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "commit": commit,
        "torch_threads": torch.get_num_threads(),
        "dtype": "float32",
        "steps_per_walk": args.steps,
        "rounds": args.rounds,
        "backend": "auto (torch on CPU tensors)",
        "loadavg_1_5_15_before": list(os.getloadavg()),
        "method": "bench.cpu_parity: whole set_timesteps-to-last-step walks, diffusers and fastdiff interleaved per "
        "round; medians and IQR per step",
    }
    rows = bench.cpu_parity(sizes, presets=presets, steps=args.steps, rounds=args.rounds)
    meta["loadavg_1_5_15_after"] = list(os.getloadavg())
    with open(args.out + ".tmp", "w") as fh:
        json.dump({"meta": meta, "rows": rows}, fh, indent=1)
    os.replace(args.out + ".tmp", args.out)
    slower = [f"{r['size']} {r['preset']} {r['ratio']:.2f}" for r in rows if r["ratio"] < 1]
    print(f"wrote {args.out}: {len(rows)} rows; diffusers/fastdiff below 1: {slower or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
