"""Conditional-DETR (Atten4Vis/ConditionalDETR) and the single-scale host it shares with DAB-DETR.

specs/dn_dab_dino.md §2: DETR's single-scale encoder, a decoder with conditional cross-attention
(models/conditional_decoder.py), 300 learned positional queries whose 2-d reference points σ(MLP(query))
stay fixed for all layers, boxes predicted relative to them (centre only), sigmoid focal loss, top-100
detections. Parameter names are the official ones, so its released checkpoints load strictly.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from util.errors import FlagError
from util.misc import NestedTensor, inverse_sigmoid, nested_tensor_from_tensor_list

from .addons import HostRequest, StepContext, build_addons, plan_addons
from .addons.builder import enabled_addons
from .backbone import Joiner, build_backbone
from .conditional_decoder import ConditionalTransformer, ConditionalTransformerOutput
from .criterion import SetCriterion, main_coefs, set_giou_eps
from .dab_deformable_detr import add_anchor_args
from .deformable_detr import PostProcess
from .detector import Detector
from .layers import MLP
from .matcher import build_matcher
from .outputs import DetrOutputs, assemble_outputs
from .position_encoding import build_position_encoding
from .query_groups import EncoderOutput, QueryProvider
from .registry import register_model


class SingleScaleDetector(Detector):
    """Backbone (C5) + 1x1 input projection + conditional transformer + one class and one box head shared by
    every decoder layer: the body of Conditional-DETR and DAB-DETR.

    Args:
        backbone: Joiner returning one feature map.
        transformer: ConditionalTransformer.
        num_classes: K.
        aux_loss: return the predictions of every decoder layer.
        box_eps: clamp of the inverse sigmoid of the references (Conditional 1e-5, DAB 1e-3).
        label_table: rows of DN-DETR's ``label_enc`` (K + 1, C - 1 wide), created after ``class_embed`` as in
            DN-DETR; 0: none.
    """

    def __init__(self, backbone: Joiner, transformer: ConditionalTransformer, num_classes: int, aux_loss: bool,
                 box_eps: float, label_table: int = 0) -> None:
        super().__init__()
        self.transformer = transformer
        hidden_dim = transformer.d_model
        self.class_embed = nn.Linear(hidden_dim, num_classes)
        self.label_enc = nn.Embedding(label_table, hidden_dim - 1) if label_table else None
        self.bbox_embed = MLP(hidden_dim, hidden_dim, 4, 3)
        nn.init.constant_(self.class_embed.bias, -math.log((1 - 0.01) / 0.01))
        nn.init.constant_(self.bbox_embed.layers[-1].weight, 0)
        nn.init.constant_(self.bbox_embed.layers[-1].bias, 0)
        self.backbone = backbone
        self.num_feature_levels, self.two_stage = 1, False
        self.aux_loss, self.box_eps = aux_loss, box_eps

    def make_input_proj(self) -> None:
        """The official ``input_proj``: a 1x1 conv C5 -> hidden (called by the subclass after its query tables)."""
        self.input_proj = nn.Conv2d(self.backbone.num_channels[-1], self.transformer.d_model, kernel_size=1)

    @property
    def label_table(self) -> nn.Embedding | None:
        return self.label_enc

    def encode_inputs(self, samples: NestedTensor | Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Projected C5 features [B, C, h, w], padding mask [B, h, w] and image positions [B, C, h, w]."""
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        features, pos = self.backbone(samples)
        return self.input_proj(features[-1].tensors), features[-1].mask, pos[-1]

    def format_outputs(self, out: ConditionalTransformerOutput) -> DetrOutputs:
        """Per-layer class logits and boxes relative to the references, split into main queries and groups."""
        hs, refs = out.decoder.hs, out.decoder.references
        logits = [self.class_embed(hs[lvl]) for lvl in range(hs.shape[0])]
        boxes = []
        for lvl in range(hs.shape[0]):
            delta, ref = self.bbox_embed(hs[lvl]), inverse_sigmoid(refs[lvl], self.box_eps)
            dim = ref.shape[-1]
            boxes.append(torch.cat([delta[..., :dim] + ref, delta[..., dim:]], -1).sigmoid())
        return assemble_outputs(logits, boxes, out.num_queries, out.groups, self.aux_loss,
                                encoder=out.encoder if self.training else None)


class ConditionalDETR(SingleScaleDetector):
    """Conditional-DETR: learned positional queries ``query_embed`` [Q (+ extra), C], zero content.

    Args:
        backbone, transformer, num_classes, aux_loss: see SingleScaleDetector (transformer with query_dim 2).
        num_queries: Q.
        num_extra_queries: rows of ``query_embed`` after the Q main ones for add-on groups built like the main
            queries (H-DETR's one-to-many queries); never used at evaluation.
    """

    def __init__(self, backbone: Joiner, transformer: ConditionalTransformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, num_extra_queries: int = 0) -> None:
        super().__init__(backbone, transformer, num_classes, aux_loss, box_eps=1e-5)
        self.num_queries, self.num_extra_queries = num_queries, num_extra_queries
        self.query_embed = nn.Embedding(num_queries + num_extra_queries, transformer.d_model)
        self.make_input_proj()
        self.capabilities = self.host_capabilities()

    @staticmethod
    def host_capabilities() -> frozenset[str]:
        """Extra queries like the main ones only: the positional query is learned, not derived from a box, so
        denoising (anchor groups) has nothing to put its noised boxes in; no add-on decoder layers."""
        return frozenset({"group_queries"})

    def queries(self, start: int, count: int, bs: int) -> tuple[Tensor, Tensor, Tensor]:
        """Content (zeros) [B, N, C], reference points [B, N, 2] and positional queries [B, N, C] of rows
        start .. start+count-1 of ``query_embed`` (computed sequence-first, as the original, then viewed
        batch-first: the same float rounding)."""
        query_pos = self.query_embed.weight[start:start + count].unsqueeze(1).repeat(1, bs, 1)  # [N, B, C]
        reference = self.transformer.decoder.reference_points(query_pos)
        return torch.zeros_like(query_pos).transpose(0, 1), reference.transpose(0, 1), query_pos.transpose(0, 1)

    def group_queries(self, enc: EncoderOutput, start: int, count: int) -> tuple[Tensor, Tensor, Tensor]:
        """Queries built exactly like the main ones from rows start .. start+count-1 (content, points, query_pos)."""
        return self.queries(start, count, enc.memory.shape[0])

    def forward(self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[dict] | None = None,
                providers: Sequence[QueryProvider] | None = None, ctx: StepContext | None = None) -> DetrOutputs:
        """Detect objects.

        Args:
            samples: a NestedTensor (images [B, 3, H, W] + padding mask [B, H, W]) or a list of [3, H, W].
            targets: per image ``labels``/``boxes`` (training: what add-ons may use).
            providers: query-group providers instead of the add-ons' (None: the add-ons' in training mode).
            ctx: the step context shared with the add-ons' hooks.

        Returns:
            DetrOutputs: ``pred_logits`` [B, Q, K] (unnormalised), ``pred_boxes`` [B, Q, 4] (normalised cxcywh),
            ``aux_outputs`` (layers 0..L-2); in training also ``groups``/``group_meta`` and ``encoder``.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        src, mask, pos = self.encode_inputs(samples)
        providers = self.addon_providers(samples, targets, ctx, providers)
        tgt, reference, query_pos = self.queries(0, self.num_queries, src.shape[0])
        return self.format_outputs(self.transformer(src, mask, pos, tgt, reference, query_pos, providers))


# ------------------------------------------------------------------------------------------------ builders
def check_single_scale_args(args: Any, model: str, anchors: bool) -> None:
    """Refuse what the single-scale conditional models do not have, with the reason."""
    if args.num_feature_levels != 1:
        raise FlagError(f"{model} is single-scale (one C5 or DC5 map): --num_feature_levels must be 1, "
                        f"got {args.num_feature_levels}")
    for flag in ("two_stage", "with_box_refine", "mixed_selection", "look_forward_twice"):
        if getattr(args, flag, False):
            raise FlagError(f"--{flag} is a Deformable-DETR option; {model} has no such variant"
                            + (" (its anchors are always refined, predictions keep the refinement's gradient)"
                               if anchors else ""))
    if args.masks or args.frozen_weights:
        raise FlagError(f"{model}: segmentation (--masks/--frozen_weights) is not supported")
    if getattr(args, "pre_norm", False):
        raise FlagError(f"{model}: --pre_norm is not supported (the conditional decoder layer is post-norm only, "
                        f"as in the original)")
    if getattr(args, "cls_loss", "focal") != "focal":
        raise FlagError(f"{model} is trained with the sigmoid focal loss; --cls_loss {args.cls_loss} is DETR's")
    if args.dec_pred_class_embed_share is False or args.dec_pred_bbox_embed_share is False:
        raise FlagError(f"{model}: one class head and one box head serve every decoder layer (the original has "
                        f"no per-layer heads); --no-dec_pred_*_embed_share is not supported")
    if not anchors and (args.num_patterns or args.random_refpoints_xy):
        raise FlagError(f"{model}: --num_patterns / --random_refpoints_xy are DAB-DETR's anchor options")


def plan_single_scale_addons(args: Any, model: str, capabilities: frozenset[str]) -> tuple[list, HostRequest]:
    """The add-ons of a single-scale host; MS-DETR is refused with the reason before the generic check."""
    if any(cls.name == "ms_detr" for cls in enabled_addons(args)):
        raise FlagError(f"add-on 'ms_detr' cannot run on -m {model}: its auxiliary one-to-many FFN is part of "
                        f"MS-DETR's deformable decoder layer (cross-attention first), which the single-scale "
                        f"conditional decoder layer cannot host")
    return plan_addons(args, capabilities)


def single_scale_backbone(args: Any, temperature: float) -> Joiner:
    """The C5 (DC5 with --dilation) backbone with the model's sine positions (no -0.5 offset; per-axis
    temperatures from --pe_temperatureH/W when given)."""
    temp_h = temperature if args.pe_temperatureH is None else args.pe_temperatureH
    temp_w = temperature if args.pe_temperatureW is None else args.pe_temperatureW
    position_embedding = build_position_encoding(args.hidden_dim, args.position_embedding, temp_h, temp_w, 0.0)
    return build_backbone(args.backbone, position_embedding, lr_backbone=args.lr_backbone, num_feature_levels=1,
                          dilation=args.dilation, pretrained_path=args.pretrained_backbone_path,
                          drop_path_rate=args.drop_path_rate, from_scratch=args.backbone_from_scratch,
                          amp_backbone_half=args.amp_backbone_half, channels_last=args.channels_last)


def single_scale_criterion(args: Any, addons: list, giou_eps: float = 0.0) -> SetCriterion:
    """The focal-loss criterion; ``giou_eps``: DAB-/DN-DETR's GIoU adds 1e-6 to the union and the enclosing area."""
    criterion = SetCriterion(args.num_classes, build_matcher(args), main_coefs(args),
                             num_aux_layers=args.dec_layers - 1 if args.aux_loss else 0, focal_alpha=args.focal_alpha,
                             addons=addons)
    return set_giou_eps(criterion, giou_eps)


def build_conditional_detr(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Conditional-DETR from the flags (ResNet-50/101, DC5 with --dilation); add-ons: hybrid (H-DETR)."""
    check_single_scale_args(args, "conditional_detr", anchors=False)
    classes, request = plan_single_scale_addons(args, "conditional_detr", ConditionalDETR.host_capabilities())
    backbone = single_scale_backbone(args, 10000.0)
    transformer = ConditionalTransformer(args.hidden_dim, args.nheads, args.enc_layers, args.dec_layers,
                                         args.dim_feedforward, args.dropout, "relu", query_dim=2)
    model = ConditionalDETR(backbone, transformer, args.num_classes, args.num_queries, args.aux_loss,
                            num_extra_queries=request.extra_queries)
    addons = build_addons(args, model, classes)
    topk = args.num_select if args.num_select is not None else args.topk
    return model, single_scale_criterion(args, addons), {"bbox": PostProcess(topk)}


# Atten4Vis/ConditionalDETR main.py @8ea7c3f (L29-L89) where it differs from Deformable-DETR's defaults: one
# backbone / rest optimiser split (no 0.1x group), FFN 2048, 50 epochs with the drop at 40, single-scale.
CONDITIONAL_DEFAULTS = {"lr": 1e-4, "lr_backbone": 1e-5, "lr_linear_proj_mult": 1.0, "dim_feedforward": 2048,
                        "num_feature_levels": 1}
build_conditional_detr.add_args = add_anchor_args  # --num_select, --pe_temperatureH/W, --dec_pred_*_embed_share
register_model("conditional_detr", defaults=CONDITIONAL_DEFAULTS,
               source="Atten4Vis/ConditionalDETR main.py")(build_conditional_detr)
