"""Single-scale transformer parts shared by DETR, Conditional-DETR, DAB-DETR, DN-DETR (and YOLOS's criterion).

Standard multi-head attention over one flattened feature map, sequence-first ([S, B, C]) as in the
official code (``nn.MultiheadAttention`` without ``batch_first``), so that parameter names and shapes are the
official ones (``self_attn.in_proj_weight``, ``linear1``, ``norm1``, ...). Specs: dn_dab_dino.md §0-§3.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu, "selu": F.selu}


def activation_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The activation of the official ``_get_activation_fn`` (``prelu`` is a fresh module, as there)."""
    if name == "prelu":
        return nn.PReLU()
    if name not in ACTIVATIONS:
        raise ValueError(f"activation should be one of {sorted([*ACTIVATIONS, 'prelu'])}, not {name!r}")
    return ACTIVATIONS[name]


def with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


def clones(module: nn.Module, n: int) -> nn.ModuleList:
    return nn.ModuleList([copy.deepcopy(module) for _ in range(n)])


class TransformerEncoderLayer(nn.Module):
    """Self-attention + FFN, post-norm (DETR's default) or pre-norm (``normalize_before``).

    Args:
        d_model, nhead, dim_feedforward, dropout, activation: as in DETR.
        normalize_before: pre-norm (DETR ``--pre_norm``).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)
        self.normalize_before = normalize_before

    def forward(self, src: Tensor, src_key_padding_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """src, pos: [S, B, C]; src_key_padding_mask: [B, S] (True = padding); returns [S, B, C]."""
        if self.normalize_before:
            x = self.norm1(src)
            q = k = with_pos(x, pos)
            src = src + self.dropout1(self.self_attn(q, k, value=x, key_padding_mask=src_key_padding_mask)[0])
            x = self.norm2(src)
            return src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))
        q = k = with_pos(src, pos)
        src = self.norm1(src + self.dropout1(self.self_attn(q, k, value=src, key_padding_mask=src_key_padding_mask)[0]))
        return self.norm2(src + self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(src))))))


class TransformerEncoder(nn.Module):
    """A stack of encoder layers with an optional final norm (DETR pre-norm) and an optional position scale.

    Args:
        encoder_layer: copied ``num_layers`` times (``layers.<i>``).
        num_layers: depth.
        norm: final LayerNorm (DETR with ``--pre_norm``) or None.
        query_scale: DAB-DETR's conditional position scale: a module mapping the layer input [S, B, C] to
            a scale of the positions (``pos * query_scale(output)``); None: positions as given.
    """

    def __init__(self, encoder_layer: nn.Module, num_layers: int, norm: nn.Module | None = None,
                 query_scale: nn.Module | None = None) -> None:
        super().__init__()
        self.layers = clones(encoder_layer, num_layers)
        self.num_layers = num_layers
        self.query_scale = query_scale
        self.norm = norm

    def forward(self, src: Tensor, src_key_padding_mask: Tensor | None = None, pos: Tensor | None = None) -> Tensor:
        """src, pos: [S, B, C]; returns the memory [S, B, C]."""
        output = src
        for layer in self.layers:
            layer_pos = pos if self.query_scale is None else pos * self.query_scale(output)
            output = layer(output, src_key_padding_mask=src_key_padding_mask, pos=layer_pos)
        if self.norm is not None:
            output = self.norm(output)
        return output
