#!/usr/bin/env bash
# One-call GPU check for a CUDA machine without network: install, build the CUDA extension (when
# csrc/ is there and nvcc works), install diffusers from carried wheels (.whl/, made here by
# `bash ../shared/tools/offline-wheels.sh`), run the whole test suite on CUDA, then the benchmarks.
# Logs and results go to $OUT (default ./out). Usage: bash scripts/gpu_check.sh [tests|bench|quick|all]
#   tests: the suite on CUDA; bench: pytest-benchmark suites (results JSON + markdown in $OUT);
#   quick: `fastdiff bench` (a representative subset); all: tests then bench.
# FASTDIFF_CUDA_ARCHS defaults to 9.0 here (the GPU at hand) to keep the build short. Time limits
# (TEST_TIMEOUT 270 s, BENCH_TIMEOUT 200 s) send SIGTERM, which the conftests turn into Ctrl-C, so pytest
# still prints its summary; the benchmark results files are rewritten after every measured row.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
what=${1:-all}
export PYTHONUNBUFFERED=1
log() { echo "== $(date +%T) $*" | tee -a "$OUT/summary.txt"; }

log "device: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1)"
python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  | tee -a "$OUT/summary.txt"

if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tee -a "$OUT/summary.txt"

# the package: an editable install builds csrc/ when nvcc is found (setup.py decides)
export FASTDIFF_CUDA_ARCHS=${FASTDIFF_CUDA_ARCHS:-9.0}
t0=$(date +%s)
python3 -m pip install -q --no-deps --no-build-isolation --no-index --disable-pip-version-check -e . \
  > "$OUT/install.log" 2>&1
log "install rc=$? in $(( $(date +%s) - t0 ))s (log: install.log)"
python3 -c "import setuptools; print('setuptools', setuptools.__version__)" | tee -a "$OUT/summary.txt"
python3 -m fastdiff doctor 2>&1 | tee -a "$OUT/summary.txt" || true

if [[ $what == all || $what == tests ]]; then
  t0=$(date +%s)
  timeout -k 20 "${TEST_TIMEOUT:-270}" python3 -m pytest -q --maxfail=30 --durations=15 -p no:cacheprovider -p no:warnings \
    tests > "$OUT/tests.log" 2>&1
  rc=$?
  log "tests rc=$rc in $(( $(date +%s) - t0 ))s: $(tail -1 "$OUT/tests.log")"
fi
if [[ $what == quick ]]; then
  timeout 200 python3 -m fastdiff bench 2>&1 | tee "$OUT/bench.log"
fi
if [[ $what == all || $what == bench ]]; then
  t0=$(date +%s)
  FASTDIFF_BENCH_RESULTS="$OUT" FASTDIFF_BENCH_QUICK=${FASTDIFF_BENCH_QUICK:-1} timeout -k 20 "${BENCH_TIMEOUT:-200}" \
    python3 -m pytest benchmarks/ --benchmark-only -q -p no:cacheprovider -p no:warnings \
    --benchmark-columns=median,iqr,rounds > "$OUT/bench.log" 2>&1
  log "bench rc=$? in $(( $(date +%s) - t0 ))s"
  cat "$OUT"/*.md 2>/dev/null | head -120
fi
tail -25 "$OUT/tests.log" 2>/dev/null
