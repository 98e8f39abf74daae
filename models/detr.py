"""DETR (facebookresearch/detr): single-scale transformer, 100 learned queries, softmax classification.

Parameter names and shapes are the official ones (``transformer.*``, ``class_embed`` with K + 1 logits, the
last one "no object", ``bbox_embed``, ``query_embed``, a plain 1x1 ``input_proj``, ``backbone.0.body.*``), so
released checkpoints load with a strict ``load_state_dict``. The criterion is the shared SetCriterion with
``--cls_loss softmax`` (cross-entropy, no-object weight ``--eos_coef``, matching cost -prob[:, class]).
Add-ons: H-DETR's hybrid branch (extra rows of ``query_embed`` behind the one block mask) and those that
need nothing of the host; denoising and MS-DETR need anchor queries / a deformable decoder layer.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util import box_ops
from util.errors import FlagError
from util.misc import NestedTensor, host_tensor_to, nested_tensor_from_tensor_list

from .addons import StepContext, build_addons, plan_addons
from .backbone import Joiner, build_backbone
from .criterion import SetCriterion, main_coefs
from .detector import Detector
from .layers import MLP
from .matcher import build_matcher
from .outputs import DetrOutputs, assemble_outputs
from .position_encoding import build_position_encoding
from .query_groups import EncoderOutput, QueryGroup, QueryProvider, build_group_attn_mask, collect_groups
from .registry import register_model
from .transformer import DetrTransformer

# facebookresearch/detr main.py defaults, where they differ from Deformable-DETR's (flags.py).
DETR_DEFAULTS = {
    "lr": 1e-4, "lr_backbone": 1e-5, "epochs": 300, "lr_drop": 200, "num_queries": 100, "dim_feedforward": 2048,
    "num_feature_levels": 1, "cls_loss": "softmax", "eos_coef": 0.1, "set_cost_class": 1.0, "cls_loss_coef": 1.0
}


class DETR(Detector):
    """DETR detector.

    Args:
        backbone: Joiner of a ResNet (last stage only) and the position encoding.
        transformer: DetrTransformer.
        num_classes: K; the classifier has K + 1 logits (the last: "no object").
        num_queries: Q.
        aux_loss: return every decoder layer's predictions.
        num_extra_queries: rows of ``query_embed`` after the Q main ones, for add-on query groups (hybrid).
    """

    capabilities = frozenset({"group_queries"})
    two_stage = False  # no encoder proposals (the contract's flag)

    def __init__(self, backbone: Joiner, transformer: DetrTransformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, num_extra_queries: int = 0) -> None:
        super().__init__()
        self.num_queries, self.num_extra_queries = num_queries, num_extra_queries
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes + 1)
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        self.query_embed = nn.Embedding(num_queries + num_extra_queries, hidden_dim)
        self.input_proj = nn.Conv2d(backbone.num_channels[-1], hidden_dim, kernel_size=1)
        self.backbone = backbone
        self.aux_loss = aux_loss
        self.num_feature_levels = 1

    def group_queries(self, enc: EncoderOutput, start: int, count: int) -> tuple[Tensor, Tensor, Tensor] | None:
        """Rows start .. start+count-1 of ``query_embed`` as positional queries, zero content, as the main ones.

        Returns:
            (content [B, N, C] zeros, reference [B, N, 0] (DETR has none), query_pos [B, N, C]), or None.
        """
        rows = self.query_embed.weight[start:start + count]
        if rows.shape[0] == 0:
            return None
        b = enc.memory.shape[0]
        query_pos = rows.unsqueeze(0).expand(b, -1, -1)
        return torch.zeros_like(query_pos), query_pos.new_zeros(b, rows.shape[0], 0), query_pos

    def forward(self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[dict] | None = None,
                providers: Sequence[QueryProvider] | None = None, ctx: StepContext | None = None) -> DetrOutputs:
        """Detect objects.

        Args:
            samples: a NestedTensor (images [B, 3, H, W] + padding mask [B, H, W]) or a list of [3, H, W].
            targets, providers, ctx: as in DeformableDETR.forward (add-on query groups, training only).

        Returns:
            ``pred_logits`` [B, Q, K + 1] (softmax logits, the last "no object"), ``pred_boxes`` [B, Q, 4]
            (normalised cxcywh), ``aux_outputs`` (decoder layers 0..L-2), and in training the add-ons' ``groups``
            and the ``encoder`` output.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        providers = self.addon_providers(samples, targets, ctx, providers)
        features, pos = self.backbone(samples)
        src, mask = features[-1].tensors, features[-1].mask
        src = self.input_proj(src)
        memory, mask_flat, pos_flat = self.transformer.encode(src, mask, pos[-1])
        b = src.shape[0]
        query_pos = self.query_embed.weight[: self.num_queries].unsqueeze(1).repeat(1, b, 1)
        tgt = torch.zeros_like(query_pos)
        enc = self.encoder_output(memory, mask, mask_flat)
        groups = collect_groups(providers, enc) if providers else []
        attn_mask = build_group_attn_mask(self.num_queries, groups, src.device)
        if groups:
            tgt = torch.cat([tgt] + [g.tgt.transpose(0, 1) for g in groups])
            query_pos = torch.cat([query_pos] + [self._group_pos(g) for g in groups])
        hs = self.transformer.decode(tgt, query_pos, memory, mask_flat, pos_flat, attn_mask)
        logits = self.class_embed(hs)
        boxes = self.bbox_embed(hs).sigmoid()
        return assemble_outputs(list(logits), list(boxes), self.num_queries, groups, self.aux_loss,
                                encoder=enc if self.training else None)

    @staticmethod
    def _group_pos(group: QueryGroup) -> Tensor:
        if group.query_pos is None:
            raise ValueError(f"query group {group.name!r}: DETR needs positional queries (it has no anchors)")
        return group.query_pos.transpose(0, 1)

    def encoder_output(self, memory: Tensor, mask: Tensor, mask_flat: Tensor) -> EncoderOutput:
        """The memory [S, B, C] as add-ons see it (batch-first, one level)."""
        h, w = mask.shape[-2:]
        valid = (~mask).float()
        ratios = torch.stack([valid[:, 0, :].sum(1) / w, valid[:, :, 0].sum(1) / h], -1)[:, None]
        shapes = host_tensor_to([[h, w]], torch.long, memory.device)
        return EncoderOutput(memory.transpose(0, 1), mask_flat, shapes, ratios, self.num_queries)


class SoftmaxPostProcess(nn.Module):
    """DETR's post-processing: softmax over the K + 1 logits, drop "no object", best class of every query;
    boxes to absolute xyxy of the original image. One detection per query (no top-k)."""

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """target_sizes: [B, 2] (H, W). Returns per image ``scores`` [Q], ``labels`` [Q], ``boxes`` [Q, 4]."""
        out_logits, out_bbox = outputs["pred_logits"], outputs["pred_boxes"]
        if len(out_logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError("target_sizes must be [B, 2] with one row per image")
        prob = F.softmax(out_logits.float(), -1)
        scores, labels = prob[..., :-1].max(-1)
        boxes = box_ops.box_cxcywh_to_xyxy(out_bbox.float())
        img_h, img_w = target_sizes.unbind(1)
        scale_fct = torch.stack([img_w, img_h, img_w, img_h], dim=1)
        boxes = boxes * scale_fct[:, None, :]
        return [{"scores": s, "labels": lab, "boxes": bx} for s, lab, bx in zip(scores, labels, boxes)]


def check_detr_args(args: Any) -> None:
    """Refuse flags DETR cannot honour, with the reason."""
    if args.masks or args.frozen_weights:
        raise FlagError("-m detr: --masks/--frozen_weights (DETR's panoptic segmentation head) are not supported")
    if args.num_feature_levels != 1:
        raise FlagError(f"-m detr is single-scale (the last backbone stage): --num_feature_levels must be 1, got "
                        f"{args.num_feature_levels}")
    if args.cls_loss != "softmax":
        raise FlagError("-m detr classifies with a 'no object' logit: it needs --cls_loss softmax (its default)")
    if args.two_stage or args.with_box_refine:
        raise FlagError("-m detr has no box refinement or two-stage (Deformable-DETR options); use -m deformable_detr")


def softmax_criterion(args: Any, addons: Sequence = ()) -> SetCriterion:
    """DETR's criterion (also YOLOS's): softmax CE + L1 + GIoU on the last and every aux layer."""
    return SetCriterion(args.num_classes, build_matcher(args), main_coefs(args),
                        num_aux_layers=args.dec_layers - 1 if args.aux_loss else 0, cls_loss="softmax",
                        eos_coef=args.eos_coef, addons=addons)


@register_model("detr", defaults=DETR_DEFAULTS, source="facebookresearch/detr main.py")
def build_detr(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """DETR from the official flags (``--dilation``: DC5; ``--position_embedding learned``; ``--pre_norm``)."""
    check_detr_args(args)
    classes, request = plan_addons(args, DETR.capabilities)
    position_embedding = build_position_encoding(args.hidden_dim, args.position_embedding, offset=0.0)
    backbone = build_backbone(args.backbone, position_embedding, lr_backbone=args.lr_backbone, num_feature_levels=1,
                              dilation=args.dilation, pretrained_path=args.pretrained_backbone_path,
                              drop_path_rate=args.drop_path_rate, from_scratch=args.backbone_from_scratch,
                              amp_backbone_half=args.amp_backbone_half, channels_last=args.channels_last)
    transformer = DetrTransformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                                  num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                                  dropout=args.dropout, normalize_before=args.pre_norm)
    model = DETR(backbone, transformer, num_classes=args.num_classes, num_queries=args.num_queries,
                 aux_loss=args.aux_loss, num_extra_queries=request.extra_queries)
    addons = build_addons(args, model, classes)
    return model, softmax_criterion(args, addons), {"bbox": SoftmaxPostProcess()}
