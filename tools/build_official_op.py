"""Build the official Deformable-DETR CUDA op beside ours, to time the two side by side in one run.

    python tools/build_official_op.py .official/Deformable-DETR /tmp/official_op    # then PYTHONPATH=/tmp/official_op

The official op (fundamentalvision/Deformable-DETR ``models/ops``, also in mmcv, detrex, HF transformers) does not
compile on torch 2: it calls ATen functions torch has since removed. This copies its sources to BUILD_DIR (nothing
of them enters this repository), makes the mechanical updates in ``UPDATES`` (the same calls under their current
names; the kernels are untouched), builds the extension ``MultiScaleDeformableAttention`` in place for the local
GPU's architecture (``TORCH_CUDA_ARCH_LIST`` as set, else the visible GPU's), copies its Python wrapper
(``functions/``), and checks that both import. ``tools/benchmark_msda.py --official_op BUILD_DIR`` and
``tools/compare_official_step.py --device cuda`` (with BUILD_DIR on PYTHONPATH) then use it.
``--sources_only`` stops after the updated copy (checks the updates without a GPU).

``bash tools/device_official.sh PATH`` puts a checkout into ``.official/`` for a lent GPU machine to carry.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

# (pattern, replacement, why): each must match in at least one file, or the checkout is not the expected one
UPDATES = [
    (r"\.type\(\)\.is_cuda\(\)", ".is_cuda()", "Tensor::type() was removed"),
    (r"AT_DISPATCH_FLOATING_TYPES\((\w+)\.type\(\)", r"AT_DISPATCH_FLOATING_TYPES(\1.scalar_type()",
     "dispatch on the scalar type"),
    (r"\.data<", ".data_ptr<", "Tensor::data<T>() was removed"),
    (r"AT_ASSERTM\(", "TORCH_CHECK(", "AT_ASSERTM was removed"),
    (r"AT_ERROR\(", "TORCH_CHECK(false, ", "AT_ERROR was removed"),
    (r"#include <THC/THCAtomics.cuh>", "#include <ATen/cuda/Atomic.cuh>", "THC was removed"),
]
EXTENSION = "MultiScaleDeformableAttention"


def update_sources(official: Path, build: Path) -> dict[str, int]:
    ops = official / "models" / "ops"
    if not (ops / "src" / "cuda" / "ms_deform_attn_cuda.cu").is_file() or not (ops / "functions").is_dir():
        sys.exit(f"{official}: not a checkout of fundamentalvision/Deformable-DETR (no models/ops/src/cuda/"
                 "ms_deform_attn_cuda.cu or models/ops/functions)")
    if build.exists():
        shutil.rmtree(build)
    shutil.copytree(ops / "src", build / "src")
    shutil.copytree(ops / "functions", build / "functions")
    counts = {pattern: 0 for pattern, _, _ in UPDATES}
    for path in sorted((build / "src").rglob("*")):
        if path.suffix not in (".cu", ".cuh", ".cpp", ".h"):
            continue
        text = path.read_text()
        for pattern, replacement, _ in UPDATES:
            text, n = re.subn(pattern, replacement, text)
            counts[pattern] += n
        path.write_text(text)
    missing = [p for p, n in counts.items() if n == 0]
    if missing:
        sys.exit(f"{official}: these updates found nothing to update (another version of the sources?): {missing}")
    return counts


# Its sources include ATen/cuda/CUDAContext.h, which needs the cuSPARSE and cuBLAS headers: a toolkit without them
# (a bare nvcc) borrows those of the pip-installed CUDA libraries torch runs on.
SETUP = r"""
import glob, os, site, sys
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
here = os.path.dirname(os.path.abspath(__file__))
sources = sorted(glob.glob(f"{here}/src/*.cpp") + glob.glob(f"{here}/src/cpu/*.cpp")
                 + glob.glob(f"{here}/src/cuda/*.cu"))
includes = [f"{here}/src"]
if not os.path.exists(os.path.join(CUDA_HOME or "", "include", "cusparse.h")):
    includes += [os.path.dirname(h) for d in site.getsitepackages()
                 for h in glob.glob(f"{d}/nvidia/*/include/cusparse.h")]
setup(name="MultiScaleDeformableAttention", ext_modules=[CUDAExtension(
    "MultiScaleDeformableAttention", sources, include_dirs=includes, define_macros=[("WITH_CUDA", None)],
    extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-DCUDA_HAS_FP16=1", "-D__CUDA_NO_HALF_OPERATORS__",
                                                "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__"]})],
    cmdclass={"build_ext": BuildExtension})
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("official", type=Path, help="a checkout of fundamentalvision/Deformable-DETR")
    p.add_argument("build", type=Path, help="where the updated copy and the built extension go")
    p.add_argument("--sources_only", action="store_true", help="only copy and update the sources")
    args = p.parse_args()
    build = args.build.expanduser().resolve()
    counts = update_sources(args.official.expanduser().resolve(), build)
    for pattern, replacement, why in UPDATES:
        print(f"{counts[pattern]:4d} x {pattern!r} -> {replacement!r} ({why})")
    if args.sources_only:
        return 0
    env = dict(os.environ)
    if "TORCH_CUDA_ARCH_LIST" not in env:
        import torch
        env["TORCH_CUDA_ARCH_LIST"] = "%d.%d" % torch.cuda.get_device_capability()
    (build / "setup.py").write_text(SETUP)
    subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=build, env=env, check=True)
    check = (f"import sys, torch; sys.path.insert(0, {str(build)!r}); import {EXTENSION}; "
             "from functions.ms_deform_attn_func import MSDeformAttnFunction; print('official op imports')")
    subprocess.run([sys.executable, "-c", check], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
