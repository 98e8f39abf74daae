"""Deformable-DETR (single/multi-scale, box refinement, two-stage, H-DETR "++" options).

specs/deformable_family.md §1.3, §1.8-1.11, §1.14. Parameter names match the official
Deformable-DETR, including the decoder aliases of the heads, so official checkpoints load strictly.
"""
from __future__ import annotations

import argparse
import copy
import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from util import box_ops
from util.errors import FlagError
from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .addons import HostRequest, StepContext, build_addons, plan_addons
from .backbone import Joiner, build_backbone
from .criterion import SetCriterion, main_coefs
from .deformable_transformer import DeformableTransformer, TransformerOutput, top_proposals
from .detector import Detector
from .layers import MLP, refine_boxes
from .matcher import build_matcher
from .outputs import DetrOutputs, assemble_outputs
from .position_encoding import build_position_encoding
from .query_groups import EncoderOutput, QueryProvider
from .registry import register_model


class DeformableDETR(Detector):
    """Deformable DETR detector.

    Args:
        backbone: Joiner of feature extractor and position encoding (``strides``, ``num_channels``).
        transformer: DeformableTransformer.
        num_classes: number of class logits K (91 for COCO: raw category ids).
        num_queries: Q (also the two-stage top-k).
        num_feature_levels: L.
        aux_loss: return the predictions of every decoder layer.
        with_box_refine: iterative box refinement with one head per layer.
        two_stage: queries from encoder proposals (an extra class/box head scores them).
        mixed_selection: two-stage with learned content queries.
        num_extra_queries: rows of the learned query table after the Q main ones, used by add-on query
            groups in training only (H-DETR's one-to-many queries; official checkpoint shapes).
    """

    def __init__(self, backbone: Joiner, transformer: DeformableTransformer, num_classes: int, num_queries: int,
                 num_feature_levels: int, aux_loss: bool = True, with_box_refine: bool = False,
                 two_stage: bool = False, mixed_selection: bool = False, num_extra_queries: int = 0) -> None:
        super().__init__()
        self.num_queries, self.num_extra_queries = num_queries, num_extra_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.num_feature_levels = num_feature_levels
        self.aux_loss, self.with_box_refine, self.two_stage = aux_loss, with_box_refine, two_stage
        self.mixed_selection = mixed_selection
        self.capabilities = self.host_capabilities(two_stage)
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries + num_extra_queries, hidden_dim * 2)
        elif mixed_selection:
            self.query_embed = nn.Embedding(num_queries + num_extra_queries, hidden_dim)
        self.input_proj = self.input_projections(backbone, hidden_dim, num_feature_levels)
        self.backbone = backbone

        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        num_dec = transformer.decoder.num_layers
        if with_box_refine:
            num_pred = num_dec + 1 if two_stage else num_dec
            self.class_embed = nn.ModuleList(copy.deepcopy(class_embed) for _ in range(num_pred))
            self.bbox_embed = nn.ModuleList(copy.deepcopy(bbox_embed) for _ in range(num_pred))
            nn.init.constant_(self.bbox_embed[0].layers[-1].bias[2:], -2.0)
            self.transformer.decoder.bbox_embed = self.bbox_embed
            if two_stage:
                self.transformer.decoder.class_embed = self.class_embed
        else:
            nn.init.constant_(bbox_embed.layers[-1].bias[2:], -2.0)
            # One head shared by every decoder layer; two-stage adds its own encoder heads (the
            # official code crashes here because it looks them up on the decoder).
            classes, boxes = [class_embed] * num_dec, [bbox_embed] * num_dec
            if two_stage:
                classes.append(copy.deepcopy(class_embed))
                boxes.append(copy.deepcopy(bbox_embed))
            self.class_embed, self.bbox_embed = nn.ModuleList(classes), nn.ModuleList(boxes)
        if two_stage:
            for head in self.bbox_embed:
                nn.init.constant_(head.layers[-1].bias[2:], 0.0)

    @staticmethod
    def host_capabilities(two_stage: bool) -> frozenset[str]:
        """What this host offers add-ons: two-stage queries carry 4-d boxes whose positional queries the
        transformer derives (``pos_trans``), so anchor groups (denoising) need two-stage."""
        offered = {"group_queries", "decoder_layer", "decoder_states"}
        return frozenset(offered | ({"anchor_groups"} if two_stage else set()))

    def query_embeds(self) -> Tensor | None:
        """The learned query table handed to the transformer (None in plain two-stage)."""
        if not self.two_stage or self.mixed_selection:
            return self.query_embed.weight[: self.num_queries]
        return None

    def group_queries(self, enc: EncoderOutput, start: int, count: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """Queries built exactly like the main ones from table rows / proposal ranks start .. start+count-1.

        Two-stage: the proposals ranked after the main ones (content: rows of ``query_embed`` with mixed
        selection); one-stage: rows of ``query_embed``. Used by H-DETR's one-to-many group.

        Returns:
            (tgt [B, N, C], reference [B, N, 2 or 4], query_pos [B, N, C]), or None without proposals.
        """
        transformer = self.transformer
        if enc.enc_coord_unact is not None:
            coords = enc.enc_coord_unact
            valid = torch.isfinite(coords).all(-1) if transformer.mask_invalid_proposals else None  # invalid: +inf
            coords = top_proposals(enc.enc_logits, coords, valid, start + count)[:, start:]
            if coords.shape[1] == 0:
                return None
            content = self.query_embed.weight[start:start + count] if self.mixed_selection else None
            tgt, query_pos, reference = transformer.proposal_queries(coords, content)
        else:
            tgt, query_pos, reference = transformer.learned_queries(self.query_embed.weight[start:start + count],
                                                                    enc.memory.shape[0])
        return tgt, reference, query_pos

    def forward(self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[dict] | None = None,
                providers: Sequence[QueryProvider] | None = None, ctx: StepContext | None = None) -> DetrOutputs:
        """Detect objects.

        Args:
            samples: a NestedTensor (images [B, 3, H, W] + padding mask [B, H, W]) or a list of [3, H, W].
            targets: per image ``labels`` and ``boxes`` (training only, for add-ons that need them, e.g.
                denoising: the official ``model(samples, targets)``).
            providers: query-group providers to use instead of the add-ons' (None: in training mode, every
                enabled add-on's groups, as the official models return them; in evaluation mode none).
            ctx: the step context the engine shares with the add-ons' hooks (None: one made from targets).

        Returns:
            DetrOutputs (models/outputs.py): ``pred_logits`` [B, Q, K] (unnormalised), ``pred_boxes`` [B, Q, 4]
            (normalised cxcywh), ``aux_outputs`` (the same pair for decoder layers 0..L-2, with aux loss),
            ``enc_outputs`` (two-stage: proposal ``pred_logits`` [B, S, K] and ``pred_boxes`` [B, S, 4], and
            the tokens' fixed ``anchors`` [B, S, 4] sigmoid space with ``anchor_valid`` [B, S] bool); in
            training also ``groups``/``group_meta`` of the add-ons' query groups, ``o2m_outputs`` (MS-DETR's
            layers) and ``encoder`` (memory, masks, shapes).
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        providers = self.addon_providers(samples, targets, ctx, providers)
        srcs, masks, pos = self.pyramid(samples)
        out = self.transformer(srcs, masks, pos, self.query_embeds(), (self.class_embed[-1], self.bbox_embed[-1]),
                               providers)
        return self.format_outputs(out)

    def predict(self, hs: Tensor, box_logits: Tensor | None,
                init_reference: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Per-layer class logits and sigmoid boxes of decoder features hs [L, B, T, C]."""
        logits, boxes = [], []
        for lvl in range(hs.shape[0]):
            logits.append(self.class_embed[lvl](hs[lvl]))
            if box_logits is not None:
                boxes.append(box_logits[lvl].sigmoid())
            else:
                boxes.append(refine_boxes(self.bbox_embed[lvl](hs[lvl]), init_reference))
        return logits, boxes

    def format_outputs(self, out: TransformerOutput) -> DetrOutputs:
        """Per-layer class/box predictions, split into main queries and groups (models/outputs.py)."""
        dec = out.decoder
        logits, boxes = self.predict(dec.hs, dec.box_logits, out.init_reference)
        o2m = None
        if dec.o2m_hs is not None:
            q = out.num_queries
            o2m = self.predict(dec.o2m_hs[:, :, :q], None if dec.o2m_box_logits is None else
                               dec.o2m_box_logits[:, :, :q], out.init_reference[:, :q])
        enc_outputs = None
        if out.enc_logits is not None:
            enc_outputs = {"pred_logits": out.enc_logits, "pred_boxes": out.enc_coord_unact.sigmoid(),
                           "anchors": out.enc_anchors.sigmoid(),
                           "anchor_valid": torch.isfinite(out.enc_anchors).all(-1)}
        return assemble_outputs(logits, boxes, out.num_queries, out.groups, self.aux_loss, o2m, enc_outputs,
                                out.encoder if self.training else None)


class PostProcess(nn.Module):
    """Top-k (query, class) pairs by sigmoid score; boxes to absolute xyxy of the original image."""

    def __init__(self, num_select: int = 100) -> None:
        super().__init__()
        self.num_select = num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """target_sizes: [B, 2] (H, W). Returns per image ``scores``, ``labels``, ``boxes`` (xyxy pixels)."""
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        if len(out_logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError("target_sizes must be [B, 2] with one row per image")
        b, q, k = out_logits.shape
        prob = out_logits.float().sigmoid()
        topk_values, topk_indexes = torch.topk(prob.view(b, -1), min(self.num_select, q * k), dim=1)
        topk_boxes = torch.div(topk_indexes, k, rounding_mode="floor")
        labels = topk_indexes % k
        boxes = box_ops.box_cxcywh_to_xyxy(out_bbox.float())
        boxes = torch.gather(boxes, 1, topk_boxes.unsqueeze(-1).repeat(1, 1, 4))
        img_h, img_w = target_sizes.unbind(1)
        scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale_fct[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(topk_values, labels, boxes)]


def build_deformable_transformer(args: Any, request: HostRequest | None = None) -> DeformableTransformer:
    """The transformer from the official flags; ``request`` carries the add-ons' decoder-layer factory."""
    request = request or HostRequest()
    return DeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        activation="relu", num_feature_levels=args.num_feature_levels, dec_n_points=args.dec_n_points,
        enc_n_points=args.enc_n_points, two_stage=args.two_stage, two_stage_num_proposals=args.num_queries,
        mixed_selection=args.mixed_selection, look_forward_twice=args.look_forward_twice,
        use_checkpoint=args.use_checkpoint, msda_impl=args.msda_impl, decoder_layer=request.decoder_layer,
        mask_invalid_proposals=args.mask_invalid_proposals)


def add_deformable_args(parser: argparse.ArgumentParser) -> None:
    """This project's opt-in fixes of official two-stage behaviour (README, "Deliberate differences")."""
    g = parser.add_argument_group("deliberate differences from the official code (opt-in)")
    g.add_argument("--mask_invalid_proposals", action="store_true",
                   help="two-stage: padded and border encoder tokens are never selected as proposals "
                        "(the official top-k ranks every token; they then become boxes (1, 1, 1, 1))")


def backbone_levels(num_feature_levels: int, max_levels: int = 3) -> int:
    """Backbone stages a model with ``num_feature_levels`` uses: the last ones (C5, C4-C5, C3-C5, ...), at most
    ``max_levels``; the levels beyond come from stride-2 convolutions on the last stage."""
    return max(1, min(num_feature_levels, max_levels))


def check_args(args: Any) -> None:
    """Reject flag combinations that cannot work, with a message (instead of a crash deep inside)."""
    if args.masks or args.frozen_weights:
        raise FlagError("--masks/--frozen_weights (segmentation) are accepted for compatibility but the "
                         "official segmentation head does not fit the deformable transformer; not supported")
    if args.look_forward_twice and not args.with_box_refine:
        raise FlagError("--look_forward_twice needs --with_box_refine (it routes the refinement gradient)")
    if args.mixed_selection and not args.two_stage:
        raise FlagError("--mixed_selection needs --two_stage (content queries for encoder proposals)")
    if args.hidden_dim % 32 != 0:
        raise FlagError(f"--hidden_dim must be a multiple of 32 (GroupNorm(32) in the input projection), "
                         f"got {args.hidden_dim}")


def enc_coefs(args: Any) -> dict[str, float]:
    """Coefficients of the encoder-proposal loss: MS-DETR's --enc_*_loss_coef, each defaulting to the main one."""
    main = main_coefs(args)
    given = {"loss_ce": args.enc_cls_loss_coef, "loss_bbox": args.enc_bbox_loss_coef,
             "loss_giou": args.enc_giou_loss_coef}
    return {k: main[k] if v is None else v for k, v in given.items()}


@register_model("deformable_detr")
def build_deformable_detr(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Deformable-DETR from the official flags (models/__init__.py adds the add-ons)."""
    check_args(args)
    classes, request = plan_addons(args, DeformableDETR.host_capabilities(args.two_stage))
    position_embedding = build_position_encoding(args.hidden_dim, args.position_embedding)
    backbone = build_backbone(args.backbone, position_embedding, lr_backbone=args.lr_backbone,
                              num_feature_levels=args.num_feature_levels, dilation=args.dilation,
                              pretrained_path=args.pretrained_backbone_path, drop_path_rate=args.drop_path_rate,
                              from_scratch=args.backbone_from_scratch,
                              num_backbone_levels=backbone_levels(args.num_feature_levels),
                              amp_backbone_half=args.amp_backbone_half, channels_last=args.channels_last)
    model = DeformableDETR(backbone, build_deformable_transformer(args, request), num_classes=args.num_classes,
                           num_queries=args.num_queries, num_feature_levels=args.num_feature_levels,
                           aux_loss=args.aux_loss, with_box_refine=args.with_box_refine, two_stage=args.two_stage,
                           mixed_selection=args.mixed_selection, num_extra_queries=request.extra_queries)
    addons = build_addons(args, model, classes)
    criterion = SetCriterion(args.num_classes, build_matcher(args), main_coefs(args),
                             num_aux_layers=args.dec_layers - 1 if args.aux_loss else 0, two_stage=args.two_stage,
                             enc_coefs=enc_coefs(args), focal_alpha=args.focal_alpha, addons=addons)
    return model, criterion, {"bbox": PostProcess(args.topk)}


build_deformable_detr.add_args = add_deformable_args
