"""MSDeformAttn: the multi-scale deformable attention module of Deformable-DETR.

Parameter names and initialisation follow the official module (specs/deformable_family.md §1.5),
so official checkpoints load unchanged.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functions.ms_deform_attn_func import ms_deform_attn


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention.

    Args:
        d_model: hidden dimension C.
        n_levels: number of feature levels L.
        n_heads: number of heads M (C must be divisible by M).
        n_points: sampling points P per head and level.
        impl: op implementation ("auto" picks the compiled kernel when built, else pure PyTorch).
    """

    def __init__(self, d_model: int = 256, n_levels: int = 4, n_heads: int = 8, n_points: int = 4,
                 impl: str = "auto") -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model must be divisible by n_heads, got {d_model} and {n_heads}")
        head_dim = d_model // n_heads
        if head_dim & (head_dim - 1) != 0:
            warnings.warn("MSDeformAttn: a head dimension that is a power of 2 is most efficient "
                          f"(got {head_dim})", stacklevel=2)
        self.d_model, self.n_levels, self.n_heads, self.n_points = d_model, n_levels, n_heads, n_points
        self.impl = impl
        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        # Head h starts on the ray at angle 2*pi*h/M, point p at distance p+1 (cells), every level alike.
        thetas = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([thetas.cos(), thetas.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True)[0]
        grid = grid.view(self.n_heads, 1, 1, 2).repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(self, query: Tensor, reference_points: Tensor, input_flatten: Tensor,
                input_spatial_shapes: Tensor, input_level_start_index: Tensor,
                input_padding_mask: Tensor | None = None) -> Tensor:
        """Attend from each query to P points per head and level around its reference.

        Args:
            query: [B, Lq, C].
            reference_points: [B, Lq, L, 2] normalised (x, y) per level, or [B, Lq, L, 4]
                normalised (cx, cy, w, h) per level (offsets then scale with the box).
            input_flatten: [B, S, C] the values of all levels, flattened and concatenated.
            input_spatial_shapes: [L, 2] int64 (H_l, W_l).
            input_level_start_index: [L] int64.
            input_padding_mask: [B, S] bool, True on padded tokens (their values are zeroed).

        Returns:
            [B, Lq, C].
        """
        b, lq, _ = query.shape
        s = input_flatten.shape[1]
        m, n_l, n_p = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = value.view(b, s, m, self.d_model // m)
        offsets = self.sampling_offsets(query).view(b, lq, m, n_l, n_p, 2).float()
        attn = self.attention_weights(query).view(b, lq, m, n_l * n_p)
        attn = F.softmax(attn.float(), -1).view(b, lq, m, n_l, n_p)
        ref = reference_points.float()
        if ref.shape[-1] == 2:
            # Offsets are in cells of the sampled level: divide x by W_l and y by H_l.
            normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1).to(ref)
            loc = ref[:, :, None, :, None, :] + offsets / normalizer[None, None, None, :, None, :]
        elif ref.shape[-1] == 4:
            loc = ref[:, :, None, :, None, :2] + offsets / n_p * ref[:, :, None, :, None, 2:] * 0.5
        else:
            raise ValueError(f"reference_points must end in 2 or 4, got {tuple(reference_points.shape)}")
        out = ms_deform_attn(value, input_spatial_shapes, input_level_start_index, loc, attn, impl=self.impl)
        return self.output_proj(out.to(query.dtype))
