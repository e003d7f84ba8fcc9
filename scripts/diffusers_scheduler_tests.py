#!/usr/bin/env python3
"""Run diffusers' own scheduler unit tests, unchanged, against fastdiff's classes.

The test files come from a local git mirror of diffusers (never from this repository: their code is not
committed here). They are extracted into a temporary directory with what they import (``tests/__init__.py``,
``tests/conftest.py``, ``tests/testing_utils.py``, ``tests/others/test_utils.py``), then run by pytest in a
subprocess with a small plugin of ours that, after collection, rebinds every name bound to a diffusers scheduler
class that fastdiff also has (module globals of the test modules and of ``test_schedulers.py``, and class
attributes such as ``scheduler_classes = (DDPMScheduler,)``) to fastdiff's class of the same name. The tests'
own code is untouched.

Which files run: ``test_schedulers.py`` and every ``test_scheduler_*.py`` whose ``scheduler_classes`` names a
class in ``fastdiff.schedulers.SCHEDULERS`` (so a new fastdiff sampler brings its diffusers tests along).

Modes: ``fastdiff`` (rebound), ``diffusers`` (the baseline: same files, diffusers' own classes; the mirror's
tests may be newer than the installed diffusers, and a few need the network, which is off: HF_HUB_OFFLINE=1),
``both`` (default: both, then each fastdiff failure with its error and whether the baseline fails it too).

    python scripts/diffusers_scheduler_tests.py                       # both modes, summary table
    python scripts/diffusers_scheduler_tests.py --mode fastdiff -k dpm --backend reference
"""

from __future__ import annotations

import argparse
import io
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

DEFAULT_MIRROR = "/work/.mirror/huggingface+diffusers/repo"
SUPPORT_FILES = (
    "tests/__init__.py",
    "tests/conftest.py",
    "tests/testing_utils.py",
    "tests/others/__init__.py",
    "tests/others/test_utils.py",
    "tests/schedulers/__init__.py",
    "tests/schedulers/test_schedulers.py",
)

# The pytest plugin (loaded with -p): swaps diffusers scheduler classes for fastdiff's after collection.
PLUGIN = textwrap.dedent(
    '''
    """fastdiff harness plugin: rebind diffusers scheduler classes to fastdiff's after collection."""
    import os
    import sys


    def _table():
        import diffusers
        from fastdiff.schedulers import SCHEDULERS

        return {getattr(diffusers, n): cls for n, cls in SCHEDULERS.items() if hasattr(diffusers, n)}


    def _swap(value, table):
        if isinstance(value, type):
            return table.get(value, value)
        if isinstance(value, (tuple, list)):
            swapped = [_swap(v, table) for v in value]
            if any(a is not b for a, b in zip(swapped, value)):
                return type(value)(swapped)
        return value


    def pytest_collection_modifyitems(session, config, items):
        if os.environ.get("FASTDIFF_REBIND") != "1":
            return
        table = _table()
        modules = {m for n, m in list(sys.modules.items()) if n == "tests" or n.startswith("tests.")}
        modules |= {item.module for item in items if getattr(item, "module", None) is not None}
        swapped = 0
        for module in modules:
            for name, value in list(vars(module).items()):
                new = _swap(value, table)
                if new is not value:
                    setattr(module, name, new)
                    swapped += 1
                if isinstance(value, type) and value.__module__ == module.__name__:
                    for attr, av in list(vars(value).items()):
                        nv = _swap(av, table)
                        if nv is not av:
                            setattr(value, attr, nv)
                            swapped += 1
        config._fastdiff_swapped = swapped


    def pytest_report_header(config):
        if os.environ.get("FASTDIFF_REBIND") == "1":
            return "fastdiff harness: diffusers scheduler classes rebound to fastdiff's"
        return "fastdiff harness: baseline (diffusers' own classes)"
    '''
)


def git(mirror: str, *args: str) -> bytes:
    return subprocess.run(["git", "--git-dir", mirror, *args], check=True, capture_output=True).stdout


def extract(mirror: str, rev: str, dest: Path) -> list[str]:
    """Extract the support files and the scheduler test files into ``dest``; return the test files to run."""
    from fastdiff.schedulers import SCHEDULERS

    listing = git(mirror, "ls-tree", "--name-only", rev, "tests/schedulers/").decode().split()
    chosen = ["tests/schedulers/test_schedulers.py"]
    for path in listing:
        if not re.fullmatch(r"tests/schedulers/test_scheduler_\w+\.py", path):
            continue
        text = git(mirror, "show", f"{rev}:{path}").decode()
        names = re.findall(r"scheduler_classes\s*=\s*\((\w+),?\)", text)
        if any(n in SCHEDULERS for n in names):
            chosen.append(path)
    archive = git(mirror, "archive", "--format=tar", rev, *dict.fromkeys(SUPPORT_FILES + tuple(chosen)))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    (dest / "_fastdiff_rebind.py").write_text(PLUGIN)
    (dest / "pytest.ini").write_text("[pytest]\n")  # keep pytest from reading this repository's settings
    return chosen


def run_mode(dest: Path, files: list[str], rebind: bool, args) -> dict:
    """Run pytest over ``files``; return {test id: (outcome, message)} from its JUnit XML."""
    xml = dest / f"results-{'fastdiff' if rebind else 'diffusers'}.xml"
    env = dict(os.environ, FASTDIFF_REBIND="1" if rebind else "0", HF_HUB_OFFLINE="1", PYTHONPATH=str(dest))
    env.pop("TRITON_INTERPRET", None)
    if args.backend:
        env["FASTDIFF_BACKEND"] = args.backend
    cmd = [sys.executable, "-m", "pytest", *files, "-p", "_fastdiff_rebind", "-q", "-p", "no:cacheprovider"]
    cmd += ["--junitxml", str(xml), "-o", "junit_family=xunit1", "-W", "ignore::DeprecationWarning"]
    if args.k:
        cmd += ["-k", args.k]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=dest, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if not xml.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"pytest produced no results (exit code {proc.returncode})")
    if args.verbose:
        print(proc.stdout[-20000:])
    results = {}
    for case in ET.parse(xml).getroot().iter("testcase"):
        *_, module, cls = ("?", "?", *case.get("classname", "").split("."))
        test_id = f"{module}::{cls}::{case.get('name')}"
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                message = first_line(node.get("message") or node.text or "")
                break
        results[test_id] = (outcome, message)
    print(f"  {'fastdiff' if rebind else 'diffusers (baseline)'}: {len(results)} tests in {seconds:.0f} s")
    return results


def first_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else "")[:300]


def per_file(results: dict) -> dict:
    counts: dict[str, Counter] = {}
    for test_id, (outcome, _) in results.items():
        file = test_id.split("::")[0]
        counts.setdefault(file, Counter())[outcome] += 1
    return counts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mirror", default=DEFAULT_MIRROR, help="bare git repository of diffusers")
    parser.add_argument("--rev", default="HEAD", help="revision of the mirror to take the tests from")
    parser.add_argument("--mode", choices=("both", "fastdiff", "diffusers"), default="both")
    parser.add_argument("--backend", help="FASTDIFF_BACKEND for the fastdiff run (default: auto)")
    parser.add_argument("-k", help="pytest -k expression")
    parser.add_argument("--keep", action="store_true", help="keep the extracted directory and JUnit files")
    parser.add_argument("-v", "--verbose", action="store_true", help="print pytest's output")
    args = parser.parse_args(argv)

    dest = Path(tempfile.mkdtemp(prefix="diffusers-scheduler-tests-"))
    files = extract(args.mirror, args.rev, dest)
    import diffusers

    print(f"diffusers tests from {args.mirror} @ {args.rev}; installed diffusers {diffusers.__version__}")
    print(f"files: {', '.join(Path(f).name for f in files)}")
    runs = {}
    for mode in ("diffusers", "fastdiff"):
        if args.mode in (mode, "both"):
            runs[mode] = run_mode(dest, files, mode == "fastdiff", args)

    print()
    header = f"{'file':32} " + " ".join(f"{m + ' pass/total':>24}" for m in runs)
    print(header)
    print("-" * len(header))
    tables = {m: per_file(r) for m, r in runs.items()}
    for file in sorted({f for t in tables.values() for f in t}):
        cells = []
        for m in runs:
            c = tables[m].get(file, Counter())
            total = sum(c.values())
            extra = f" ({c['skipped']} skipped)" if c["skipped"] else ""
            cells.append(f"{c['passed']:>4}/{total:<4}{extra:>14}")
        print(f"{file:32} " + " ".join(f"{c:>24}" for c in cells))
    for m, r in runs.items():
        c = Counter(o for o, _ in r.values())
        print(f"{m}: {c['passed']} passed, {c['failed']} failed, {c['error']} errors, {c['skipped']} skipped")

    if "fastdiff" in runs:
        base = runs.get("diffusers", {})
        failing = {t: v for t, v in runs["fastdiff"].items() if v[0] in ("failed", "error")}
        print(f"\nfastdiff failures ({len(failing)}):")
        for test_id, (outcome, message) in sorted(failing.items()):
            also = base.get(test_id, ("?", ""))[0]
            tag = " [fails in the baseline too]" if also in ("failed", "error") else ""
            print(f"  {test_id}{tag}\n      {outcome}: {message}")
    if "diffusers" in runs:
        failing = {t: v for t, v in runs["diffusers"].items() if v[0] in ("failed", "error")}
        print(f"\nbaseline failures ({len(failing)}):")
        for test_id, (outcome, message) in sorted(failing.items()):
            print(f"  {test_id}\n      {outcome}: {message}")
    if args.keep:
        print(f"\nkept {dest}")
    else:
        import shutil

        shutil.rmtree(dest, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
