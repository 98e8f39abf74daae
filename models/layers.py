"""Layers and box helpers shared by the detectors and transformers (one place, no copies).

MLP (the box head), the refinement of boxes relative to a reference, and the sine embedding of anchor
boxes (specs/dn_dab_dino.md §0.3).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.misc import inverse_sigmoid


class MLP(nn.Module):
    """Simple multi-layer perceptron (the box head): Linear-ReLU ... Linear."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = F.relu(layer(x)) if i < len(self.layers) - 1 else layer(x)
        return x


def refine_boxes(delta: Tensor, reference: Tensor, activate: bool = True, eps: float = 1e-5) -> Tensor:
    """delta + inverse_sigmoid(reference), optionally through the sigmoid.

    For 2-d references (one-stage, first layer) only (cx, cy) are offset; (w, h) come from delta.
    ``eps`` is the clamp of the inverse sigmoid: 1e-5 in Deformable-DETR, 1e-3 in DAB/DN-DETR/DINO.
    """
    if reference.shape[-1] == 4:
        out = delta + inverse_sigmoid(reference, eps)
    else:
        out = torch.cat([delta[..., :2] + inverse_sigmoid(reference, eps), delta[..., 2:]], -1)
    return out.sigmoid() if activate else out


def sine_embed_boxes(boxes: Tensor, d_model: int, temperature: float = 10000.0) -> Tensor:
    """[..., 4] (cx, cy, w, h) in [0, 1] -> [..., 2 * d_model] sine embedding ordered (y, x, w, h) (spec §0.3)."""
    num_feats = d_model // 2
    dim_t = torch.arange(num_feats, dtype=torch.float32, device=boxes.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_feats)

    def embed(u: Tensor) -> Tensor:
        pos = u[..., None] * (2 * math.pi) / dim_t
        return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), -1).flatten(-2)

    cx, cy, w, h = boxes.unbind(-1)
    return torch.cat([embed(cy), embed(cx), embed(w), embed(h)], -1)


def pad_content(content: Tensor, reserved: int) -> Tensor:
    """[N, C - reserved] learned content -> [N, C] ending in ``reserved`` zero channels (identity for 0).

    DN-DETR's indicator bit: the matching queries' last channel is 0, the denoising queries' 1.
    """
    return F.pad(content, (0, reserved)) if reserved else content
