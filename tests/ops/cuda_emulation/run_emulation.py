"""Check the CUDA kernels without a GPU: compile them for the CPU (cuda_emulation.h) and compare
their forward and gradients with the pure-PyTorch reference on the cases of tests/ops/test_msda.py.

    python tests/ops/cuda_emulation/run_emulation.py    # a few minutes: two builds, one host thread per GPU thread

Not part of the test suite (the build alone takes a minute); run it after changing the kernels.
Exits non-zero when a check fails.
"""
from __future__ import annotations

import os
import sys

import torch
from torch.utils.cpp_extension import load

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
from test_msda import CASES, FP32_GRAD_TOLERANCE, HALF_TOLERANCE, make_inputs, reference, relative_error  # noqa: E402

EXTRA_CASES = {  # several channel passes per lane group, odd head dims, one lane per head
    "d1025": (1, 2, 2, 1025, [(3, 2), (2, 1)], 2),
    "d256": (1, 3, 2, 256, [(4, 3)], 2),
    "d4": (2, 5, 3, 4, [(3, 3), (2, 2)], 2),
    "d36": (1, 4, 2, 36, [(5, 4), (2, 2)], 3),
}


def emulated(ext, value, shapes, starts, loc, attn, grad_dtype):
    out = ext.forward(value, shapes, starts, loc, attn)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = ext.backward(grad.to(grad_dtype).to(out.dtype), value, shapes, starts, loc, attn)
    return out, grads


def main() -> int:
    ok = True
    for arch, flags in (("sm_80", []), ("sm_90", ["-DMSDA_EMULATE_SM90"])):
        ext = load(f"msda_cuda_emulation_{arch}", [os.path.join(HERE, "emulate.cpp")],
                   extra_cflags=["-O1", "-std=c++20", *flags], verbose=False)
        ok &= check(ext, arch)
    print("all emulated CUDA checks passed" if ok else "SOME EMULATED CUDA CHECKS FAILED")
    return 0 if ok else 1


def check(ext, arch: str) -> bool:
    ok = True
    cases = {**CASES, **EXTRA_CASES}
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        tol = {torch.float64: 1e-12, torch.float32: FP32_GRAD_TOLERANCE}.get(dtype) or HALF_TOLERANCE[dtype]
        grad_tol = tol if dtype in (torch.float64, torch.float32) else FP32_GRAD_TOLERANCE
        for name, case in cases.items():
            if dtype != torch.float64 and name in ("batch65", "one_head_query_split"):
                continue  # large in threads; covered in float64
            inputs = make_inputs(*case, dtype=dtype)
            out, grads = emulated(ext, *inputs, grad_dtype=dtype)
            ref_out, ref_grads = reference(*inputs)
            errors = [relative_error(a, e) for a, e in zip((out, *grads), (ref_out, *ref_grads))]
            passed = all(e <= t for e, t in zip(errors, (tol, tol, grad_tol, grad_tol)))
            ok &= passed
            print(f"* {passed} {arch} {str(dtype).replace('torch.', ''):<9} {name:<21} output {errors[0]:.1e}  "
                  f"grad value {errors[1]:.1e}  grad loc {errors[2]:.1e}  grad attn {errors[3]:.1e}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
