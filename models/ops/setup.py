"""Build the compiled multi-scale deformable attention extension (`detr_msda`).

Usage (from models/ops):
    python setup.py build_ext --inplace    # in-tree module, what `make ops` does
    python setup.py build install          # installed module, the habit of the Deformable-DETR repos

The C++ CPU kernel is always built. The CUDA kernel is added when torch was built with CUDA and
nvcc is found (CUDA_HOME); no GPU is needed to compile. Environment:
    FORCE_CUDA=1            fail unless the CUDA kernel can be built (CI uses this)
    MSDA_NO_CUDA=1          build the CPU kernel only
    TORCH_CUDA_ARCH_LIST    GPU architectures, e.g. "8.0;9.0+PTX"; by default every architecture
                            from 7.0 to 12.0 that this nvcc supports, plus PTX of the newest one
    MAX_JOBS                parallel compile jobs (ninja)
"""
from __future__ import annotations

import os
import re
import subprocess

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Paths below are relative to this file, and `build_ext --inplace` puts the module next to it.
os.chdir(os.path.dirname(os.path.abspath(__file__)))

NAME = "detr_msda"
DEFAULT_ARCHS = ("7.0", "7.5", "8.0", "8.6", "8.9", "9.0", "10.0", "12.0")
CPU_SOURCES = ["src/ms_deform_attn.cpp", "src/cpu/ms_deform_attn_cpu.cpp"]
CUDA_SOURCES = ["src/cuda/ms_deform_attn_cuda.cu"]
HEADERS = ["src/ms_deform_attn.h", "src/cpu/cpu_isa.h", "src/cuda/ms_deform_attn_kernels.cuh"]  # a change rebuilds
# -fno-trapping-math lets GCC vectorise floor(); the kernels never rely on floating-point traps.
CXX_FLAGS = ["-O3", "-fopenmp", "-fno-trapping-math", "-Wno-psabi"] if os.name != "nt" else ["/O2", "/openmp"]


def nvcc_path() -> str | None:
    if CUDA_HOME is None:
        return None
    path = os.path.join(CUDA_HOME, "bin", "nvcc")
    return path if os.path.exists(path) else None


def build_cuda() -> bool:
    """Whether to compile the CUDA kernel."""
    force = os.environ.get("FORCE_CUDA", "0") == "1"
    reasons = []
    if os.environ.get("MSDA_NO_CUDA", "0") == "1":
        reasons.append("MSDA_NO_CUDA=1")
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} was built without CUDA")
    if nvcc_path() is None:
        reasons.append("nvcc not found (set CUDA_HOME)")
    if reasons and force:
        raise SystemExit("FORCE_CUDA=1 but the CUDA kernel cannot be built: " + "; ".join(reasons))
    if reasons:
        print("detr_msda: building the CPU kernel only (" + "; ".join(reasons) + ")")
    return not reasons


def default_arch_list() -> str:
    """Every default architecture this nvcc can compile, plus PTX of the newest for future GPUs."""
    listing = subprocess.run([nvcc_path(), "--list-gpu-code"], capture_output=True, text=True, check=True).stdout
    supported = {f"{int(sm) // 10}.{int(sm) % 10}" for sm in re.findall(r"sm_(\d+)\b", listing)}
    archs = [arch for arch in DEFAULT_ARCHS if arch in supported]
    if not archs:
        raise SystemExit(f"nvcc supports none of {DEFAULT_ARCHS}; set TORCH_CUDA_ARCH_LIST")
    archs[-1] += "+PTX"
    return ";".join(archs)


def nvcc_library_dirs() -> list[str]:
    """Where nvcc itself links libcudart from: torch only looks in CUDA_HOME/lib64 or CUDA_HOME/lib."""
    probe = subprocess.run([nvcc_path(), "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                           capture_output=True, text=True)
    dirs = []
    for line in (probe.stdout + probe.stderr).splitlines():
        if "LIBRARIES=" in line:
            dirs += re.findall(r'-L"?([^"\s]+)"?', line)
    return [d for d in dirs if os.path.exists(os.path.join(d, "libcudart.so"))]


def extension():
    if not build_cuda():
        return CppExtension(NAME, CPU_SOURCES, depends=HEADERS, extra_compile_args={"cxx": CXX_FLAGS},
                            extra_link_args=["-fopenmp"] if os.name != "nt" else [])
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # Read by torch's build; without it torch targets only the GPUs visible now (none on CI).
        os.environ["TORCH_CUDA_ARCH_LIST"] = default_arch_list()
    print(f"detr_msda: building the CPU and CUDA kernels for {os.environ['TORCH_CUDA_ARCH_LIST']}")
    nvcc_flags = ["-O3", f"--threads={min(4, os.cpu_count() or 1)}", "-DWITH_CUDA"]
    return CUDAExtension(NAME, CPU_SOURCES + CUDA_SOURCES, depends=HEADERS, library_dirs=nvcc_library_dirs(),
                         extra_compile_args={"cxx": CXX_FLAGS + ["-DWITH_CUDA"], "nvcc": nvcc_flags},
                         extra_link_args=["-fopenmp"] if os.name != "nt" else [])


setup(
    name=NAME,
    version="1.0.0",
    description="Multi-scale deformable attention (C++ CPU and CUDA kernels) for DETR-family detectors",
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
)
