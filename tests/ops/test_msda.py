"""Multi-scale deformable attention: the compiled kernels against the pure-PyTorch reference.

The kernel tests skip (with the reason) when the extension is not built; CI builds it (`make ops`).
CUDA tests are marked `cuda` and skip without a GPU.
"""
from __future__ import annotations

import pytest
import torch

from models.ops import MSDeformAttn, ms_deform_attn
from models.ops.functions.ms_deform_attn_func import IMPLS, available_impls, resolve_impl

CPU_BUILT = "cpu" in available_impls("cpu")
CUDA_BUILT = torch.cuda.is_available() and "cuda" in available_impls("cuda")
needs_cpu_kernel = pytest.mark.skipif(not CPU_BUILT, reason="C++ kernel not built (run `make ops`)")
needs_cuda_kernel = pytest.mark.skipif(not CUDA_BUILT, reason="needs a CUDA device and the CUDA kernel built")

# Half-precision tolerances, as max |error| / max |reference| against a float64 reference computed
# from the same rounded values: the output and grad_value are rounded to the value dtype once; the
# location and weight gradients are fp32.
HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
FP32_GRAD_TOLERANCE = 1e-5

# name: (batch, queries, heads, head dim, level shapes, points)
CASES = {
    "d32": (2, 7, 3, 32, [(6, 5), (3, 3), (1, 2)], 4),
    "d64": (2, 5, 2, 64, [(5, 7), (2, 3)], 2),
    "d30": (1, 6, 2, 30, [(4, 6), (2, 3)], 3),
    "d5": (2, 4, 3, 5, [(3, 4), (2, 2)], 2),
    "one_level": (1, 9, 2, 32, [(7, 9)], 3),
    "batch65": (65, 3, 2, 32, [(4, 4), (2, 2)], 2),
    "one_head_query_split": (1, 300, 1, 32, [(10, 10), (5, 5)], 4),  # fewer (batch, head) than threads
}


def make_inputs(batch: int, len_q: int, heads: int, head_dim: int, shapes: list[tuple[int, int]], points: int,
                dtype: torch.dtype = torch.float64, device: str = "cpu", seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Random inputs; locations in [-0.15, 1.15] so that some points and corners fall outside."""
    gen = torch.Generator().manual_seed(seed)
    shapes_t = torch.tensor(shapes, dtype=torch.long)
    sizes = shapes_t[:, 0] * shapes_t[:, 1]
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    value = torch.randn(batch, int(sizes.sum()), heads, head_dim, generator=gen, dtype=torch.float64)
    loc = torch.rand(batch, len_q, heads, len(shapes), points, 2, generator=gen, dtype=torch.float64) * 1.3 - 0.15
    attn = torch.rand(batch, len_q, heads, len(shapes), points, generator=gen, dtype=torch.float64)
    attn = attn / attn.sum((-1, -2), keepdim=True)
    coord = torch.float64 if dtype == torch.float64 else torch.float32
    return (value.to(device, dtype), shapes_t.to(device), starts.to(device), loc.to(device, coord),
            attn.to(device, coord))


def forward_backward(impl: str, value, shapes, starts, loc, attn, grad_dtype: torch.dtype | None = None):
    """Output and the gradients of (value, locations, weights) for a fixed random output gradient.

    The output gradient is rounded to ``grad_dtype`` (default: the value dtype) first, so that a
    float64 reference sees exactly the gradient a half-precision kernel sees.
    """
    leaves = [t.detach().clone().requires_grad_() for t in (value, loc, attn)]
    out = ms_deform_attn(leaves[0], shapes, starts, leaves[1], leaves[2], impl=impl)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    grad = grad.to(grad_dtype or value.dtype).to(out.device, out.dtype)
    return out, torch.autograd.grad(out, leaves, grad)


def reference(value, shapes, starts, loc, attn):
    """The pure-PyTorch path in float64 on the same (possibly rounded) inputs, on the CPU."""
    as64 = [t.cpu().double() if t.is_floating_point() else t.cpu() for t in (value, shapes, starts, loc, attn)]
    return forward_backward("pytorch", *as64, grad_dtype=value.dtype)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double().cpu() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def assert_matches_reference(inputs, impl: str, tolerances: tuple[float, float, float, float]) -> None:
    out, grads = forward_backward(impl, *inputs)
    ref_out, ref_grads = reference(*inputs)
    assert out.dtype == inputs[0].dtype and out.shape == ref_out.shape
    names = ("output", "grad value", "grad locations", "grad weights")
    for name, actual, expected, tol in zip(names, (out, *grads), (ref_out, *ref_grads), tolerances):
        assert actual.shape == expected.shape, name
        assert relative_error(actual, expected) <= tol, f"{name}: {relative_error(actual, expected):.2e} > {tol}"


# ------------------------------------------------------------------------------------------------
# Dispatch (no extension needed)
def test_impl_names_and_errors():
    assert IMPLS == ("auto", "pytorch", "cpu", "cuda")
    inputs = make_inputs(*CASES["d5"], dtype=torch.float32)
    with pytest.raises(ValueError, match="unknown MSDeformAttn implementation"):
        ms_deform_attn(*inputs, impl="triton")
    with pytest.raises(RuntimeError, match="cannot run on cpu tensors"):
        ms_deform_attn(*inputs, impl="cuda")
    assert resolve_impl("auto", "cpu") == ("cpu" if CPU_BUILT else "pytorch")
    assert resolve_impl("pytorch", "cpu") == "pytorch"
    if not CPU_BUILT:
        with pytest.raises(RuntimeError, match="not built"):
            ms_deform_attn(*inputs, impl="cpu")


def test_pytorch_path_keeps_dtype():
    inputs = make_inputs(*CASES["d5"], dtype=torch.float64)
    assert ms_deform_attn(*inputs, impl="pytorch").dtype == torch.float64
    inputs = make_inputs(*CASES["d5"], dtype=torch.bfloat16)
    assert ms_deform_attn(*inputs, impl="pytorch").dtype == torch.bfloat16


# ------------------------------------------------------------------------------------------------
# C++ CPU kernel
@needs_cpu_kernel
@pytest.mark.parametrize("case", sorted(CASES))
def test_cpu_float64_matches_reference(case):
    assert_matches_reference(make_inputs(*CASES[case]), "cpu", (1e-12,) * 4)


@needs_cpu_kernel
def test_cpu_float32_matches_reference():
    tol = FP32_GRAD_TOLERANCE
    assert_matches_reference(make_inputs(*CASES["d32"], dtype=torch.float32), "cpu", (tol,) * 4)


@needs_cpu_kernel
@pytest.mark.parametrize("head_dim", [32, 30])
def test_cpu_gradcheck(head_dim):
    value, shapes, starts, loc, attn = make_inputs(1, 3, 2, head_dim, [(4, 3), (2, 2)], 2)
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a, impl="cpu"), inputs)


@needs_cpu_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_precision(dtype):
    tol = HALF_TOLERANCE[dtype]
    assert_matches_reference(make_inputs(*CASES["d32"], dtype=dtype), "cpu", (tol, tol, FP32_GRAD_TOLERANCE,
                                                                              FP32_GRAD_TOLERANCE))


@needs_cpu_kernel
def test_cpu_zero_queries():
    value, shapes, starts, loc, attn = make_inputs(2, 0, 2, 32, [(4, 4)], 2, dtype=torch.float32)
    out, (grad_value, grad_loc, grad_attn) = forward_backward("cpu", value, shapes, starts, loc, attn)
    assert out.shape == (2, 0, 64)
    assert torch.equal(grad_value, torch.zeros_like(value)) and grad_loc.shape == loc.shape


@needs_cpu_kernel
def test_cpu_points_outside_the_map_contribute_nothing():
    value, shapes, starts, loc, attn = make_inputs(*CASES["d32"], dtype=torch.float32)
    loc = torch.where(torch.arange(loc.numel()).view(loc.shape) % 2 == 0, 1.6, -0.7).float()  # all outside
    out, grads = forward_backward("cpu", value, shapes, starts, loc, attn)
    assert not out.any() and not any(g.any() for g in grads)


@needs_cpu_kernel
def test_module_auto_picks_the_kernel_and_matches_with_padding_mask():
    torch.manual_seed(0)
    shapes = torch.tensor([[6, 8], [3, 4]])
    starts = torch.tensor([0, 48])
    kernel = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2, impl="auto")
    reference_module = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2, impl="pytorch")
    reference_module.load_state_dict(kernel.state_dict())
    query, memory = torch.randn(2, 10, 64), torch.randn(2, 60, 64)
    ref_points = torch.rand(2, 10, 2, 2)
    mask = torch.zeros(2, 60, dtype=torch.bool)
    mask[1, 40:48] = True  # padded tokens of image 1
    mask[1, 57:] = True
    outs, grads = [], []
    for module in (kernel, reference_module):
        q = query.clone().requires_grad_()
        out = module(q, ref_points, memory, shapes, starts, mask)
        out.square().sum().backward()
        outs.append(out)
        grads.append([q.grad] + [p.grad for p in module.parameters()])
    assert resolve_impl(kernel.impl, "cpu") == "cpu"
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for g_kernel, g_ref in zip(*grads):
        torch.testing.assert_close(g_kernel, g_ref, rtol=1e-4, atol=1e-5)


@needs_cpu_kernel
def test_module_under_autocast_samples_half_values_at_fp32_locations(monkeypatch):
    # --amp: the projections run in bf16 and the kernel reads the bf16 values as they are (no fp32 copy of the
    # value map); locations and weights stay fp32 (a bf16 offset would move a point by up to 1/256 of its size)
    import models.ops.modules.ms_deform_attn as module_file
    seen = []

    def spy(value, shapes, starts, loc, attn, impl="auto"):
        seen.append((value.dtype, loc.dtype, attn.dtype))
        return ms_deform_attn(value, shapes, starts, loc, attn, impl=impl)

    monkeypatch.setattr(module_file, "ms_deform_attn", spy)
    torch.manual_seed(0)
    shapes, starts = torch.tensor([[6, 8], [3, 4]]), torch.tensor([0, 48])
    module = MSDeformAttn(d_model=64, n_levels=2, n_heads=4, n_points=2, impl="auto")
    with torch.no_grad():  # offsets and weights that are not all zero
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    query, memory, ref_points = torch.randn(2, 10, 64), torch.randn(2, 60, 64), torch.rand(2, 10, 2, 2)
    expected = module(query, ref_points, memory, shapes, starts)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(query, ref_points, memory, shapes, starts)
    assert seen == [(torch.float32, torch.float32, torch.float32), (torch.bfloat16, torch.float32, torch.float32)]
    assert out.dtype == torch.bfloat16  # the output projection is a bf16 matmul too
    assert (out.float() - expected).abs().max() <= 3e-2 * expected.abs().max()
    out.float().square().sum().backward()
    assert all(p.grad.dtype == torch.float32 and p.grad.abs().sum() > 0 for p in module.parameters())


@needs_cpu_kernel
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=32, n_levels=2, n_heads=2, n_points=2, impl="auto")
    shapes, starts = torch.tensor([[4, 4], [2, 2]]), torch.tensor([0, 16])
    query, memory, ref_points = torch.randn(1, 6, 32), torch.randn(1, 20, 32), torch.rand(1, 6, 2, 2)
    compiled = torch.compile(module, fullgraph=True)  # fullgraph: a graph break raises
    results = []
    for fn in (module, compiled):
        module.zero_grad()
        q = query.clone().requires_grad_()
        out = fn(q, ref_points, memory, shapes, starts)
        out.square().sum().backward()
        results.append((out.detach(), q.grad, module.sampling_offsets.weight.grad.clone(),
                        module.value_proj.weight.grad.clone()))
    for eager, comp in zip(*results):
        torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------
# CUDA kernel
@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_float64_matches_reference(case):
    assert_matches_reference(make_inputs(*CASES[case], device="cuda"), "cuda", (1e-12,) * 4)


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("case", ["d32", "d64", "d30", "batch65"])
def test_cuda_float32_matches_reference(case):
    tol = FP32_GRAD_TOLERANCE
    assert_matches_reference(make_inputs(*CASES[case], dtype=torch.float32, device="cuda"), "cuda", (tol,) * 4)


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", ["d32", "d30"])
def test_cuda_half_precision(dtype, case):
    tol = HALF_TOLERANCE[dtype]
    inputs = make_inputs(*CASES[case], dtype=dtype, device="cuda")
    assert_matches_reference(inputs, "cuda", (tol, tol, FP32_GRAD_TOLERANCE, FP32_GRAD_TOLERANCE))


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_gradcheck():
    value, shapes, starts, loc, attn = make_inputs(1, 3, 2, 30, [(4, 3), (2, 2)], 2, device="cuda")
    inputs = tuple(t.requires_grad_() for t in (value, loc, attn))
    assert torch.autograd.gradcheck(lambda v, lc, a: ms_deform_attn(v, shapes, starts, lc, a, impl="cuda"), inputs)


@pytest.mark.cuda
@needs_cuda_kernel
def test_cuda_zero_queries_and_cpu_agreement():
    value, shapes, starts, loc, attn = make_inputs(2, 0, 2, 32, [(4, 4)], 2, dtype=torch.float32, device="cuda")
    assert ms_deform_attn(value, shapes, starts, loc, attn, impl="cuda").shape == (2, 0, 64)
    inputs = make_inputs(*CASES["d32"], dtype=torch.float32)
    if CPU_BUILT:
        out_cpu, _ = forward_backward("cpu", *inputs)
        out_cuda, _ = forward_backward("cuda", *(t.cuda() for t in inputs))
        torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=1e-5, atol=1e-6)


# Launch settings of the CUDA kernel (DETR_MSDA_CUDA_TUNING): one point slice (the encoder's layout), forced
# slices (a decoder's layout on a large GPU), narrower vectors, the 16-byte half-precision backward, scalar atomics.
CUDA_LAUNCH_SETTINGS = ["point_lanes=1", "point_lanes=2", "point_lanes=32", "point_lanes=4,fwd_vec_bytes=8",
                        "bwd_vec_bytes=16", "point_lanes=8,fwd_vec_bytes=4,bwd_vec_bytes=4", "vector_atomics=0"]


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("setting", CUDA_LAUNCH_SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", ["d32", "d30", "one_head_query_split"])
def test_cuda_launch_settings_match_reference(monkeypatch, setting, dtype, case):
    monkeypatch.setenv("DETR_MSDA_CUDA_TUNING", setting)
    inputs = make_inputs(*CASES[case], dtype=dtype, device="cuda")
    if dtype == torch.float64:
        tolerances = (1e-12,) * 4
    elif dtype == torch.float32:
        tolerances = (FP32_GRAD_TOLERANCE,) * 4
    else:
        tolerances = (HALF_TOLERANCE[dtype],) * 2 + (FP32_GRAD_TOLERANCE,) * 2
    assert_matches_reference(inputs, "cuda", tolerances)


@pytest.mark.cuda
@needs_cuda_kernel
@pytest.mark.parametrize("setting", ["point_lanes=3", "lanes=4", "point_lanes", "fwd_vec_bytes=32", "vector_atomics=2"])
def test_cuda_bad_launch_setting_is_named(monkeypatch, setting):
    monkeypatch.setenv("DETR_MSDA_CUDA_TUNING", setting)
    value, shapes, starts, loc, attn = make_inputs(*CASES["d32"], dtype=torch.float32, device="cuda")
    with pytest.raises(RuntimeError, match="DETR_MSDA_CUDA_TUNING"):
        ms_deform_attn(value, shapes, starts, loc, attn, impl="cuda")
