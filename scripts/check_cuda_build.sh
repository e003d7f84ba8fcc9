#!/usr/bin/env bash
# Builds the whole CUDA extension, csrc/*.cu and binding.cpp, through setup.py's build_ext (so whatever csrc/ and
# setup.py hold today), for sm_90 against a CUDA build of torch with this machine's nvcc: compile and link only,
# no GPU needed. Then it loads the module into that torch (an undefined symbol fails here, not on the GPU),
# lists the ops it registers with their schemas, and checks every `torch.ops.fastdiff.<op>(...)` call in
# fastdiff/*.py against them (argument count and keyword names). Run it before every change to csrc/, setup.py
# or the op boundary lands: a GPU minute must never go to a compile error.
#
# usage: bash scripts/check_cuda_build.sh [--venv DIR] [--torch VERSION] [--arch 9.0] [--jobs N]
#   --venv   the CUDA torch's environment, outside any repository (default $FASTDIFF_CUDA_VENV, else
#            ~/.cache/fastdiff/cuda-venv); created when missing or holding another torch, reused after
#   --torch  the CUDA build of torch to install there (default 2.14.1: on this project's machines it comes from
#            the local wheel mirror, ~5.5 GB with its nvidia-* wheels, ~2 min)
#
# Why each setting (found building here with nvcc 13.0 and torch 2.14.1+cu130, 2026-11-30):
# - CUDA_HOME from nvcc itself: torch guesses the folder above `which nvcc`, and /usr/local/bin/nvcc here is a
#   wrapper script, so the guess (/usr/local) has no include/ or lib64/ and binding.cpp misses cuda_runtime_api.h.
# - CPATH gets the nvidia-* wheels' include folders: the toolkit here lacks the cuBLAS/cuSPARSE/cuRAND/cuSOLVER
#   headers that torch's ATen/cuda/CUDAContext.h includes (today's binding.cpp does not include it and builds
#   without them; a binding that does fails with "cusparse.h: No such file"). CPATH is searched after every -I, so
#   the toolkit's own headers still come first (the wheels hold a cuda_runtime.h of another patch level).
# - torch refuses an nvcc of another CUDA major version than its own (its _check_cuda_version; a minor mismatch
#   only warns): this script stops with that message instead of bypassing it, since headers of another major
#   version would not show what the GPU machine (torch 2.11, CUDA 13.0) compiles.
# - ninja in the venv and on PATH: without it torch compiles the three files one after another.
# - CFLAGS=-g0: Python's own CFLAGS carry -g, and debug info doubles binding.cpp's compile (111 s -> 60 s of CPU
#   here); the flags setup.py sets (-O3, the gencode list) are unchanged.
# - the GPU machine's torch is 2.11, this one 2.14: code that needs a torch API newer than 2.11 passes here and
#   fails there; gpu_check.sh builds there again anyway (in the background, first thing).
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD

VENV=${FASTDIFF_CUDA_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/fastdiff/cuda-venv}
TORCH=2.14.1
ARCH=9.0
JOBS=$(nproc 2>/dev/null || echo 2)
while (($#)); do
  case $1 in
    --venv) VENV=$2; shift ;;
    --torch) TORCH=$2; shift ;;
    --arch) ARCH=$2; shift ;;
    --jobs) JOBS=$2; shift ;;
    -h | --help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "check_cuda_build: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
t_start=$(date +%s)
say() { echo "check_cuda_build [+$(($(date +%s) - t_start))s]: $*"; }

command -v nvcc >/dev/null || { say "FAIL: no nvcc on PATH (install the CUDA toolkit)"; exit 1; }
top=$(nvcc --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
CUDA_HOME=$(cd "${top:?nvcc --dryrun printed no TOP}" && pwd) # TOP is the toolkit's bin/..
nvcc_ver=$(nvcc --version | sed -n 's/.*release \([0-9]*\.[0-9]*\).*/\1/p')
say "nvcc $nvcc_ver, CUDA_HOME=$CUDA_HOME"

# the CUDA torch's environment: reused when it holds the asked-for torch
t0=$(date +%s)
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
  say "creating $VENV with torch==$TORCH (CUDA build) and ninja"
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -m pip install -q "torch==$TORCH" ninja setuptools 2>&1 | grep -v "^WARNING: Location" || true
fi
t_env=$(($(date +%s) - t0))
read -r torch_ver torch_cuda site < <("$VENV/bin/python" -c "
import os, torch
print(torch.__version__, torch.version.cuda, os.path.dirname(os.path.dirname(torch.__file__)))" 2>/dev/null)
say "torch $torch_ver (CUDA $torch_cuda) in $VENV (${t_env}s)"
if [[ $torch_cuda == None ]]; then
  say "FAIL: torch $torch_ver in $VENV is a CPU build; pass --torch with a CUDA build"
  exit 1
fi
if [[ ${torch_cuda%%.*} != "${nvcc_ver%%.*}" ]]; then
  say "FAIL: nvcc $nvcc_ver and torch's CUDA $torch_cuda differ in major version; torch's build refuses that."
  say "      Pick a torch built for CUDA ${nvcc_ver%%.*}.x (--torch) or another nvcc."
  exit 1
fi
[[ $torch_cuda == "$nvcc_ver" ]] || say "note: nvcc $nvcc_ver vs torch's CUDA $torch_cuda: torch only warns"

# the nvidia-* wheels' headers, after the toolkit's own
wheel_inc=$(find "$site/nvidia" -mindepth 2 -maxdepth 2 -type d -name include 2>/dev/null | sort | paste -sd: -)
say "extra headers (CPATH): ${wheel_inc:-none found}"

# compile and link, through setup.py, outside the checkout
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
t0=$(date +%s)
set +e
PATH=$VENV/bin:$PATH CUDA_HOME=$CUDA_HOME CPATH=$wheel_inc${CPATH:+:$CPATH} CFLAGS=-g0 FASTDIFF_FORCE_BUILD=1 \
  FASTDIFF_CUDA_ARCHS=$ARCH MAX_JOBS=$JOBS "$VENV/bin/python" setup.py -q build_ext --build-lib "$build/lib" \
  --build-temp "$build/tmp" >"$build/log" 2>&1
rc=$?
set -e
t_build=$(($(date +%s) - t0))
grep -E '^\[[0-9]+/[0-9]+\]' "$build/log" | sed 's/ -.*//' | sed 's/^/  /' || true
if ((rc != 0)); then
  grep -E -B2 -A6 'error|Error' "$build/log" | head -60
  say "FAIL: the build failed (rc=$rc, ${t_build}s); full log above the errors: $build/log is removed on exit"
  exit 1
fi
so=$(ls "$build"/lib/fastdiff/_C*.so)
say "built $(basename "$so") for sm_${ARCH/./} in ${t_build}s ($(du -h "$so" | cut -f1)); warnings: $(grep -c -i warning "$build/log" || true)"

# load it, list what it registers, and check the Python call sites against the schemas
"$VENV/bin/python" - "$so" "$repo" <<'PY'
import ast, importlib.util, pathlib, sys, warnings

warnings.filterwarnings("ignore")
import torch

so, repo = sys.argv[1], pathlib.Path(sys.argv[2])
spec = importlib.util.spec_from_file_location("fastdiff._C", so)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)  # dlopen with RTLD_NOW: an undefined symbol fails here
schemas = {}
for name in torch._C._dispatch_get_all_op_names():
    if name.startswith("fastdiff::"):
        op = name.split("::", 1)[1]
        schemas[op] = getattr(torch.ops.fastdiff, op).default._schema
if not schemas:
    sys.exit("FAIL: the module registers no fastdiff:: op")
for op, schema in sorted(schemas.items()):
    print(f"  registers {schema}")

fail = False
for path in sorted((repo / "fastdiff").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        f = node.func
        owner = f.value
        if not (isinstance(owner, ast.Attribute) and owner.attr == "fastdiff" and ast.unparse(owner) == "torch.ops.fastdiff"):
            continue
        op, where = f.attr, f"{path.relative_to(repo)}:{node.lineno}"
        if op not in schemas:
            continue  # an op defined in Python (torch.library), not by the extension
        args = schemas[op].arguments
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            print(f"  {where}: torch.ops.fastdiff.{op}(*...) not checked (splatted arguments)")
            continue
        required = sum(1 for a in args if not a.has_default_value() and not a.kwarg_only)
        positional = [a for a in args if not a.kwarg_only]
        names = {a.name for a in args}
        given = len(node.args) + len(node.keywords)
        problems = []
        if len(node.args) > len(positional):
            problems.append(f"{len(node.args)} positional arguments, the schema takes {len(positional)}")
        bad = [k.arg for k in node.keywords if k.arg not in names]
        if bad:
            problems.append(f"keywords {bad} not in the schema")
        if given < required:
            problems.append(f"{given} arguments, the schema needs {required}")
        if problems:
            fail = True
            print(f"  FAIL {where}: torch.ops.fastdiff.{op}: " + "; ".join(problems) + f"\n       schema: {schemas[op]}")
        else:
            print(f"  ok {where}: torch.ops.fastdiff.{op} with {given} arguments matches its schema")
sys.exit(1 if fail else 0)
PY
say "ok: the whole extension compiles, links and loads for sm_${ARCH/./} (environment ${t_env}s, build ${t_build}s, total $(($(date +%s) - t_start))s)"
