"""Deformable transformer: multi-scale deformable encoder, decoder with box refinement, two-stage.

Follows specs/deformable_family.md §1.4-1.9 and the H-DETR "++" options (§3.2). Parameter names are
the official ones. Extra query groups from add-ons run with the main queries under one block mask
(models/query_groups.py).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from util.misc import host_tensor_to, inverse_sigmoid

from .layers import refine_boxes
from .ops import MSDeformAttn
from .query_groups import EncoderOutput, QueryGroup, QueryProvider, build_group_attn_mask, collect_groups

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}


def top_proposals(enc_logits: Tensor, enc_coord_unact: Tensor, valid: Tensor | None, k: int) -> Tensor:
    """The k best encoder proposals by their first class logit, best first (two-stage query selection).

    Args:
        enc_logits: [B, S, K]; enc_coord_unact: [B, S, 4] before sigmoid.
        valid: [B, S] bool: only valid (unpadded, inside the border) tokens may outrank valid ones
            (``--mask_invalid_proposals``); None ranks every token as the official code does
            (padded and border tokens have the box (1, 1, 1, 1) and can be selected).

    Returns:
        [B, min(k, S), 4] detached proposal boxes before sigmoid (the official code fails for k > S).
    """
    scores = enc_logits[..., 0]
    if valid is not None:
        scores = scores.masked_fill(~valid, float("-inf"))
    topk_idx = torch.topk(scores, min(k, scores.shape[1]), dim=1)[1]
    return torch.gather(enc_coord_unact, 1, topk_idx.unsqueeze(-1).repeat(1, 1, 4)).detach()


def _with_pos(x: Tensor, pos: Tensor | None) -> Tensor:
    return x if pos is None else x + pos


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then FFN."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4, msda_impl: str = "auto") -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=msda_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = ACTIVATIONS[activation]
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(self, src: Tensor, pos: Tensor, reference_points: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """src, pos: [B, S, C]; reference_points: [B, S, L, 2]; returns [B, S, C]."""
        src2 = self.self_attn(_with_pos(src, pos), reference_points, src, spatial_shapes, level_start_index,
                              padding_mask)
        src = self.norm1(src + self.dropout1(src2))
        src2 = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(src2))


class DeformableTransformerEncoder(nn.Module):
    """A stack of encoder layers sharing one set of reference points (cell centres)."""

    def __init__(self, encoder_layer: DeformableTransformerEncoderLayer, num_layers: int,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.use_checkpoint = use_checkpoint

    @staticmethod
    def get_reference_points(shapes: Sequence[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Cell centres of every level, relative to the valid image, sampled at every level.

        Args:
            shapes: (H_l, W_l) per level as Python ints (no device sync).
            valid_ratios: [B, L, 2] (w, h).

        Returns:
            [B, S, L, 2] normalised (x, y).
        """
        device = valid_ratios.device
        points = []
        for lvl, (h, w) in enumerate(shapes):
            ref_y, ref_x = torch.meshgrid(torch.linspace(0.5, h - 0.5, h, dtype=torch.float32, device=device),
                                          torch.linspace(0.5, w - 0.5, w, dtype=torch.float32, device=device),
                                          indexing="ij")
            ref_y = ref_y.reshape(-1)[None] / (valid_ratios[:, None, lvl, 1] * h)
            ref_x = ref_x.reshape(-1)[None] / (valid_ratios[:, None, lvl, 0] * w)
            points.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(points, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(self, src: Tensor, shapes: Sequence[tuple[int, int]], spatial_shapes: Tensor,
                level_start_index: Tensor, valid_ratios: Tensor, pos: Tensor,
                padding_mask: Tensor | None = None) -> Tensor:
        """src, pos: [B, S, C]; returns the memory [B, S, C]."""
        output = src
        reference_points = self.get_reference_points(shapes, valid_ratios)
        for layer in self.layers:
            if self.use_checkpoint and self.training:
                output = checkpoint(layer, output, pos, reference_points, spatial_shapes, level_start_index,
                                    padding_mask, use_reentrant=False)
            else:
                output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm decoder layer: self-attention, deformable cross-attention, FFN."""

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4, msda_impl: str = "auto") -> None:
        super().__init__()
        self.cross_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points, impl=msda_impl)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, n_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = ACTIVATIONS[activation]
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    @property
    def official_dropout_path(self) -> bool:
        """Self-attention as the official call (attention weights returned) while its dropout is active: on
        CUDA the fused kernel draws its dropout mask differently; without dropout the fused path is used."""
        return self.training and self.self_attn.dropout > 0

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, src: Tensor,
                src_spatial_shapes: Tensor, level_start_index: Tensor, src_padding_mask: Tensor | None = None,
                self_attn_mask: Tensor | None = None) -> Tensor:
        """tgt, query_pos: [B, T, C]; reference_points: [B, T, L, 2|4]; self_attn_mask: [T, T] bool."""
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=self.official_dropout_path)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.cross_attn(_with_pos(tgt, query_pos), reference_points, src, src_spatial_shapes,
                               level_start_index, src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2))


@dataclass
class DecoderOutput:
    """Per-layer decoder results.

    Attributes:
        hs: [L, B, T, C] output of every decoder layer.
        box_logits: [L, B, T, 4] unactivated predicted boxes of every layer when box refinement is on
            (computed once here and reused by the detection head), else None.
        references: [L, B, T, 2|4] the (detached) reference handed to the next layer.
        o2m_hs: [L, B, T, C] second output of layers that return one (MS-DETR's one-to-many features,
            never fed forward), else None.
        o2m_box_logits: [L, B, T, 4] like ``box_logits`` for ``o2m_hs`` (same references), else None.
    """

    hs: Tensor
    box_logits: Tensor | None
    references: Tensor
    o2m_hs: Tensor | None = None
    o2m_box_logits: Tensor | None = None


def _stack(xs: list[Tensor]) -> Tensor | None:
    return torch.stack(xs) if xs else None


class DeformableTransformerDecoder(nn.Module):
    """Decoder stack; with ``bbox_embed`` attached it refines the reference boxes layer by layer.

    ``bbox_embed`` and ``class_embed`` are set by the detector (official aliasing, so that state-dict
    keys match the official checkpoints). A layer returns its output [B, T, C], or a pair (output,
    one-to-many features) (models/addons/ms_detr.py); the second element is only predicted from.
    """

    def __init__(self, decoder_layer: nn.Module, num_layers: int, look_forward_twice: bool = False,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice
        self.use_checkpoint = use_checkpoint
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference_points: Tensor, src: Tensor, src_spatial_shapes: Tensor,
                src_level_start_index: Tensor, src_valid_ratios: Tensor, query_pos: Tensor,
                src_padding_mask: Tensor | None = None, self_attn_mask: Tensor | None = None) -> DecoderOutput:
        """tgt, query_pos: [B, T, C]; reference_points: [B, T, 2|4] sigmoid space."""
        output = tgt
        hs, box_logits, references, o2m_hs, o2m_box_logits = [], [], [], [], []
        pred_reference = reference_points  # the reference the predictions of this layer are relative to
        for lid, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                ref_input = reference_points[:, :, None] * torch.cat([src_valid_ratios, src_valid_ratios], -1)[:, None]
            else:
                ref_input = reference_points[:, :, None] * src_valid_ratios[:, None]
            args = (output, query_pos, ref_input, src, src_spatial_shapes, src_level_start_index, src_padding_mask,
                    self_attn_mask)
            if self.use_checkpoint and self.training:
                output = checkpoint(layer, *args, use_reentrant=False)
            else:
                output = layer(*args)
            output, o2m = output if isinstance(output, tuple) else (output, None)
            hs.append(output)
            if o2m is not None:
                o2m_hs.append(o2m)
            if self.bbox_embed is not None:
                delta = self.bbox_embed[lid](output)
                new_reference = refine_boxes(delta, reference_points)
                if not self.look_forward_twice:
                    pred_reference = reference_points
                box_logits.append(refine_boxes(delta, pred_reference, activate=False))
                if o2m is not None:
                    o2m_box_logits.append(refine_boxes(self.bbox_embed[lid](o2m), pred_reference, activate=False))
                pred_reference = new_reference  # look forward twice: not detached, gradient looks one layer back
                reference_points = new_reference.detach()
            references.append(reference_points)
        return DecoderOutput(torch.stack(hs), _stack(box_logits), torch.stack(references), _stack(o2m_hs),
                             _stack(o2m_box_logits))


@dataclass
class TransformerOutput:
    """What the detector needs from the transformer.

    Attributes:
        decoder: per-layer decoder results for main queries and groups together (T = Q + groups).
        init_reference: [B, T, 2|4] initial references (sigmoid space).
        groups: the query groups appended after the Q main queries, in order.
        num_queries: Q.
        enc_logits: [B, S, K] encoder proposal logits (two-stage), else None.
        enc_coord_unact: [B, S, 4] encoder proposal boxes before sigmoid (two-stage), else None.
        enc_anchors: [B, S, 4] the fixed anchor of every token before sigmoid (+inf where invalid; two-stage).
        encoder: the encoder's output (memory, padding mask, shapes, proposals) as the add-ons see it.
    """

    decoder: DecoderOutput
    init_reference: Tensor
    groups: list[QueryGroup]
    num_queries: int
    enc_logits: Tensor | None = None
    enc_coord_unact: Tensor | None = None
    enc_anchors: Tensor | None = None
    encoder: EncoderOutput | None = None


@dataclass
class FlatInputs:
    """The multi-scale input as one token sequence.

    Attributes:
        src, pos: [B, S, C] features and positions (+ level embedding); mask: [B, S] bool padding.
        shapes: (H_l, W_l) per level as Python ints; spatial_shapes: the same as [L, 2] int64;
        level_start_index: [L] first token of every level; valid_ratios: [B, L, 2] (w, h) valid fraction.
    """

    src: Tensor
    mask: Tensor
    pos: Tensor
    shapes: list[tuple[int, int]]
    spatial_shapes: Tensor
    level_start_index: Tensor
    valid_ratios: Tensor


class MultiScaleTransformer(nn.Module):
    """What the deformable transformers share: the flattened multi-scale input and the encoder proposals.

    Subclasses own ``level_embed`` [L, C] and, for two-stage, ``enc_output`` / ``enc_output_norm``.
    """

    level_embed: nn.Parameter

    def flatten(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor]) -> FlatInputs:
        """Per-level maps [B, C, H, W] (and masks [B, H, W], positions) -> one token sequence per image."""
        src_flatten, mask_flatten, pos_flatten, shapes = [], [], [], []
        for lvl, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            _, _, h, w = src.shape
            shapes.append((h, w))
            src_flatten.append(src.flatten(2).transpose(1, 2))
            mask_flatten.append(mask.flatten(1))
            pos_flatten.append(pos.flatten(2).transpose(1, 2) + self.level_embed[lvl].view(1, 1, -1))
        src_flatten = torch.cat(src_flatten, 1)
        spatial_shapes = host_tensor_to(shapes, torch.long, src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)
        return FlatInputs(src_flatten, torch.cat(mask_flatten, 1), torch.cat(pos_flatten, 1), shapes, spatial_shapes,
                          level_start_index, valid_ratios)

    def gen_encoder_output_proposals(self, memory: Tensor, memory_padding_mask: Tensor,
                                     shapes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, Tensor]:
        """Anchor per token (cell centre, size 0.05 * 2^l) and the projected memory.

        Returns:
            output_memory [B, S, C], output_proposals [B, S, 4] in logit space (+inf where invalid),
            valid [B, S] bool.
        """
        n = memory.shape[0]
        proposals, cur = [], 0
        for lvl, (h, w) in enumerate(shapes):
            mask = memory_padding_mask[:, cur:cur + h * w].view(n, h, w)
            valid_h = torch.sum(~mask[:, :, 0], 1)
            valid_w = torch.sum(~mask[:, 0, :], 1)
            grid_y, grid_x = torch.meshgrid(
                torch.linspace(0, h - 1, h, dtype=torch.float32, device=memory.device),
                torch.linspace(0, w - 1, w, dtype=torch.float32, device=memory.device), indexing="ij")
            grid = torch.cat([grid_x.unsqueeze(-1), grid_y.unsqueeze(-1)], -1)
            scale = torch.cat([valid_w.unsqueeze(-1), valid_h.unsqueeze(-1)], 1).view(n, 1, 1, 2)
            grid = (grid.unsqueeze(0).expand(n, -1, -1, -1) + 0.5) / scale
            wh = torch.ones_like(grid) * 0.05 * (2.0 ** lvl)
            proposals.append(torch.cat((grid, wh), -1).view(n, -1, 4))
            cur += h * w
        output_proposals = torch.cat(proposals, 1)
        valid = ((output_proposals > 0.01) & (output_proposals < 0.99)).all(-1) & ~memory_padding_mask
        output_proposals = torch.log(output_proposals / (1 - output_proposals))
        output_proposals = output_proposals.masked_fill(~valid.unsqueeze(-1), float("inf"))
        output_memory = memory.masked_fill(~valid.unsqueeze(-1), 0.0)
        output_memory = self.enc_output_norm(self.enc_output(output_memory))
        return output_memory, output_proposals, valid

    @staticmethod
    def get_valid_ratio(mask: Tensor) -> Tensor:
        """[B, H, W] padding mask -> [B, 2] valid fraction (w, h)."""
        _, h, w = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / w, valid_h.float() / h], -1)


class DeformableTransformer(MultiScaleTransformer):
    """Encoder + decoder of Deformable-DETR (one-stage, or two-stage with encoder proposals).

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation:
            the usual transformer sizes.
        num_feature_levels: L.
        dec_n_points, enc_n_points: sampling points per head and level.
        two_stage: queries from the encoder's top-scoring proposals.
        two_stage_num_proposals: top-k of the proposals (= number of queries).
        mixed_selection: two-stage with learned content queries (H-DETR/DINO "mqs").
        look_forward_twice: box predictions keep the gradient of the previous layer's refinement.
        mask_invalid_proposals: two-stage: padded and border tokens are never selected (the official
            top-k ranks every token).
        use_checkpoint: activation checkpointing of every layer (saves memory, costs time).
        msda_impl: deformable-attention implementation ("auto", "pytorch", ...).
        decoder_layer: decoder-layer class (or factory) taking the standard layer's arguments; add-ons
            that need another layer (MS-DETR) supply it through the builder. Default: the standard layer.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4, two_stage: bool = False,
                 two_stage_num_proposals: int = 300, mixed_selection: bool = False,
                 look_forward_twice: bool = False, use_checkpoint: bool = False, msda_impl: str = "auto",
                 decoder_layer: Callable[..., nn.Module] | None = None, mask_invalid_proposals: bool = False) -> None:
        super().__init__()
        self.d_model, self.nhead = d_model, nhead
        self.two_stage = two_stage
        self.mask_invalid_proposals = mask_invalid_proposals
        self.two_stage_num_proposals = two_stage_num_proposals
        self.mixed_selection = mixed_selection
        enc_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                      num_feature_levels, nhead, enc_n_points, msda_impl)
        self.encoder = DeformableTransformerEncoder(enc_layer, num_encoder_layers, use_checkpoint)
        dec_layer = (decoder_layer or DeformableTransformerDecoderLayer)(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, dec_n_points, msda_impl)
        self.decoder = DeformableTransformerDecoder(dec_layer, num_decoder_layers, look_forward_twice,
                                                    use_checkpoint)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        if not self.two_stage:
            nn.init.xavier_uniform_(self.reference_points.weight, gain=1.0)
            nn.init.constant_(self.reference_points.bias, 0.0)
        nn.init.normal_(self.level_embed)

    def get_proposal_pos_embed(self, proposals: Tensor) -> Tensor:
        """[B, N, 4] unactivated boxes -> [B, N, 4 * d_model / 2] sine embedding (cx, cy, w, h)."""
        num_pos_feats, temperature, scale = self.d_model // 2, 10000, 2 * math.pi
        dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=proposals.device)
        dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
        proposals = proposals.sigmoid() * scale
        pos = proposals[:, :, :, None] / dim_t
        return torch.stack((pos[:, :, :, 0::2].sin(), pos[:, :, :, 1::2].cos()), dim=4).flatten(2)

    def proposal_queries(self, coords_unact: Tensor, content: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """Two-stage queries from selected proposals.

        Args:
            coords_unact: [B, N, 4] detached proposal boxes before sigmoid.
            content: mixed selection: [>=N, C] learned content queries (rows 0..N-1 are used); None: the
                content query is the second half of the proposal embedding.

        Returns:
            tgt [B, N, C], query_pos [B, N, C], reference [B, N, 4] (sigmoid space).
        """
        bs, n, c = coords_unact.shape[0], coords_unact.shape[1], self.d_model
        pos_trans_out = self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(coords_unact)))
        if content is not None:
            query_pos, tgt = pos_trans_out[..., :c], content[:n].unsqueeze(0).expand(bs, -1, -1)
        else:
            query_pos, tgt = torch.split(pos_trans_out, c, dim=2)
        return tgt, query_pos, coords_unact.sigmoid()

    def learned_queries(self, query_embed: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor]:
        """One-stage queries from the learned table [N, 2C] (positional | content).

        Returns:
            tgt [B, N, C], query_pos [B, N, C], reference [B, N, 2] (sigmoid space).
        """
        query_pos, tgt = torch.split(query_embed, self.d_model, dim=1)
        query_pos = query_pos.unsqueeze(0).expand(batch_size, -1, -1)
        tgt = tgt.unsqueeze(0).expand(batch_size, -1, -1)
        return tgt, query_pos, self.reference_points(query_pos).sigmoid()

    def query_pos_from_reference(self, reference: Tensor) -> Tensor:
        """Positional queries of two-stage hosts: pos_trans of the sine embedding of the boxes."""
        if not self.two_stage:
            raise ValueError("this one-stage model cannot derive positional queries from boxes; "
                             "the query group must provide query_pos")
        return self.pos_trans_norm(self.pos_trans(self.get_proposal_pos_embed(inverse_sigmoid(reference))))[
            ..., : self.d_model]

    def _append_groups(self, tgt: Tensor, query_pos: Tensor, reference: Tensor,
                       groups: Sequence[QueryGroup]) -> tuple[Tensor, Tensor, Tensor]:
        """Main queries followed by every group's queries along the query axis."""
        for g in groups:
            if g.reference.shape[-1] != reference.shape[-1]:
                raise ValueError(f"query group {g.name!r}: references must be {reference.shape[-1]}-d "
                                 f"like the main queries")
        tgt = torch.cat([tgt] + [g.tgt for g in groups], 1)
        query_pos = torch.cat([query_pos] + [g.query_pos if g.query_pos is not None
                                             else self.query_pos_from_reference(g.reference) for g in groups], 1)
        return tgt, query_pos, torch.cat([reference] + [g.reference for g in groups], 1)

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor],
                query_embed: Tensor | None = None, enc_heads: tuple[nn.Module, nn.Module] | None = None,
                providers: Sequence[QueryProvider] = ()) -> TransformerOutput:
        """Encode the feature pyramid and decode the queries (and the providers' groups).

        Args:
            srcs, masks, pos_embeds: per level [B, C, H, W], [B, H, W] bool, [B, C, H, W].
            query_embed: one-stage: [Q, 2C] (positional | content); mixed selection: [Q, C] content.
            enc_heads: (class head, box head) scoring the encoder proposals (two-stage).
            providers: callables returning extra QueryGroups (or None) from the encoder output.
        """
        flat = self.flatten(srcs, masks, pos_embeds)
        shapes, spatial_shapes, level_start_index = flat.shapes, flat.spatial_shapes, flat.level_start_index
        mask_flatten, valid_ratios = flat.mask, flat.valid_ratios
        memory = self.encoder(flat.src, shapes, spatial_shapes, level_start_index, valid_ratios, flat.pos,
                              mask_flatten)
        bs = memory.shape[0]
        enc_logits = enc_coord_unact = output_proposals = None
        if self.two_stage:
            if enc_heads is None:
                raise ValueError("two-stage needs the encoder proposal heads")
            output_memory, output_proposals, valid = self.gen_encoder_output_proposals(memory, mask_flatten, shapes)
            enc_logits = enc_heads[0](output_memory)
            enc_coord_unact = enc_heads[1](output_memory) + output_proposals
            topk_coords_unact = top_proposals(enc_logits, enc_coord_unact, valid if self.mask_invalid_proposals
                                              else None, self.two_stage_num_proposals)
            tgt, query_pos, reference_points = self.proposal_queries(
                topk_coords_unact, query_embed if self.mixed_selection else None)
        else:
            tgt, query_pos, reference_points = self.learned_queries(query_embed, bs)
        num_queries = tgt.shape[1]

        enc = EncoderOutput(memory, mask_flatten, spatial_shapes, valid_ratios, num_queries, enc_logits,
                            enc_coord_unact, shapes)
        groups = collect_groups(providers, enc) if providers else []
        attn_mask = build_group_attn_mask(num_queries, groups, memory.device)
        if groups:
            tgt, query_pos, reference_points = self._append_groups(tgt, query_pos, reference_points, groups)

        dec = self.decoder(tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios,
                           query_pos, mask_flatten, attn_mask)
        return TransformerOutput(dec, reference_points, groups, num_queries, enc_logits, enc_coord_unact,
                                 output_proposals, enc)
