"""Deformable transformer with 4-d anchor queries (DAB-Deformable-DETR, DINO).

specs/dn_dab_dino.md §1.5 (DAB-Deformable-DETR) and §4.2-4.6 (DINO). Every decoder query is a pair
(content, anchor box); each layer derives its positional query from the sine embedding of the
anchor, samples around the anchor with deformable cross-attention and refines it. The encoder and the
decoder layers are Deformable-DETR's (models/deformable_transformer.py), reused unchanged. Extra query
groups of add-ons (denoising) run with the main queries under the one block mask of
models/query_groups.py and are refined exactly like them.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .deformable_transformer import (
    DeformableTransformerDecoderLayer,
    DeformableTransformerEncoder,
    DeformableTransformerEncoderLayer,
    MultiScaleTransformer,
)
from .layers import MLP, pad_content, refine_boxes, sine_embed_boxes
from .ops import MSDeformAttn
from .query_groups import EncoderOutput, QueryGroup, QueryProvider, build_group_attn_mask, collect_groups

ANCHOR_EPS = 1e-3  # clamp of the inverse sigmoid in DAB-DETR, DN-DETR and DINO (Deformable-DETR: 1e-5)


@dataclass
class AnchorDecoderOutput:
    """hs: [L, B, T, C] layer outputs (through the decoder norm if any); pred_references: [L, B, T, 4] the
    sigmoid-space anchors each layer's box prediction is relative to (undetached with look-forward-twice);
    o2m_hs: [L, B, T, C] second output of layers that return one (MS-DETR's one-to-many features,
    through the same norm; predicted from, never fed forward), else None."""

    hs: Tensor
    pred_references: Tensor
    o2m_hs: Tensor | None = None


class AnchorDeformableDecoder(nn.Module):
    """Decoder over 4-d anchors; ``bbox_embed`` (one head per layer, possibly shared) is set by the detector.

    Args:
        decoder_layer: a DeformableTransformerDecoderLayer (self-attn, deformable cross-attn, FFN).
        num_layers: L.
        d_model: C.
        conditional_scale: DAB: query_pos of layers >= 1 is scaled elementwise by MLP(content).
        final_norm: DINO: a shared LayerNorm on every layer's output before the heads (the anchor chain
            still uses the un-normalised output, spec P11).
        look_forward_twice: DINO: a layer's box prediction keeps the gradient of the previous layer's
            refinement; DAB refines detached ("look forward once").
    """

    def __init__(self, decoder_layer: DeformableTransformerDecoderLayer, num_layers: int, d_model: int,
                 conditional_scale: bool = False, final_norm: bool = False, look_forward_twice: bool = False,
                 use_checkpoint: bool = False) -> None:
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(decoder_layer) for _ in range(num_layers)])
        self.num_layers, self.d_model = num_layers, d_model
        self.ref_point_head = MLP(2 * d_model, d_model, d_model, 2)
        self.query_scale = MLP(d_model, d_model, d_model, 2) if conditional_scale else None
        self.norm = nn.LayerNorm(d_model) if final_norm else None
        self.look_forward_twice = look_forward_twice
        self.use_checkpoint = use_checkpoint
        self.bbox_embed: nn.ModuleList | None = None

    def forward(self, tgt: Tensor, reference: Tensor, memory: Tensor, spatial_shapes: Tensor,
                level_start_index: Tensor, valid_ratios: Tensor, padding_mask: Tensor | None = None,
                self_attn_mask: Tensor | None = None) -> AnchorDecoderOutput:
        """tgt: [B, T, C] content; reference: [B, T, 4] sigmoid-space anchors (detached); memory: [B, S, C]."""
        if self.bbox_embed is None:
            raise RuntimeError("the detector must attach bbox_embed to the anchor decoder")
        output = tgt
        ratios = torch.cat([valid_ratios, valid_ratios], -1)[:, None]  # [B, 1, L, 4]
        hs, pred_refs, o2m_hs = [], [], []
        pred_reference = reference
        for lid, layer in enumerate(self.layers):
            ref_input = reference[:, :, None] * ratios  # [B, T, L, 4]
            query_pos = self.ref_point_head(sine_embed_boxes(ref_input[:, :, 0], self.d_model))
            if self.query_scale is not None and lid > 0:
                query_pos = query_pos * self.query_scale(output)
            args = (output, query_pos, ref_input, memory, spatial_shapes, level_start_index, padding_mask,
                    self_attn_mask)
            if self.use_checkpoint and self.training:
                output = checkpoint(layer, *args, use_reentrant=False)
            else:
                output = layer(*args)
            output, o2m = output if isinstance(output, tuple) else (output, None)
            hs.append(output if self.norm is None else self.norm(output))
            if o2m is not None:
                o2m_hs.append(o2m if self.norm is None else self.norm(o2m))
            pred_refs.append(pred_reference if self.look_forward_twice else reference)
            new_reference = refine_boxes(self.bbox_embed[lid](output), reference, eps=ANCHOR_EPS)
            pred_reference = new_reference  # undetached: used by the next layer's prediction with LFT
            reference = new_reference.detach()
        return AnchorDecoderOutput(torch.stack(hs), torch.stack(pred_refs), torch.stack(o2m_hs) if o2m_hs else None)


@dataclass
class AnchorTransformerOutput:
    """decoder: per-layer results for main queries and groups (T = Q + groups); groups: in order;
    enc_outputs: two-stage top-k proposals {pred_logits [B, Q, K], pred_boxes [B, Q, 4]} or None;
    encoder: the encoder's output (memory, padding mask, shapes, proposals) as the add-ons see it."""

    decoder: AnchorDecoderOutput
    groups: list[QueryGroup]
    num_queries: int
    enc_outputs: dict[str, Tensor] | None = None
    encoder: EncoderOutput | None = None


class AnchorDeformableTransformer(MultiScaleTransformer):
    """Deformable encoder + anchor decoder, one-stage (learned anchors) or DINO two-stage.

    Args:
        d_model, nhead, num_encoder_layers, num_decoder_layers, dim_feedforward, dropout, activation,
            num_feature_levels, dec_n_points, enc_n_points: as in DeformableTransformer.
        num_queries: Q.
        two_stage: DINO's mixed query selection: anchors = top-Q encoder proposals by their best class
            logit (detached), content = the learned ``tgt_embed`` (Xavier-initialised, as in DINO).
        conditional_scale, final_norm, look_forward_twice: see AnchorDeformableDecoder.
        num_extra_queries: two-stage: rows of ``tgt_embed`` after the Q main ones, for add-on query groups
            built like the main queries (H-DETR's one-to-many queries); never used at evaluation.
        decoder_layer: decoder-layer class (or factory) with the standard layer's arguments (MS-DETR's
            layer, asked for by its add-on); None = the standard layer.
        reserved_content_channels: two-stage: trailing content channels reserved by an add-on (DN-DETR's
            indicator bit: 1): ``tgt_embed`` is that much narrower and the content queries end in zeros.
        mask_invalid_proposals: two-stage: padded and border tokens are never selected (DINO's top-k ranks
            every token, spec P14).
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
                 dim_feedforward: int = 2048, dropout: float = 0.0, activation: str = "relu",
                 num_feature_levels: int = 4, dec_n_points: int = 4, enc_n_points: int = 4, num_queries: int = 300,
                 two_stage: bool = False, conditional_scale: bool = False, final_norm: bool = False,
                 look_forward_twice: bool = False, use_checkpoint: bool = False, msda_impl: str = "auto",
                 num_extra_queries: int = 0, decoder_layer: Callable[..., nn.Module] | None = None,
                 reserved_content_channels: int = 0, mask_invalid_proposals: bool = False) -> None:
        super().__init__()
        self.d_model, self.nhead, self.two_stage = d_model, nhead, two_stage
        self.mask_invalid_proposals = mask_invalid_proposals
        self.num_queries = num_queries
        self.reserved_content_channels = reserved_content_channels if two_stage else 0
        enc_layer = DeformableTransformerEncoderLayer(d_model, dim_feedforward, dropout, activation,
                                                      num_feature_levels, nhead, enc_n_points, msda_impl)
        self.encoder = DeformableTransformerEncoder(enc_layer, num_encoder_layers, use_checkpoint)
        dec_layer = (decoder_layer or DeformableTransformerDecoderLayer)(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, dec_n_points, msda_impl)
        self.decoder = AnchorDeformableDecoder(dec_layer, num_decoder_layers, d_model, conditional_scale,
                                               final_norm, look_forward_twice, use_checkpoint)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.tgt_embed = nn.Embedding(num_queries + num_extra_queries, d_model - self.reserved_content_channels)
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    def _proposals(self, memory: Tensor, mask_flatten: Tensor, shapes: Sequence[tuple[int, int]],
                   enc_heads: tuple[nn.Module, nn.Module]) -> tuple[Tensor, Tensor]:
        """Every token's proposal: logits [B, S, K] and boxes before sigmoid [B, S, 4] (+inf where invalid)."""
        output_memory, output_proposals, _ = self.gen_encoder_output_proposals(memory, mask_flatten, shapes)
        return enc_heads[0](output_memory), enc_heads[1](output_memory) + output_proposals

    def rank_proposals(self, scores: Tensor, k: int) -> Tensor:
        """Indices [B, k] of the k best tokens by ``scores`` [B, S], best first (DINO: max class logit).

        Near-equal scores (float noise, ~1e-6) may rank differently on another machine, as in any top-k.
        """
        return torch.topk(scores, k, dim=1)[1]

    def proposal_queries(self, enc_logits: Tensor, enc_coord_unact: Tensor, start: int,
                         count: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """DINO mixed query selection of the proposals ranked start .. start+count-1 by their best class logit.

        Returns:
            content [B, N, C] (rows start.. of ``tgt_embed``), anchors [B, N, 4] (sigmoid, detached), and
            the selected proposals' logits [B, N, K] and boxes before sigmoid [B, N, 4] (with gradient).
        """
        scores = enc_logits.max(-1)[0]
        if self.mask_invalid_proposals:  # the official top-k may pick padded/border tokens (box 1, 1, 1, 1; P14)
            scores = scores.masked_fill(~torch.isfinite(enc_coord_unact).all(-1), float("-inf"))
        end = min(start + count, scores.shape[1])
        topk_idx = self.rank_proposals(scores, end)[:, start:]
        coords = torch.gather(enc_coord_unact, 1, topk_idx.unsqueeze(-1).expand(-1, -1, 4))
        logits = torch.gather(enc_logits, 1, topk_idx.unsqueeze(-1).expand(-1, -1, enc_logits.shape[-1]))
        tgt = pad_content(self.tgt_embed.weight[start:end], self.reserved_content_channels)
        tgt = tgt.unsqueeze(0).expand(enc_logits.shape[0], -1, -1)
        return tgt, coords.detach().sigmoid(), logits, coords

    def forward(self, srcs: list[Tensor], masks: list[Tensor], pos_embeds: list[Tensor], tgt: Tensor | None = None,
                refpoints_unact: Tensor | None = None, enc_heads: tuple[nn.Module, nn.Module] | None = None,
                providers: Sequence[QueryProvider] = ()) -> AnchorTransformerOutput:
        """Encode the pyramid and decode the anchor queries (and the providers' groups).

        Args:
            srcs, masks, pos_embeds: per level [B, C, H, W], [B, H, W] bool, [B, C, H, W].
            tgt, refpoints_unact: one-stage: learned content [Q, C] and anchors [Q, 4] (logit space).
            enc_heads: two-stage: (class head, box head) of the encoder proposals.
            providers: callables returning extra QueryGroups (anchors only: their query_pos must be None).
        """
        flat = self.flatten(srcs, masks, pos_embeds)
        shapes, spatial_shapes, level_start_index = flat.shapes, flat.spatial_shapes, flat.level_start_index
        mask_flatten, valid_ratios = flat.mask, flat.valid_ratios
        memory = self.encoder(flat.src, shapes, spatial_shapes, level_start_index, valid_ratios, flat.pos,
                              mask_flatten)
        bs = memory.shape[0]
        enc_outputs = enc_logits = enc_coord_unact = None
        if self.two_stage:
            if enc_heads is None:
                raise ValueError("two-stage needs the encoder proposal heads")
            enc_logits, enc_coord_unact = self._proposals(memory, mask_flatten, shapes, enc_heads)
            tgt, reference, logits, coords = self.proposal_queries(enc_logits, enc_coord_unact, 0, self.num_queries)
            enc_outputs = {"pred_logits": logits, "pred_boxes": coords.sigmoid()}
        else:
            reference = refpoints_unact.sigmoid().unsqueeze(0).expand(bs, -1, -1)
            tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
        num_queries = tgt.shape[1]

        enc = EncoderOutput(memory, mask_flatten, spatial_shapes, valid_ratios, num_queries, enc_logits,
                            enc_coord_unact, shapes)
        groups = collect_groups(providers, enc) if providers else []
        attn_mask = build_group_attn_mask(num_queries, groups, memory.device)
        for g in groups:
            if g.query_pos is not None or g.reference.shape[-1] != 4:
                raise ValueError(f"query group {g.name!r}: anchor hosts take 4-d references and derive the "
                                 f"positional queries themselves (query_pos must be None)")
        if groups:
            tgt = torch.cat([tgt] + [g.tgt for g in groups], 1)
            reference = torch.cat([reference] + [g.reference for g in groups], 1)
        dec = self.decoder(tgt, reference, memory, spatial_shapes, level_start_index, valid_ratios, mask_flatten,
                           attn_mask)
        return AnchorTransformerOutput(dec, groups, num_queries, enc_outputs, enc)
