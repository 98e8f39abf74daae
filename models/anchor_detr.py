"""Detector over 4-d anchor queries: the shared body of DAB-Deformable-DETR and DINO.

specs/dn_dab_dino.md §1.5 and §4. The backbone, the input projections and the post-processing are
Deformable-DETR's (models/deformable_detr.py); the transformer is models/anchor_transformer.py.
"""
from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import Tensor, nn

from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .addons.base import StepContext
from .anchor_transformer import ANCHOR_EPS, AnchorDeformableTransformer, AnchorTransformerOutput
from .backbone import Joiner
from .detector import Detector
from .layers import MLP, pad_content, refine_boxes
from .outputs import DetrOutputs, assemble_outputs
from .query_groups import EncoderOutput, QueryProvider


class AnchorDeformableDETR(Detector):
    """Deformable detector whose queries are (content, anchor box) pairs.

    Args:
        backbone: Joiner of feature extractor and position encoding.
        transformer: AnchorDeformableTransformer (one-stage: learned anchors; two-stage: DINO selection).
        num_classes: K.
        num_queries: Q.
        num_feature_levels: L.
        aux_loss: return the predictions of every decoder layer.
        share_class_head, share_box_head: one class head / one box head for every decoder layer (DINO's
            ``dec_pred_class_embed_share``/``dec_pred_bbox_embed_share``); else one per layer (DAB).
        box_bias_quirk: DAB-Deformable-DETR: only the first layer's box head starts with a (w, h) bias of -2.
        label_table: rows of the host-owned label embedding ``label_enc`` (DINO: K + 1 rows, kept even
            without denoising; DN-DETR: K + 1 rows, C-1 wide); 0: none (the denoising add-on then owns one).
        random_refpoints_xy: DAB's "fixxy" initialisation: anchor centres uniform in [0, 1]. As in the
            original they keep training (spec P2: the original's freeze is a no-op).
        reserved_content_channels: one-stage: trailing content channels reserved by an add-on (DN-DETR's
            indicator bit: ``tgt_embed`` is C-1 wide, the content queries end in 0); two-stage: the
            transformer's setting.
        num_extra_queries: one-stage: rows of ``tgt_embed``/``refpoint_embed`` after the Q main ones for
            add-on query groups built like the main queries (H-DETR's one-to-many queries; two-stage keeps
            them in the transformer's ``tgt_embed``). Never used at evaluation.
    """

    def __init__(self, backbone: Joiner, transformer: AnchorDeformableTransformer, num_classes: int,
                 num_queries: int, num_feature_levels: int, aux_loss: bool = True, share_class_head: bool = False,
                 share_box_head: bool = False, box_bias_quirk: bool = True, random_refpoints_xy: bool = False,
                 num_extra_queries: int = 0, reserved_content_channels: int = 0, label_table: int = 0) -> None:
        super().__init__()
        self.num_queries, self.num_extra_queries = num_queries, num_extra_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.num_feature_levels = num_feature_levels
        self.aux_loss, self.two_stage = aux_loss, transformer.two_stage
        self.capabilities = self.host_capabilities()
        self.reserved_content_channels = (transformer.reserved_content_channels if self.two_stage
                                          else reserved_content_channels)
        if not self.two_stage:  # DAB: learned content and anchors (logit space), N(0, 1) like the original
            self.tgt_embed = nn.Embedding(num_queries + num_extra_queries, hidden_dim - reserved_content_channels)
            self.refpoint_embed = nn.Embedding(num_queries + num_extra_queries, 4)
            if random_refpoints_xy:
                with torch.no_grad():
                    self.refpoint_embed.weight[:, :2].uniform_(0, 1)
                    self.refpoint_embed.weight[:, :2] = torch.logit(self.refpoint_embed.weight[:, :2], eps=1e-5)
        self.input_proj = self.input_projections(backbone, hidden_dim, num_feature_levels)
        self.backbone = backbone

        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_dec = transformer.decoder.num_layers
        if share_class_head:
            self.class_embed = nn.ModuleList([class_embed] * num_dec)
        else:
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_dec))
        if share_box_head:
            self.bbox_embed = nn.ModuleList([bbox_embed] * num_dec)
        else:
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_dec))
            if box_bias_quirk:
                nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)  # DAB-Deformable (head 0 only)
        # Official name and place (DINO, DN-DETR); the denoising add-on uses it.
        self.label_enc = (nn.Embedding(label_table, hidden_dim - self.reserved_content_channels) if label_table
                          else None)
        self.transformer.decoder.bbox_embed = self.bbox_embed
        if self.two_stage:  # DINO: the decoder aliases the class heads too; separate copies score the proposals
            self.transformer.decoder.class_embed = self.class_embed
            self.transformer.enc_out_class_embed = copy.deepcopy(class_embed)
            self.transformer.enc_out_bbox_embed = copy.deepcopy(bbox_embed)

    @staticmethod
    def host_capabilities() -> frozenset[str]:
        """What this host offers add-ons (both configurations): every query is a learned-content + 4-d anchor
        pair whose positional query the decoder derives from the anchor."""
        return frozenset({"anchor_groups", "group_queries", "decoder_layer", "learned_content", "decoder_states"})

    @property
    def label_table(self) -> nn.Embedding | None:
        return self.label_enc

    def forward(self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[dict] | None = None,
                providers: Sequence[QueryProvider] | None = None, ctx: StepContext | None = None) -> DetrOutputs:
        """Detect objects.

        Args:
            samples: a NestedTensor (images [B, 3, H, W] + padding mask [B, H, W]) or a list of [3, H, W].
            targets: per image ``labels`` and ``boxes`` (training only: what denoising noises, as in
                DN-DETR's and DINO's ``model(samples, targets)``).
            providers: query-group providers to use instead of the add-ons' (None: in training mode, every
                enabled add-on's groups, as the official models; in evaluation mode none).
            ctx: the step context the engine shares with the add-ons' hooks (None: one made from targets).

        Returns:
            DetrOutputs (models/outputs.py): ``pred_logits`` [B, Q, K] (unnormalised), ``pred_boxes`` [B, Q, 4]
            (normalised cxcywh), ``aux_outputs`` (the same pair for decoder layers 0..L-2), ``enc_outputs``
            (two-stage: the top-Q proposals' ``pred_logits`` [B, Q, K] and ``pred_boxes`` [B, Q, 4]); in
            training also ``groups``/``group_meta``, ``o2m_outputs`` and ``encoder``.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        providers = self.addon_providers(samples, targets, ctx, providers)
        srcs, masks, pos = self.pyramid(samples)
        if self.two_stage:
            heads = (self.transformer.enc_out_class_embed, self.transformer.enc_out_bbox_embed)
            out = self.transformer(srcs, masks, pos, enc_heads=heads, providers=providers)
        else:
            q = self.num_queries
            content = pad_content(self.tgt_embed.weight[:q], self.reserved_content_channels)
            out = self.transformer(srcs, masks, pos, content, self.refpoint_embed.weight[:q], providers=providers)
        return self.format_outputs(out)

    def group_queries(self, enc: EncoderOutput, start: int, count: int) -> tuple[Tensor, Tensor, None] | None:
        """Queries built exactly like the main ones from table rows / proposal ranks start .. start+count-1.

        Returns:
            (content [B, N, C], anchors [B, N, 4] sigmoid space, None: the decoder derives query_pos from
            the anchors), or None when there are no such proposals.
        """
        if self.two_stage:
            if enc.enc_logits is None:
                raise ValueError("two-stage group queries need the encoder proposals")
            tgt, reference, _, _ = self.transformer.proposal_queries(enc.enc_logits, enc.enc_coord_unact, start, count)
            return (tgt, reference, None) if tgt.shape[1] else None
        bs = enc.memory.shape[0]
        tgt = pad_content(self.tgt_embed.weight[start:start + count], self.reserved_content_channels)
        tgt = tgt.unsqueeze(0).expand(bs, -1, -1)
        reference = self.refpoint_embed.weight[start:start + count].sigmoid().unsqueeze(0).expand(bs, -1, -1)
        return tgt, reference, None

    def predict(self, hs: Tensor, references: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per-layer class logits and sigmoid boxes of features hs [L, B, T, C] relative to anchors [L, B, T, 4]."""
        logits = [self.class_embed[lvl](hs[lvl]) for lvl in range(hs.shape[0])]
        boxes = [refine_boxes(self.bbox_embed[lvl](hs[lvl]), references[lvl], eps=ANCHOR_EPS)
                 for lvl in range(hs.shape[0])]
        return logits, boxes

    def format_outputs(self, out: AnchorTransformerOutput) -> DetrOutputs:
        """Per-layer predictions, split into the main queries and each group (models/outputs.py)."""
        dec = out.decoder
        hs = dec.hs
        if self.label_enc is not None:  # as DINO: keeps the label table in the graph (DDP) when nothing uses it
            hs = torch.cat([hs[:1] + self.label_enc.weight[0, 0] * 0.0, hs[1:]])
        logits, boxes = self.predict(hs, dec.pred_references)
        o2m = None
        if dec.o2m_hs is not None:  # MS-DETR: one-to-many predictions of the main queries, same anchors
            q = out.num_queries
            o2m = self.predict(dec.o2m_hs[:, :, :q], dec.pred_references[:, :, :q])
        return assemble_outputs(logits, boxes, out.num_queries, out.groups, self.aux_loss, o2m, out.enc_outputs,
                                out.encoder if self.training else None)
