"""Check the CUDA kernels without a GPU: compile them for the CPU (cuda_emulation.h) and compare
their forward and gradients with the pure-PyTorch reference on the cases of tests/ops/test_msda.py.

    python tests/ops/cuda_emulation/run_emulation.py    # a few minutes: two builds, one host thread per GPU thread

Every case runs under each launch setting of TUNINGS (one point slice as the encoder gets, the GPU defaults
for a decoder-sized launch, and forced 2 and 4 point slices with narrower vectors), so every code path of
the layout (slices that split the (level, point) pairs, the slices' reductions, a slice left with no pair in
its last round) is checked; check_layouts pins which layout the launchers pick.

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


# Launch settings (DETR_MSDA_CUDA_TUNING on a GPU): (forward vector bytes, backward vector bytes, point lanes,
# vector atomics); point lanes 0 = the GPU default for a GPU that holds TARGET_THREADS threads at once, which for
# these small problems widens the groups as far as a warp allows (what a decoder gets on a real GPU). Vector
# atomics only exist in the sm_90 build.
TARGET_THREADS = 1 << 40
TUNINGS = {
    "one slice, 16 B": (16, 16, 1, True),  # the encoder's layout
    "gpu default": (16, 0, 0, True),  # backward 8 B for 2-byte values
    "2 slices, 8 B": (8, 8, 2, True),
    "4 slices, 16 B": (16, 16, 4, False),  # scalar atomics
}


def emulated(ext, value, shapes, starts, loc, attn, grad_dtype, tuning):
    fwd_bytes, bwd_bytes, point_lanes, vector_atomics = tuning
    if bwd_bytes == 0:
        bwd_bytes = 8 if value.element_size() == 2 else 16
    out = ext.forward(value, shapes, starts, loc, attn, fwd_bytes, point_lanes, TARGET_THREADS)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grads = ext.backward(grad.to(grad_dtype).to(out.dtype), value, shapes, starts, loc, attn, bwd_bytes, point_lanes,
                         TARGET_THREADS, vector_atomics)
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
    ok = check_layouts(ext)
    for name, tuning in TUNINGS.items():
        ok &= check_tuning(ext, arch, name, tuning)
    return ok


def check_layouts(ext) -> bool:
    """The launch layouts the GPU code picks: (channels per lane, channel lanes, point lanes)."""
    value = torch.zeros(2, 10, 8, 32, dtype=torch.float32)
    loc = torch.zeros(2, 300, 8, 4, 4, 2)
    expected = {  # (dtype, vec bytes, point lanes, target threads): layout
        (torch.float32, 16, 0, 270336): (4, 8, 4),  # H200 (132 SMs x 2048): decoder 300 queries -> 4 slices
        (torch.float32, 16, 0, 38400): (4, 8, 1),  # already fills a small GPU: one slice
        (torch.bfloat16, 16, 0, 270336): (8, 4, 8),
        (torch.bfloat16, 8, 0, 270336): (4, 8, 4),
        (torch.float32, 16, 32, 0): (4, 8, 4),  # an override is capped to a warp
        (torch.float64, 16, 0, 1 << 40): (2, 16, 2),
    }
    ok = True
    for (dtype, vec_bytes, point_lanes, target), layout in expected.items():
        got = tuple(ext.params(value.to(dtype), loc, vec_bytes, point_lanes, target))
        passed = got == layout
        ok &= passed
        print(f"* {passed} layout {str(dtype).replace('torch.', '')} {vec_bytes} B, point lanes {point_lanes}, "
              f"target {target}: {got} (expected {layout})")
    return ok


def check_tuning(ext, arch: str, tuning_name: str, tuning: tuple[int, int, int, bool]) -> bool:
    ok = True
    cases = {**CASES, **EXTRA_CASES}
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        tol = {torch.float64: 1e-12, torch.float32: FP32_GRAD_TOLERANCE}.get(dtype) or HALF_TOLERANCE[dtype]
        grad_tol = tol if dtype in (torch.float64, torch.float32) else FP32_GRAD_TOLERANCE
        for name, case in cases.items():
            if dtype != torch.float64 and name in ("batch65", "one_head_query_split"):
                continue  # large in threads; covered in float64
            inputs = make_inputs(*case, dtype=dtype)
            out, grads = emulated(ext, *inputs, grad_dtype=dtype, tuning=tuning)
            ref_out, ref_grads = reference(*inputs)
            errors = [relative_error(a, e) for a, e in zip((out, *grads), (ref_out, *ref_grads))]
            passed = all(e <= t for e, t in zip(errors, (tol, tol, grad_tol, grad_tol)))
            ok &= passed
            print(f"* {passed} {arch} {tuning_name:<16} {str(dtype).replace('torch.', ''):<9} {name:<21} "
                  f"output {errors[0]:.1e}  grad value {errors[1]:.1e}  grad loc {errors[2]:.1e}  "
                  f"grad attn {errors[3]:.1e}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
