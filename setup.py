"""Build script. Pure-Python by default on machines without CUDA; builds the optional CUDA extension
``fastdiff._C`` (csrc/) with ninja when a CUDA-enabled torch and nvcc are present.

Environment switches (after flash-attention's):
  FASTDIFF_FORCE_BUILD=1       build the extension, fail with an actionable error if it cannot be built
  FASTDIFF_SKIP_CUDA_BUILD=1   never build it: a pure-Python wheel (``pip wheel .`` on a CPU machine)
  FASTDIFF_CUDA_ARCHS="8.0;9.0" compute capabilities to compile for (default 8.0;8.6;8.9;9.0:
                               A100, A10/RTX 30, L4/RTX 40, H100/H200)
  MAX_JOBS                     parallel compile jobs (default: CPU count, capped by 2 GB of RAM per job)

pip builds in an isolated environment without torch unless told otherwise, so the extension is built
by ``pip install --no-build-isolation .`` (or ``-e .``) in an environment that already has torch.
"""

import os
import shutil
import sys

from setuptools import setup

DEFAULT_ARCHS = "8.0;8.6;8.9;9.0"


def env_flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def fail(msg: str):
    sys.stderr.write(f"\nfastdiff setup: {msg}\n\n")
    raise SystemExit(1)


def max_jobs() -> str:
    cpus = os.cpu_count() or 1
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        mem_gb = 8.0
    # nvcc with torch headers peaks near 1.5-2 GB per job
    return str(max(1, min(cpus, int(mem_gb // 2))))


def gencode_flags(archs: str) -> list:
    flags = []
    for arch in archs.replace(",", ";").split(";"):
        arch = arch.strip()
        if not arch:
            continue
        ptx = arch.endswith("+PTX")
        num = arch.replace("+PTX", "").replace(".", "")
        if not num.isdigit():
            fail(f"FASTDIFF_CUDA_ARCHS entry {arch!r} is not a compute capability like 8.0 or 9.0+PTX")
        flags += ["-gencode", f"arch=compute_{num},code=sm_{num}"]
        if ptx:
            flags += ["-gencode", f"arch=compute_{num},code=compute_{num}"]
    return flags


def cuda_extension():
    force, skip = env_flag("FASTDIFF_FORCE_BUILD"), env_flag("FASTDIFF_SKIP_CUDA_BUILD")
    if skip:
        if force:
            fail("FASTDIFF_FORCE_BUILD=1 and FASTDIFF_SKIP_CUDA_BUILD=1 contradict each other; unset one")
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if force:
            fail(
                "FASTDIFF_FORCE_BUILD=1 but torch is not importable in the build environment. Install a "
                "CUDA-enabled torch first and build with `pip install --no-build-isolation .`"
            )
        return [], {}
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc") if CUDA_HOME else shutil.which("nvcc")
    problems = []
    if torch.version.cuda is None:
        problems.append(f"torch {torch.__version__} is a CPU-only build (torch.version.cuda is None)")
    if not nvcc or not os.path.exists(nvcc):
        problems.append("no CUDA toolkit found (nvcc not on PATH and CUDA_HOME unset)")
    if problems:
        if force:
            fail(
                "FASTDIFF_FORCE_BUILD=1 but the CUDA extension cannot be built: " + "; ".join(problems) + ". "
                "Install the CUDA toolkit matching torch.version.cuda, set CUDA_HOME, and use a CUDA build of "
                "torch; or set FASTDIFF_SKIP_CUDA_BUILD=1 for a pure-Python build."
            )
        return [], {}
    os.environ.setdefault("MAX_JOBS", max_jobs())
    archs = os.environ.get("FASTDIFF_CUDA_ARCHS", DEFAULT_ARCHS)
    ext = CUDAExtension(
        name="fastdiff._C",
        sources=["csrc/binding.cpp", "csrc/fused_step.cu", "csrc/add_noise.cu"],
        include_dirs=[os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")],
        # the C++ standard comes from BuildExtension, which matches it to the installed torch
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *gencode_flags(archs)]},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
