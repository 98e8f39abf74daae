"""Check the compiled deformable attention against the pure-PyTorch reference (``python test.py``).

Prints one line per check, as the Deformable-DETR repositories' test does ("* True ..."), for the
C++ CPU kernel and, with a GPU, the CUDA kernel; exits non-zero if a check fails. The full test
suite is tests/ops/test_msda.py.
"""
from __future__ import annotations

import os
import sys

import torch
from torch.autograd import gradcheck

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from models.ops.functions.ms_deform_attn_func import available_impls, ms_deform_attn  # noqa: E402

N, M, D = 1, 2, 2
Lq, L, P = 2, 2, 2
SHAPES = torch.as_tensor([(6, 4), (3, 2)], dtype=torch.long)
LEVEL_START = torch.cat((SHAPES.new_zeros((1,)), SHAPES.prod(1).cumsum(0)[:-1]))
S = int(SHAPES.prod(1).sum())


def random_inputs(device: str, dtype: torch.dtype, channels: int = D):
    torch.manual_seed(3)
    value = torch.rand(N, S, M, channels, dtype=torch.float64) * 0.01
    loc = torch.rand(N, Lq, M, L, P, 2, dtype=torch.float64)
    attn = torch.rand(N, Lq, M, L, P, dtype=torch.float64) + 1e-5
    attn = attn / attn.sum((-1, -2), keepdim=True)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    return value.to(device, dtype), loc.to(device, coord), attn.to(device, coord)


def report(ok: bool, text: str) -> bool:
    print(f"* {ok} {text}")
    return ok


def check_forward(impl: str, device: str, dtype: torch.dtype, tol: float) -> bool:
    value, loc, attn = random_inputs(device, dtype)
    shapes, starts = SHAPES.to(device), LEVEL_START.to(device)
    expected = ms_deform_attn(value.double(), shapes, starts, loc.double(), attn.double(), impl="pytorch")
    actual = ms_deform_attn(value, shapes, starts, loc, attn, impl=impl).double()
    abs_err = (actual - expected).abs().max().item()
    rel_err = ((actual - expected).abs() / expected.abs()).max().item()
    name = str(dtype).replace("torch.", "")
    text = f"check_forward_equal_with_pytorch_{name} ({impl}): max_abs_err {abs_err:.2e} max_rel_err {rel_err:.2e}"
    return report(abs_err <= tol * expected.abs().max().item(), text)


def check_gradient_numerical(impl: str, device: str, channels: int) -> bool:
    value, loc, attn = random_inputs(device, torch.float64, channels)
    shapes, starts = SHAPES.to(device), LEVEL_START.to(device)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    # Large head dims (which the CUDA kernel splits into several passes) in gradcheck's fast mode.
    ok = gradcheck(lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a, impl=impl), inputs,
                   fast_mode=channels > 100, raise_exception=False)
    return report(ok, f"check_gradient_numerical(D={channels}) ({impl})")


def main() -> int:
    kernels = [("cpu", "cpu")] if "cpu" in available_impls("cpu") else []
    if torch.cuda.is_available() and "cuda" in available_impls("cuda"):
        kernels.append(("cuda", "cuda"))
    if not kernels:
        print("The compiled kernels are not built (run `make ops`, or `python setup.py build install` here); "
              "the pure-PyTorch implementation is used.")
        return 1
    ok = True
    for impl, device in kernels:
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-6), (torch.float16, 2e-3),
                           (torch.bfloat16, 1.6e-2)):
            ok &= check_forward(impl, device, dtype, tol)
        for channels in (30, 32, 64, 71, 1025, 2048, 3096):
            ok &= check_gradient_numerical(impl, device, channels)
    print("all checks passed" if ok else "SOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
