"""Multi-scale deformable attention core: the pure-PyTorch reference and the dispatch point.

Semantics (specs/deformable_family.md §1.5): for every query, head, level and point, bilinearly
sample the head's value map at the normalised location (align_corners=False, zero padding) and
sum the samples weighted by the attention weights.
"""
from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

IMPLS = ("auto", "pytorch")


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


def available_impls(device_type: str) -> list[str]:
    """Implementations usable for tensors of this device type, best first."""
    del device_type
    return ["pytorch"]


def ms_deform_attn(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
                   sampling_locations: Tensor, attention_weights: Tensor, impl: str = "auto") -> Tensor:
    """Multi-scale deformable attention; picks the fastest implementation available for the device.

    Args:
        value: [B, S, M, D] (fp32, fp16 or bf16).
        spatial_shapes: [L, 2] int64 (H_l, W_l).
        level_start_index: [L] int64, start of each level in S.
        sampling_locations: [B, Lq, M, L, P, 2] normalised (x, y); kept in fp32.
        attention_weights: [B, Lq, M, L, P].
        impl: "auto" or the name of one implementation (``--msda_impl``).

    Returns:
        [B, Lq, M * D] in the dtype of ``value``.
    """
    del level_start_index  # the reference derives level offsets from the shapes
    if impl not in IMPLS:
        raise ValueError(f"unknown MSDeformAttn implementation {impl!r}; choose from {IMPLS}")
    name = available_impls(value.device.type)[0] if impl == "auto" else impl
    _log_impl_once(name, value.device.type)
    dtype = value.dtype
    out = ms_deform_attn_core_pytorch(value.float(), spatial_shapes, sampling_locations.float(),
                                      attention_weights.float())
    return out.to(dtype)
