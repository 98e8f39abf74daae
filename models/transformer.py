"""Single-scale transformer parts shared by DETR, Conditional-DETR, DAB-DETR, DN-DETR (and YOLOS's criterion).

Standard multi-head attention over one flattened feature map, sequence-first ([S, B, C]) as in the
official code (``nn.MultiheadAttention`` without ``batch_first``), so that parameter names and shapes are the
official ones (``self_attn.in_proj_weight``, ``linear1``, ``norm1``, ...). Specs: dn_dab_dino.md §0-§3.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
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


class TransformerDecoderLayer(nn.Module):
    """DETR's decoder layer: self-attention, cross-attention to the memory, FFN; post-norm or pre-norm.

    The positional query is added to the queries and keys of self-attention and to the queries of
    cross-attention; the image positions to the cross-attention keys. Sequence-first [T, B, C].

    Args:
        d_model, nhead, dim_feedforward, dropout, activation: as in DETR.
        normalize_before: pre-norm (DETR ``--pre_norm``).
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = activation_fn(activation)
        self.normalize_before = normalize_before

    def _ffn(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, pos: Tensor | None = None,
                query_pos: Tensor | None = None) -> Tensor:
        """tgt, query_pos: [T, B, C]; memory, pos: [S, B, C]; tgt_mask: [T, T] bool (True = blocked);
        memory_key_padding_mask: [B, S] (True = padding). Returns [T, B, C]."""
        key = with_pos(memory, pos)
        if self.normalize_before:
            x = self.norm1(tgt)
            q = k = with_pos(x, query_pos)
            tgt = tgt + self.dropout1(self.self_attn(q, k, value=x, attn_mask=tgt_mask)[0])
            x = self.norm2(tgt)
            tgt = tgt + self.dropout2(self.multihead_attn(with_pos(x, query_pos), key, value=memory,
                                                          key_padding_mask=memory_key_padding_mask)[0])
            return tgt + self._ffn(self.norm3(tgt))
        q = k = with_pos(tgt, query_pos)
        tgt = self.norm1(tgt + self.dropout1(self.self_attn(q, k, value=tgt, attn_mask=tgt_mask)[0]))
        tgt = self.norm2(tgt + self.dropout2(self.multihead_attn(with_pos(tgt, query_pos), key, value=memory,
                                                                 key_padding_mask=memory_key_padding_mask)[0]))
        return self.norm3(tgt + self._ffn(tgt))


class TransformerDecoder(nn.Module):
    """A stack of DETR decoder layers; every layer's output goes through the shared final ``norm``.

    Args:
        decoder_layer: copied ``num_layers`` times (``layers.<i>``).
        num_layers: depth.
        norm: the decoder's LayerNorm (applied to every layer's output: DETR's intermediate outputs).
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int, norm: nn.Module) -> None:
        super().__init__()
        self.layers = clones(decoder_layer, num_layers)
        self.num_layers = num_layers
        self.norm = norm

    def forward(self, tgt: Tensor, memory: Tensor, tgt_mask: Tensor | None = None,
                memory_key_padding_mask: Tensor | None = None, pos: Tensor | None = None,
                query_pos: Tensor | None = None) -> Tensor:
        """Shapes as in TransformerDecoderLayer; returns every layer's normalised output [L, T, B, C]."""
        output, intermediate = tgt, []
        for layer in self.layers:
            output = layer(output, memory, tgt_mask=tgt_mask, memory_key_padding_mask=memory_key_padding_mask,
                           pos=pos, query_pos=query_pos)
            intermediate.append(self.norm(output))
        return torch.stack(intermediate)


class DetrTransformer(nn.Module):
    """DETR's encoder-decoder (facebookresearch/detr ``Transformer`` with intermediate decoder outputs).

    Parameters are created in the official order and every matrix gets Xavier-uniform, so a seed gives the
    official initial weights. Names: ``encoder.layers.<i>.*``, ``encoder.norm`` (pre-norm only),
    ``decoder.layers.<i>.*``, ``decoder.norm``.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation: as in DETR.
        normalize_before: pre-norm layers and a final encoder LayerNorm (``--pre_norm``).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.1, activation: str = "relu",
                 normalize_before: bool = False) -> None:
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        encoder_norm = nn.LayerNorm(d_model) if normalize_before else None
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers, encoder_norm)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation, normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model))
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        self.d_model, self.nhead = d_model, nhead

    def encode(self, src: Tensor, mask: Tensor, pos: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """src, pos: [B, C, H, W]; mask: [B, H, W] (True = padding).

        Returns:
            memory [S, B, C], the flat padding mask [B, S] and the flat positions [S, B, C] (S = H * W).
        """
        mask_flat = mask.flatten(1)
        pos_flat = pos.flatten(2).permute(2, 0, 1)
        memory = self.encoder(src.flatten(2).permute(2, 0, 1), src_key_padding_mask=mask_flat, pos=pos_flat)
        return memory, mask_flat, pos_flat

    def decode(self, tgt: Tensor, query_pos: Tensor, memory: Tensor, mask_flat: Tensor, pos_flat: Tensor,
               tgt_mask: Tensor | None = None) -> Tensor:
        """tgt, query_pos: [T, B, C]; the rest from ``encode``; tgt_mask [T, T] bool. Returns hs [L, B, T, C]."""
        hs = self.decoder(tgt, memory, tgt_mask=tgt_mask, memory_key_padding_mask=mask_flat, pos=pos_flat,
                          query_pos=query_pos)
        return hs.transpose(1, 2)

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor) -> tuple[Tensor, Tensor]:
        """The official call: query_embed [Q, C] (content starts at zero). Returns (hs [L, B, Q, C], memory
        [B, C, H, W])."""
        b, c, h, w = src.shape
        memory, mask_flat, pos_flat = self.encode(src, mask, pos_embed)
        query_pos = query_embed.unsqueeze(1).repeat(1, b, 1)
        hs = self.decode(torch.zeros_like(query_pos), query_pos, memory, mask_flat, pos_flat)
        return hs, memory.permute(1, 2, 0).view(b, c, h, w)
