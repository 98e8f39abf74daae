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
import torch.nn.functional as F
from torch import Tensor, nn

from util import box_ops
from util.errors import FlagError
from util.misc import NestedTensor, nested_tensor_from_tensor_list

from .backbone import Joiner, build_backbone
from .criterion import ModelOptions, SetCriterion, StepContext, main_coefs, query_providers
from .deformable_transformer import DeformableTransformer, TransformerOutput, refine_boxes, top_proposals
from .matcher import build_matcher
from .position_encoding import build_position_encoding
from .query_groups import EncoderOutput, QueryProvider
from .registry import register_model


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


class DeformableDETR(nn.Module):
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
        class_embed = nn.Linear(hidden_dim, num_classes)
        bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        if not two_stage:
            self.query_embed = nn.Embedding(num_queries + num_extra_queries, hidden_dim * 2)
        elif mixed_selection:
            self.query_embed = nn.Embedding(num_queries + num_extra_queries, hidden_dim)
        self.input_proj = self._input_proj(backbone, hidden_dim, num_feature_levels)
        self.backbone = backbone

        nn.init.constant_(class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(bbox_embed.layers[-1].bias, 0)
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
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
    def _input_proj(backbone: Joiner, hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
        """1x1 conv + GN per backbone level; 3x3 stride-2 conv + GN per extra level.

        GroupNorm has the official 32 groups; a tiny model (hidden_dim 32) gets 16, because one channel
        per group on a 1x1 map of one image has a single value per group, which GroupNorm rejects.
        """
        groups = 32 if hidden_dim >= 64 else hidden_dim // 2
        if num_feature_levels == 1:
            return nn.ModuleList([nn.Sequential(nn.Conv2d(backbone.num_channels[-1], hidden_dim, 1),
                                                nn.GroupNorm(groups, hidden_dim))])
        projs = [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(groups, hidden_dim))
                 for c in backbone.num_channels]
        in_channels = backbone.num_channels[-1]
        for _ in range(num_feature_levels - len(backbone.num_channels)):
            projs.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1),
                                       nn.GroupNorm(groups, hidden_dim)))
            in_channels = hidden_dim
        return nn.ModuleList(projs)

    def _pyramid(self, samples: NestedTensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        features, pos = self.backbone(samples)
        srcs = [proj(f.tensors) for proj, f in zip(self.input_proj, features)]
        masks = [f.mask for f in features]
        for lvl in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1].tensors if lvl == len(features) else srcs[-1])
            mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        return srcs, masks, pos

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

    train_addons: tuple = ()  # the add-ons the model was built with (models/addon_builder.py)

    def forward(self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[dict] | None = None,
                providers: Sequence[QueryProvider] | None = None) -> dict:
        """Detect objects.

        Args:
            samples: a NestedTensor (images [B, 3, H, W] + padding mask [B, H, W]) or a list of [3, H, W].
            targets: per image ``labels`` and ``boxes`` (training only, for add-ons that need them, e.g.
                denoising: the official ``model(samples, targets)``).
            providers: query-group providers to use instead of the add-ons' (None: in training mode, every
                enabled add-on's groups, as the official models return them; in evaluation mode none).

        Returns:
            dict with ``pred_logits`` [B, Q, K] (unnormalised), ``pred_boxes`` [B, Q, 4] (normalised
            cxcywh), ``aux_outputs`` (list of the same pair for decoder layers 0..L-2, with aux loss),
            ``enc_outputs`` (two-stage: proposal ``pred_logits`` [B, S, K] and ``pred_boxes`` [B, S, 4],
            and the tokens' fixed ``anchors`` [B, S, 4] sigmoid space with ``anchor_valid`` [B, S] bool),
            ``groups`` {name: same structure as the main outputs} when query groups ran, and
            ``o2m_outputs`` (same structure, main queries only) when the decoder layers make one-to-many
            features (MS-DETR).
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        if providers is None:
            providers = query_providers(self.train_addons, StepContext(targets)) if self.training else ()
        srcs, masks, pos = self._pyramid(samples)
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

    def format_outputs(self, out: TransformerOutput) -> dict[str, Any]:
        """Per-layer class/box predictions, split into main queries and groups."""
        dec = out.decoder
        logits, boxes = self.predict(dec.hs, dec.box_logits, out.init_reference)
        sizes = [out.num_queries] + [g.size for g in out.groups]
        names = [None] + [g.name for g in out.groups]
        split_logits = [torch.split(x, sizes, dim=1) for x in logits]
        split_boxes = [torch.split(x, sizes, dim=1) for x in boxes]
        result: dict[str, Any] = {}
        for gi, name in enumerate(names):
            part = self._layer_dict([x[gi] for x in split_logits], [x[gi] for x in split_boxes])
            if name is None:
                result.update(part)
            else:
                result.setdefault("groups", {})[name] = part
        if dec.o2m_hs is not None:
            q = out.num_queries
            o2m_logits, o2m_boxes = self.predict(dec.o2m_hs[:, :, :q], None if dec.o2m_box_logits is None else
                                                 dec.o2m_box_logits[:, :, :q], out.init_reference[:, :q])
            result["o2m_outputs"] = self._layer_dict(o2m_logits, o2m_boxes)
        if out.enc_logits is not None:
            result["enc_outputs"] = {"pred_logits": out.enc_logits, "pred_boxes": out.enc_coord_unact.sigmoid(),
                                     "anchors": out.enc_anchors.sigmoid(),
                                     "anchor_valid": torch.isfinite(out.enc_anchors).all(-1)}
        if out.groups:
            result["group_meta"] = {g.name: g.meta for g in out.groups}
        return result

    def _layer_dict(self, logits: list[Tensor], boxes: list[Tensor]) -> dict[str, Any]:
        out: dict[str, Any] = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
        if self.aux_loss:
            out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
        return out


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


def build_deformable_transformer(args: Any, options: ModelOptions | None = None) -> DeformableTransformer:
    """The transformer from the official flags; ``options`` carries the add-ons' decoder-layer variant."""
    options = options or ModelOptions()
    return DeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        activation="relu", num_feature_levels=args.num_feature_levels, dec_n_points=args.dec_n_points,
        enc_n_points=args.enc_n_points, two_stage=args.two_stage, two_stage_num_proposals=args.num_queries,
        mixed_selection=args.mixed_selection, look_forward_twice=args.look_forward_twice,
        use_checkpoint=args.use_checkpoint, msda_impl=args.msda_impl, decoder_layer=options.decoder_layer,
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
    from .addon_builder import build_addons, model_options  # local: add-on modules import this file's helpers

    check_args(args)
    options = model_options(args)
    position_embedding = build_position_encoding(args.hidden_dim, args.position_embedding)
    backbone = build_backbone(args.backbone, position_embedding, lr_backbone=args.lr_backbone,
                              num_feature_levels=args.num_feature_levels, dilation=args.dilation,
                              pretrained_path=args.pretrained_backbone_path, drop_path_rate=args.drop_path_rate,
                              from_scratch=args.backbone_from_scratch,
                              num_backbone_levels=backbone_levels(args.num_feature_levels))
    model = DeformableDETR(backbone, build_deformable_transformer(args, options), num_classes=args.num_classes,
                           num_queries=args.num_queries, num_feature_levels=args.num_feature_levels,
                           aux_loss=args.aux_loss, with_box_refine=args.with_box_refine, two_stage=args.two_stage,
                           mixed_selection=args.mixed_selection, num_extra_queries=options.extra_queries)
    addons = build_addons(args, model)
    criterion = SetCriterion(args.num_classes, build_matcher(args), main_coefs(args),
                             num_aux_layers=args.dec_layers - 1 if args.aux_loss else 0, two_stage=args.two_stage,
                             enc_coefs=enc_coefs(args), focal_alpha=args.focal_alpha, addons=addons)
    return model, criterion, {"bbox": PostProcess(args.topk)}


build_deformable_detr.add_args = add_deformable_args
