#!/usr/bin/env bash
# Installs fastdiff with its test extras into the active Python environment.
# Where no torch is installed yet, torch is pinned to 2.13.0 so that pip takes the CPU wheel
# instead of pulling several GB of CUDA packages; an existing torch (a GPU machine's) is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
pin=()
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  pin=("torch==2.13.0")
fi
"$PY" -m pip install --upgrade pip >/dev/null
"$PY" -m pip install "${pin[@]}" -e ".[test]"
