"""Image positional encodings (Deformable-DETR variants of DETR's sine and learned encodings)."""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from util.misc import NestedTensor


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of the normalised (y, x) position of every unpadded pixel.

    Positions are cumulative counts of valid pixels, shifted by ``offset`` and normalised by the valid
    extent; output channels are y first, then x. Deformable-DETR (specs/deformable_family.md §1.4):
    temperature 10000 on both axes, offset -0.5; DAB-DETR/DN-DETR/DINO's "SineHW" (specs/dn_dab_dino.md
    §0.4): one temperature per axis (20), no offset.

    Args:
        num_pos_feats: features per axis (hidden_dim // 2).
        temperature: frequency base of both axes (unless ``temperature_h``/``temperature_w`` are given).
        normalize: normalise positions to [0, scale].
        scale: normalisation range (2*pi).
        offset: added to the cumulative counts before normalising (-0.5 in Deformable-DETR, 0 in SineHW).
        temperature_h, temperature_w: per-axis frequency bases (y, x).
    """

    def __init__(self, num_pos_feats: int = 64, temperature: float = 10000, normalize: bool = False,
                 scale: float | None = None, offset: float = -0.5, temperature_h: float | None = None,
                 temperature_w: float | None = None) -> None:
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError("normalize should be True if scale is passed")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.temperature_h = temperature if temperature_h is None else temperature_h
        self.temperature_w = temperature if temperature_w is None else temperature_w
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale
        self.offset = offset

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """Returns [B, 2 * num_pos_feats, H, W] for a NestedTensor with mask [B, H, W]."""
        not_mask = ~tensor_list.mask
        y_embed = not_mask.cumsum(1, dtype=torch.float32)
        x_embed = not_mask.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_embed = (y_embed + self.offset) / (y_embed[:, -1:, :] + eps) * self.scale
            x_embed = (x_embed + self.offset) / (x_embed[:, :, -1:] + eps) * self.scale
        dim_t = torch.arange(self.num_pos_feats, dtype=torch.float32, device=not_mask.device)
        exponent = 2 * torch.div(dim_t, 2, rounding_mode="floor") / self.num_pos_feats
        pos_x = x_embed[:, :, :, None] / self.temperature_w ** exponent
        pos_y = y_embed[:, :, :, None] / self.temperature_h ** exponent
        # Interleave: sin on even feature indices, cos on odd ones.
        pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
        pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
        return torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute encoding: 50 row and 50 column embeddings (maps up to 50 x 50)."""

    max_size = 50

    def __init__(self, num_pos_feats: int = 128) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(self.max_size, num_pos_feats)
        self.col_embed = nn.Embedding(self.max_size, num_pos_feats)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, tensor_list: NestedTensor) -> Tensor:
        """Returns [B, 2 * num_pos_feats, H, W] (x first, then y, as the official code)."""
        x = tensor_list.tensors
        h, w = x.shape[-2:]
        if h > self.max_size or w > self.max_size:
            raise ValueError(f"learned position embedding supports maps up to {self.max_size}x{self.max_size}, "
                             f"got {h}x{w}; use --position_embedding sine")
        x_emb = self.col_embed(torch.arange(w, device=x.device))
        y_emb = self.row_embed(torch.arange(h, device=x.device))
        pos = torch.cat([x_emb.unsqueeze(0).repeat(h, 1, 1), y_emb.unsqueeze(1).repeat(1, w, 1)], dim=-1)
        return pos.permute(2, 0, 1).unsqueeze(0).repeat(x.shape[0], 1, 1, 1)


def build_position_encoding(hidden_dim: int, kind: str, temperature_h: float | None = None,
                            temperature_w: float | None = None, offset: float = -0.5) -> nn.Module:
    """``kind``: 'sine' (v2) or 'learned' (v3), as the official ``--position_embedding`` flag.

    The sine encoding takes per-axis temperatures (default 10000) and the offset of the cumulative counts
    (Deformable-DETR: -0.5; DAB/DN/DINO's SineHW: 0).
    """
    n_steps = hidden_dim // 2
    if kind in ("v2", "sine"):
        return PositionEmbeddingSine(n_steps, normalize=True, offset=offset, temperature_h=temperature_h,
                                     temperature_w=temperature_w)
    if kind in ("v3", "learned"):
        return PositionEmbeddingLearned(n_steps)
    raise ValueError(f"unknown --position_embedding {kind!r}; choose sine or learned")
