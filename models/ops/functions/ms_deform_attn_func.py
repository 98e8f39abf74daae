"""Multi-scale deformable attention core: the pure-PyTorch reference and the dispatch point.

Semantics (specs/deformable_family.md §1.5): for every query, head, level and point, bilinearly
sample the head's value map at the normalised location (align_corners=False, zero padding) and
sum the samples weighted by the attention weights.

Implementations (IMPLS, ``--msda_impl``): "pytorch", the grid_sample reference below; "cpu" and
"cuda", the kernels of the compiled extension ``detr_msda`` (models/ops/src, built by ``make ops``),
registered with torch.library as ``torch.ops.detr_msda.ms_deform_attn`` (C++ autograd, fake
functions here) so torch.compile traces them without a graph break; "auto" picks the compiled
kernel of the tensors' device when it is built, else the reference.
"""
from __future__ import annotations

import functools
import importlib
import logging
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

IMPLS = ("auto", "pytorch", "cpu", "cuda")
_EXTENSION = "detr_msda"  # module name of the compiled kernels and namespace of their torch.ops


def ms_deform_attn_core_pytorch(value: Tensor, spatial_shapes: Tensor | list[tuple[int, int]],
                                sampling_locations: Tensor, attention_weights: Tensor) -> Tensor:
    """Reference implementation on grid_sample (exact, memory-hungry; used for tests and as fallback).

    Args:
        value: [B, S, M, D] values of all levels, levels concatenated (S = sum H_l * W_l).
        spatial_shapes: [L, 2] (H_l, W_l) as an int tensor or a list of pairs.
        sampling_locations: [B, Lq, M, L, P, 2] normalised (x, y) in [0, 1] (outside = zero padding).
        attention_weights: [B, Lq, M, L, P], already normalised over (L, P).

    Returns:
        [B, Lq, M * D] in the dtype of ``value``.
    """
    shapes = spatial_shapes.tolist() if isinstance(spatial_shapes, Tensor) else spatial_shapes
    b, _, m, d = value.shape
    _, lq, _, n_levels, n_points, _ = sampling_locations.shape
    value_list = value.split([int(h) * int(w) for h, w in shapes], dim=1)
    grids = 2 * sampling_locations - 1  # grid_sample wants [-1, 1]
    samples = []
    for lvl, (h, w) in enumerate(shapes):
        # [B, H*W, M, D] -> [B*M, D, H, W]
        v = value_list[lvl].flatten(2).transpose(1, 2).reshape(b * m, d, int(h), int(w))
        # [B, Lq, M, P, 2] -> [B*M, Lq, P, 2]
        g = grids[:, :, :, lvl].transpose(1, 2).flatten(0, 1)
        samples.append(F.grid_sample(v, g.to(v.dtype), mode="bilinear", padding_mode="zeros",
                                     align_corners=False))  # [B*M, D, Lq, P]
    # [B, Lq, M, L, P] -> [B*M, 1, Lq, L*P]
    attn = attention_weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels * n_points)
    out = (torch.stack(samples, dim=-2).flatten(-2) * attn.to(value.dtype)).sum(-1)  # [B*M, D, Lq]
    return out.view(b, m * d, lq).transpose(1, 2).contiguous()


@functools.lru_cache(maxsize=None)
def _log_impl_once(name: str, device_type: str) -> None:
    logger.info("MSDeformAttn: using the %s implementation on %s", name, device_type)


def _fake_forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
                  attention_weights: Tensor) -> Tensor:
    b, _, m, d = value.shape
    return value.new_empty((b, sampling_locations.shape[1], m * d))


def _fake_backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(value), torch.empty_like(sampling_locations), torch.empty_like(attention_weights)


@functools.lru_cache(maxsize=None)
def _extension() -> ModuleType | None:
    """The compiled extension, imported on first use, or None when it is not built.

    Looks for the in-tree module (``make ops`` / ``setup.py build_ext --inplace``), then for an
    installed one (``setup.py build install``). Importing it registers the operators
    ``torch.ops.detr_msda.*`` with their CPU/CUDA kernels and autograd; their fake (shape)
    functions, which torch.compile needs, are registered here once.
    """
    package = __name__.rsplit(".", 2)[0] if __name__.count(".") >= 2 else None
    candidates = ([f"{package}.{_EXTENSION}"] if package else []) + [_EXTENSION]
    for candidate in candidates:
        try:
            ext = importlib.import_module(candidate)
        except ImportError as err:  # absent: try the next place; present but broken (another torch?): say so
            if isinstance(err, ModuleNotFoundError) and err.name == candidate:
                continue
            logger.warning("MSDeformAttn: the compiled kernels failed to import (%s); rebuild them with `make ops`",
                           err)
            return None
        torch.library.register_fake(f"{_EXTENSION}::ms_deform_attn")(_fake_forward)
        torch.library.register_fake(f"{_EXTENSION}::ms_deform_attn_backward")(_fake_backward)
        return ext
    return None


def available_impls(device_type: str) -> list[str]:
    """Implementations usable for tensors of this device type, best first."""
    ext = _extension()
    if ext is not None and device_type == "cpu":
        return ["cpu", "pytorch"]
    if ext is not None and device_type == "cuda" and ext.cuda_built():
        return ["cuda", "pytorch"]
    return ["pytorch"]


@torch.compiler.assume_constant_result
def resolve_impl(impl: str, device_type: str) -> str:
    """The implementation that ``impl`` selects for tensors on ``device_type``.

    "auto" picks the compiled kernel of that device when it is built, else the pure-PyTorch
    reference; a forced implementation that cannot run there raises. Logs the choice once.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown MSDeformAttn implementation {impl!r}; choose from {IMPLS}")
    available = available_impls(device_type)
    name = available[0] if impl == "auto" else impl
    if name not in available:
        if name not in ("pytorch", device_type):
            raise RuntimeError(f"MSDeformAttn implementation {name!r} cannot run on {device_type} tensors")
        needs = "nvcc and a CUDA-enabled torch" if name == "cuda" else "a C++ compiler"
        raise RuntimeError(f"MSDeformAttn implementation {name!r} is not built: run `make ops` or `cd models/ops && "
                           f"python setup.py build install` (needs {needs}), or use --msda_impl auto/pytorch")
    _log_impl_once(name, device_type)
    return name


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor, impl: str = "auto") -> Tensor:
    """Multi-scale deformable attention; picks the fastest implementation available for the device.

    Args:
        value: [B, S, M, D] (fp32, fp16 or bf16; fp64 is accepted for gradient checks).
        spatial_shapes: [L, 2] int64 (H_l, W_l).
        level_start_index: [L] int64, start of each level in S.
        sampling_locations: [B, Lq, M, L, P, 2] normalised (x, y); used in fp32 (fp64 with fp64 values).
        attention_weights: [B, Lq, M, L, P]; used in the dtype of the locations.
        impl: one of IMPLS: "auto", "pytorch" (grid_sample reference), "cpu" or "cuda" (compiled
            kernels; ``--msda_impl``).

    Returns:
        [B, Lq, M * D] in the dtype of ``value``. The compiled kernels accumulate in fp32 and return
        gradients in the dtype of each input.
    """
    name = resolve_impl(impl, value.device.type)
    coord_dtype = torch.float64 if value.dtype == torch.float64 else torch.float32
    if name == "pytorch":
        out = ms_deform_attn_core_pytorch(value.to(coord_dtype), spatial_shapes, sampling_locations.to(coord_dtype),
                                          attention_weights.to(coord_dtype))
        return out.to(value.dtype)
    if not isinstance(spatial_shapes, Tensor):
        spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long)
    spatial_shapes = spatial_shapes.to(device=value.device, dtype=torch.long)
    if not isinstance(level_start_index, Tensor):
        level_start_index = torch.as_tensor(level_start_index, dtype=torch.long)
    level_start_index = level_start_index.to(device=value.device, dtype=torch.long)
    return torch.ops.detr_msda.ms_deform_attn(value, spatial_shapes, level_start_index,
                                              sampling_locations.to(coord_dtype), attention_weights.to(coord_dtype))
