#!/usr/bin/env bash
# One call on a lent CUDA machine (no network), at most 6 minutes, most valuable first; every result lands in
# $OUT as soon as it is measured, so a time limit keeps what was measured.
#
#   device call:  command "bash scripts/gpu_check.sh", carry [".whl"], timeout_s 420
#   on any machine, no GPU needed:  bash scripts/gpu_check.sh --dry-run   (CI runs it)
#
# .whl/ holds diffusers' wheels (the GPU machine has no diffusers and no network); make it with network:
#   pip download -q --no-deps --only-binary=:all: -d .whl diffusers==0.42.1 importlib_metadata zipp
#
# The steps, each under `timeout` with its own budget, capped by the call's deadline (budgets below):
#   1 facts          GPU, driver, compute capability (nvidia-smi, first); python, torch (+CUDA), triton,
#                    diffusers, nvcc (after step 3)                                          -> summary.txt
#   2 build          the CUDA extension for this GPU's architecture only, 16 jobs, in the background
#                    (nice 19) while steps 3-5 run                                           -> build.log
#   3 wheels         diffusers from .whl/ into /tmp/site (pip --no-index)
#   4 bench-core     the headline benchmarks that need no extension: the step at 1x4x64x64 fp16/bf16
#                    (diffusers vs Triton) with host syncs per step, at 64x3x256x256 fp16/fp32 in GB/s and
#                    % of copy with and without Philox noise, the CIFAR-10 UNet DDIM-50 loop at batch 1 and
#                    16 (diffusers, fastdiff eager, GraphSampler) and, once it lands, the FlowMatchEuler loop
#                    on a Flux-shaped transformer                       -> <device>.json, <device>.md, bench.log
#   5 bench-compile  diffusers' step under torch.compile; the UNet under reduce-overhead at batch 1
#   6                wait for the build; install fastdiff/_C*.so, or say clearly why not
#   7 bench-ext      the step rows with backend="cuda"
#   8 tests-cuda     test_graph.py, test_csrc.py, the cuda cases of test_capturable.py         -> tests.log
#   9 tests-rest     the cuda cases of the rest of the suite, then its other cases, until the deadline
# $OUT gets summary.txt build.log bench.log tests.log <device>.json <device>.md: 6 files (8 come back at most).
set -uo pipefail
cd "$(dirname "$0")/.."

CALL_BUDGET=360 # seconds for the whole call; the device call's timeout_s 420 leaves a minute beyond it
RESERVE=5       # for the closing summary
GRACE=3         # `timeout -k`: a step that ignores SIGTERM is killed this much later (rows already written stay)
MIN_STEP=20     # a step with less time than this left is skipped, and says so
# Budgets: estimates until a GPU run measures them (steps that end early leave their time to the tests)
B_QUERY=5  # nvidia-smi for the compute capability, before the build starts
B_FACTS=15 # a cold first `import torch` can take ~10 s
B_BUILD=180 # binding.cpp (torch headers) is the long pole: 60 s of one core here with -g0
B_WHEELS=15
B_CORE=105   # ~29 rows of 1-3 s, ~12 Triton JIT compiles of ~2 s, pytest start: ~80 s
B_COMPILE=95 # inductor on the CIFAR-10 UNet ~40-70 s, diffusers' step ~10-20 s, pytest start
B_EXT=35     # 10 rows, the extension's kernels need no JIT
B_CUDA_TESTS=64
FIXED="gpu-query:$B_QUERY facts:$B_FACTS wheels:$B_WHEELS bench-core:$B_CORE bench-compile:$B_COMPILE bench-ext:$B_EXT"
FIXED+=" tests-cuda:$B_CUDA_TESTS"

usage() {
  sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
  echo "usage: bash scripts/gpu_check.sh [--dry-run] [--budget SECONDS]"
}
DRY=0
while (($#)); do
  case $1 in
    --dry-run) DRY=1 ;;
    --budget)
      [[ ${2:-} =~ ^[0-9]+$ ]] || {
        echo "gpu_check: --budget needs a number of seconds, got '${2:-}'" >&2
        exit 2
      }
      CALL_BUDGET=$2
      shift
      ;;
    -h | --help)
      usage
      exit 0
      ;;
    *)
      echo "gpu_check: unknown argument '$1'" >&2
      usage >&2
      exit 2
      ;;
  esac
  shift
done

# the pytest selections, shared by the run and the dry run
# no:unraisableexception: that plugin's gc.collect() at exit took >6 s with torch loaded on a busy machine, and
# delays the exit after a time limit's SIGTERM
BENCH_ARGS=(--benchmark-only -q -p no:cacheprovider -p no:unraisableexception --benchmark-columns=median,iqr,rounds)
SEL_CORE=(benchmarks/test_bench_step.py benchmarks/test_bench_loop.py -k "not cuda and not compile and not cond")
SEL_COMPILE=(benchmarks/test_bench_step.py benchmarks/test_bench_loop.py -k compile)
SEL_EXT=(benchmarks/test_bench_step.py -k cuda)
SEL_CUDA_TESTS=(tests/test_graph.py tests/test_csrc.py tests/test_capturable.py -k "cuda or test_graph.py or test_csrc.py")
SEL_REST_CUDA=(tests --ignore=tests/test_graph.py --ignore=tests/test_csrc.py --ignore=tests/test_capturable.py -k cuda)
SEL_REST_OTHER=(tests --ignore=tests/test_graph.py --ignore=tests/test_csrc.py -k "not cuda")
OUT_FILES="summary.txt build.log bench.log tests.log DEVICE.json DEVICE.md"

# torch guesses CUDA_HOME as the folder above `which nvcc`, wrong where nvcc is a wrapper script (this
# project's CPU machines have /usr/local/bin/nvcc): ask nvcc where its toolkit is
cuda_home() {
  if [[ -n ${CUDA_HOME:-} ]]; then
    echo "$CUDA_HOME"
    return
  fi
  command -v nvcc >/dev/null 2>&1 || return 0
  local top
  top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
  if [[ -n $top ]]; then (cd "$top" && pwd); fi # TOP is the toolkit's bin/..
}

# ------------------------------------------------------------------------------------------------ dry run

# the cases each selection collects with the GPU plan, all in one Python process (one set of imports: a
# pytest process per selection took ~25 s each on a busy 2-core machine). FILE lines: label, minimum count,
# node ids that must be among them (comma-separated), the selection's arguments
collect_all() { # FILE
  FASTDIFF_BENCH_PLAN=cuda FASTDIFF_BENCH_QUICK=${FASTDIFF_BENCH_QUICK:-1} python3 - "$1" <<'PY'
import contextlib, io, shlex, sys

import pytest

class Collected:
    ids: list = []

    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]

fail = 0
for line in open(sys.argv[1]).read().splitlines():
    label, least, required, args = line.split("\t")
    seen, out = Collected(), io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *shlex.split(args)], plugins=[seen])
    missing = [r for r in required.split(",") if r and not any(r in i for i in seen.ids)]
    print(f"  {label:14s} {len(seen.ids):4d} cases")
    if len(seen.ids) < int(least) or missing or rc not in (0, 5) or (rc == 5 and int(least) > 0):
        print(f"FAIL: {label}: {len(seen.ids)} cases (at least {least} expected), pytest rc={rc}, missing {missing}")
        print(f"      selection: {args}")
        print("\n".join(out.getvalue().splitlines()[-15:]))
        fail = 1
sys.exit(fail)
PY
}

dry_run() {
  local fail=0 sum=0 name b
  echo "gpu_check --dry-run: checks that every step is wired, without a GPU"
  echo "time budget of the call: ${CALL_BUDGET}s; per step (s):"
  for s in $FIXED; do
    name=${s%%:*} b=${s##*:}
    printf '  %-14s %4d (+%d if it must be killed)\n' "$name" "$b" "$GRACE"
    sum=$((sum + b + GRACE))
  done
  # the build starts after the query and must end before step 6 could start in the worst case
  local build_end=$((B_QUERY + B_BUILD + GRACE))
  local wait_start=$((B_QUERY + B_FACTS + B_WHEELS + B_CORE + B_COMPILE + 4 * GRACE))
  printf '  %-14s %4d in the background from +%ds at worst, ends by +%ds; step 6 starts by +%ds at worst\n' build \
    "$B_BUILD" "$B_QUERY" "$build_end" "$wait_start"
  printf '  %-14s %4d left at worst before the deadline (the whole rest of the time in practice)\n' tests-rest \
    $((CALL_BUDGET - RESERVE - sum))
  if ((sum + RESERVE > CALL_BUDGET)); then
    echo "FAIL: the fixed steps need $((sum + RESERVE))s (reserve ${RESERVE}s included), over the ${CALL_BUDGET}s call"
    fail=1
  else
    echo "ok: the fixed steps need at most $((sum + RESERVE))s <= ${CALL_BUDGET}s (device timeout_s 420)"
  fi
  if ((build_end > wait_start)); then
    echo "FAIL: the build's budget outlasts the steps it runs beside (ends by +${build_end}s > +${wait_start}s)"
    fail=1
  fi

  for tool in python3 timeout; do
    command -v $tool >/dev/null || {
      echo "FAIL: $tool not found"
      fail=1
    }
  done
  python3 - <<'PY' || fail=1
import importlib
for mod in ("fastdiff", "fastdiff.bench", "fastdiff.schedulers", "pytest", "pytest_benchmark"):
    importlib.import_module(mod)
from fastdiff import bench
from fastdiff.schedulers import PRESETS, SCHEDULERS
heads = [s for s in bench.HEADLINE_SCHEDULERS if s in SCHEDULERS]
pending = [s for s in bench.HEADLINE_SCHEDULERS if s not in SCHEDULERS]
print(f"ok: imports; headline step schedulers: {', '.join(heads)}; not registered yet: {', '.join(pending) or 'none'}")
for s in heads:
    bench.headline_preset(s)
for p, _, _ in bench.BANDWIDTH_CASES:
    assert p in PRESETS, f"bandwidth preset {p!r} is not registered"
assert bench.SyncCounter("cpu").cuda is False
PY
  # setup.py takes the build command the run uses; the architecture string is one it accepts
  if python3 setup.py build_ext --help >/dev/null 2>&1; then
    echo "ok: python3 setup.py build_ext --build-lib/--build-temp"
  else
    echo "FAIL: python3 setup.py build_ext --help"
    fail=1
  fi
  python3 - <<'PY' || fail=1
import ast, pathlib, sys
tree = ast.parse(pathlib.Path("setup.py").read_text())
ns = {}
for node in tree.body:  # the pure helpers only: importing setup.py would run setup()
    if isinstance(node, ast.FunctionDef) and node.name in ("gencode_flags", "fail"):
        exec(compile(ast.Module([node], []), "setup.py", "exec"), {"sys": sys}, ns)
flags = ns["gencode_flags"]("9.0")
assert flags == ["-gencode", "arch=compute_90,code=sm_90"], flags
print("ok: FASTDIFF_CUDA_ARCHS=9.0 (the GPU's compute capability) ->", " ".join(flags))
PY

  echo "pytest selections with the GPU plan (FASTDIFF_BENCH_PLAN=cuda), collected here:"
  local sels
  sels=$(mktemp)
  {
    sel() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$(shift 3 && printf '%q ' "$@")"; }
    sel bench-core 20 "test_step_latent[DDIMScheduler-fp16-diffusers],test_step_latent[DDIMScheduler-fp16-fastdiff-\
triton],test_step_bandwidth[ddpm-philox-fp16-fastdiff-triton],test_step_bandwidth[ddim-none-fp32-diffusers],\
test_loop[cifar10-1-diffusers],test_loop[cifar10-1-fastdiff-graph],test_loop[cifar10-16-fastdiff-eager]" "${SEL_CORE[@]}"
    sel bench-compile 2 "DDIMScheduler-fp16-diffusers-compile,test_loop[cifar10-1-unet-compile]" "${SEL_COMPILE[@]}"
    sel bench-ext 8 "DDIMScheduler-fp16-fastdiff-cuda,ddpm-philox-fp32-fastdiff-cuda" "${SEL_EXT[@]}"
    sel tests-cuda 20 "test_graph.py::,test_csrc.py::,test_capturable.py::" "${SEL_CUDA_TESTS[@]}"
    sel tests-rest 0 "" "${SEL_REST_CUDA[@]}"
    sel tests-other 1 "" "${SEL_REST_OTHER[@]}"
  } >"$sels"
  collect_all "$sels" || fail=1
  rm -f "$sels"

  local dev files count=0
  dev=$(cd benchmarks && python3 -c "from conftest import slug; print(slug('NVIDIA H200'))") || fail=1
  files=${OUT_FILES//DEVICE/$dev}
  for f in $files; do
    count=$((count + 1))
    [[ $f =~ ^[A-Za-z0-9._-]+$ ]] || {
      echo "FAIL: output name '$f' has characters the device tool drops"
      fail=1
    }
  done
  if ((count + 2 > 8)); then # a time limit can leave one .tmp beside each results file
    echo "FAIL: $count output files (+2 .tmp) > 8"
    fail=1
  else
    echo "ok: $count output files (+ at most 2 .tmp from an interrupted write) <= 8: $files"
  fi

  if ls .whl/*.whl >/dev/null 2>&1; then
    local site
    site=$(mktemp -d)
    if python3 -m pip install -q --no-index --no-deps --no-compile --target "$site" .whl/*.whl >/dev/null 2>&1 &&
      PYTHONPATH=$site python3 -c "import diffusers" 2>/dev/null; then
      echo "ok: .whl/ installs offline: $(ls .whl | tr '\n' ' ')"
    else
      echo "FAIL: .whl/ does not install offline (pip install --no-index --no-deps --target)"
      fail=1
    fi
    rm -rf "$site"
  else
    echo "note: no .whl/ here; the device call needs it (carry [\".whl\"], see the header)"
  fi
  if python3 -c "import xdist" 2>/dev/null; then
    echo "note: pytest-xdist here: the tests run in parallel workers"
  else
    echo "note: no pytest-xdist here (the GPU image has it: the tests run in 4-8 workers there)"
  fi
  if command -v nvcc >/dev/null; then echo "note: nvcc here; CUDA_HOME would be $(cuda_home)"; fi
  if ((fail)); then
    echo "gpu_check --dry-run: FAILED"
    return 1
  fi
  echo "gpu_check --dry-run: ok"
}

if ((DRY)); then
  dry_run
  exit $?
fi

# ------------------------------------------------------------------------------------------------ the run

OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
START=$(date +%s)
DEADLINE=$((START + CALL_BUDGET - RESERVE))
WORK=$(mktemp -d) # build tree, facts, the busy-file: nothing here comes back
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} # this checkout, no install: the build runs apart
log() { echo "== +$(($(date +%s) - START))s $*" | tee -a "$OUT/summary.txt"; }

# step NAME BUDGET LOG CMD...: run CMD under `timeout` for min(BUDGET, time to the deadline); log rc and time
step() {
  local name=$1 budget=$2 logf=$3
  shift 3
  local left=$((DEADLINE - $(date +%s) - GRACE))
  ((left < budget)) && budget=$left
  if ((budget < MIN_STEP)); then
    log "$name: SKIPPED, $((left > 0 ? left : 0))s left before the deadline"
    return 0
  fi
  local t0 rc first msg
  t0=$(date +%s)
  first=1
  [[ -f $logf ]] && first=$(($(wc -l <"$logf") + 1))
  echo "===== $name (budget ${budget}s): $*" >>"$logf"
  timeout -k "$GRACE" "$budget" "$@" >>"$logf" 2>&1
  rc=$?
  msg="$name: rc=$rc in $(($(date +%s) - t0))s of ${budget}s"
  ((rc == 124 || rc == 137)) && msg+=" TIME LIMIT (what was measured is kept)"
  log "$msg: $(tail -n "+$first" "$logf" | grep -E ' (passed|failed|skipped|deselected|errors?)\b|no tests ran' | tail -1)"
}

# 1 the GPU (name, driver, memory, compute capability, clock) first; torch, triton and diffusers below
log "start: budget ${CALL_BUDGET}s, results in $OUT"
GPU=$(timeout -k "$GRACE" "$B_QUERY" nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.max.sm \
  --format=csv,noheader 2>&1 | head -1)
log "gpu: $GPU"
CAP=$(cut -d, -f4 <<<"$GPU" | tr -d ' ')
[[ $CAP =~ ^[0-9]+\.[0-9]+$ ]] || CAP="" # empty: torch's build picks the visible GPU's architecture

# 2 the CUDA extension for that architecture only, in the background
CUDA_HOME=$(cuda_home)
export CUDA_HOME
log "build: FASTDIFF_CUDA_ARCHS=${CAP:-picked by torch}, CUDA_HOME=$CUDA_HOME, in the background"
BUSY=$WORK/building # while it exists, the benchmark rows say they ran beside the build
touch "$BUSY"
(
  # CFLAGS=-g0: Python's CFLAGS carry -g, which doubles binding.cpp's compile (scripts/check_cuda_build.sh)
  CFLAGS=-g0 FASTDIFF_FORCE_BUILD=1 FASTDIFF_CUDA_ARCHS=$CAP MAX_JOBS=16 timeout -k "$GRACE" "$B_BUILD" nice -n 19 \
    python3 setup.py build_ext --build-lib "$WORK/lib" --build-temp "$WORK/tmp" >"$OUT/build.log" 2>&1
  echo $? >"$WORK/build.rc"
  date +%s >"$WORK/build.end"
  rm -f "$BUSY"
) &
BUILD_PID=$!
BUILD_T0=$(date +%s)

# 3 diffusers from the carried wheels (before the facts, which name its version)
if ls .whl/*.whl >/dev/null 2>&1; then
  timeout -k "$GRACE" "$B_WHEELS" python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .whl/*.whl >>"$OUT/summary.txt" 2>&1
  log "wheels: rc=$? ($(ls .whl | tr '\n' ' '))"
  export PYTHONPATH=$PYTHONPATH:/tmp/site
else
  log "wheels: no .whl/ (carry it): the diffusers rows and tests will skip"
fi

# 1 (the rest of the facts): versions from the installed metadata, without importing torch (a cold import
# took >15 s on a busy machine); torch's local version names its CUDA (+cu130)
timeout -k "$GRACE" "$B_FACTS" python3 - >"$WORK/facts" 2>&1 <<'PY'
import subprocess, sys
from importlib.metadata import PackageNotFoundError, version

def v(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"

try:
    nvcc = subprocess.run(["nvcc", "--version"], capture_output=True, text=True, timeout=5).stdout.strip()
except Exception as exc:
    nvcc = f"({type(exc).__name__})"
print(f"python {sys.version.split()[0]}, torch {v('torch')}, triton {v('triton')}, diffusers {v('diffusers')}, "
      f"pytest {v('pytest')}, pytest-xdist {v('pytest-xdist')}; nvcc: {(nvcc.splitlines() or ['none'])[-1]}")
PY
tee -a "$OUT/summary.txt" <"$WORK/facts"

# 4-5 the benchmarks that need no extension; the results files are rewritten after every row
export FASTDIFF_BENCH_RESULTS=$OUT FASTDIFF_BENCH_APPEND=1 FASTDIFF_BENCH_QUICK=${FASTDIFF_BENCH_QUICK:-1}
export FASTDIFF_BENCH_BUSY_FILE=$BUSY
step bench-core "$B_CORE" "$OUT/bench.log" python3 -m pytest "${SEL_CORE[@]}" "${BENCH_ARGS[@]}"
step bench-compile "$B_COMPILE" "$OUT/bench.log" python3 -m pytest "${SEL_COMPILE[@]}" "${BENCH_ARGS[@]}"

# 6 the build (bounded by its own timeout), then the module where `import fastdiff._C` finds it
wait "$BUILD_PID"
rc=$(cat "$WORK/build.rc" 2>/dev/null || echo "?")
so=$(ls "$WORK"/lib/fastdiff/_C*.so 2>/dev/null | head -1)
EXT=0
if [[ $rc == 0 && -n $so ]]; then
  cp "$so" fastdiff/
  if why=$(python3 -c "import torch, fastdiff._C" 2>&1); then
    EXT=1
    log "build: the CUDA extension built in $(($(cat "$WORK/build.end") - BUILD_T0))s for sm_${CAP/./}, and loads"
  else
    log "build: the CUDA extension built but does not load: $(tail -1 <<<"$why")"
  fi
else
  [[ $rc == 124 || $rc == 137 ]] && why="over its ${B_BUILD}s budget" || why="see build.log"
  log "build: FAILED rc=$rc ($why): $(grep -m1 -E ' error|Error|fastdiff setup' "$OUT/build.log" | cut -c1-300)"
fi

# 7 the extension's rows
if ((EXT)); then
  step bench-ext "$B_EXT" "$OUT/bench.log" python3 -m pytest "${SEL_EXT[@]}" "${BENCH_ARGS[@]}"
else
  log "bench-ext: SKIPPED, no CUDA extension (no fastdiff-cuda rows; test_csrc's GPU cases skip)"
fi

# 8-9 the tests on CUDA, in parallel workers where pytest-xdist is installed (the GPU image has it; 4 for the
# CUDA-only tests, 8 for the rest, of 16 cores), with a per-test limit where pytest-timeout is, so that one hung
# test cannot take the whole step; -v logs each result as it comes, so a time limit keeps them
TEST_ARGS=(-v -p no:cacheprovider -rfE --maxfail=50 --durations=10)
python3 -c "import pytest_timeout" 2>/dev/null && TEST_ARGS+=(--timeout 90)
workers() { python3 -c "import xdist" 2>/dev/null && echo "-n $1"; }
# shellcheck disable=SC2046
step tests-cuda "$B_CUDA_TESTS" "$OUT/tests.log" python3 -m pytest "${SEL_CUDA_TESTS[@]}" "${TEST_ARGS[@]}" $(workers 4)
# shellcheck disable=SC2046
step tests-rest "$CALL_BUDGET" "$OUT/tests.log" python3 -m pytest "${SEL_REST_CUDA[@]}" "${TEST_ARGS[@]}" $(workers 8)
# shellcheck disable=SC2046
step tests-other "$CALL_BUDGET" "$OUT/tests.log" python3 -m pytest "${SEL_REST_OTHER[@]}" "${TEST_ARGS[@]}" $(workers 8)

# what comes back: the results tables last (the device tool returns the end of the output)
n=$(find "$OUT" -type f | wc -l)
log "done in $(($(date +%s) - START))s; $n files in \$OUT$( ((n > 8)) && echo ' (OVER 8: some will not come back)')"
grep -oE '(FAILED|ERROR) tests/[^ ]+' "$OUT/tests.log" 2>/dev/null | sort -u | head -40
cat "$OUT"/*.md 2>/dev/null
