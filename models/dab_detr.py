"""DAB-DETR (IDEA-Research/DAB-DETR, single-scale) and DN-DETR's ``dn_dab_detr`` (IDEA-Research/DN-DETR).

specs/dn_dab_dino.md §1.1-1.4 and §3: learned 4-d anchor boxes as queries; each decoder layer derives its
positional query from the sine embedding of the anchor, modulates the cross-attention by the anchor's
width/height, and refines the anchor (next layer: detached; predictions: with the refinement's gradient).
The encoder scales its image positions per layer. Denoising is the ``dn`` add-on (``--use_dn``): DN-DETR's
model owns ``label_enc`` [K + 1, C - 1] and its matching queries' content is [label_enc(K), 0].
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from util.errors import FlagError
from util.misc import NestedTensor, inverse_sigmoid, nested_tensor_from_tensor_list

from .addons import StepContext, build_addons
from .backbone import Joiner
from .conditional_decoder import ANCHOR_EPS, ConditionalTransformer
from .conditional_detr import (
    SingleScaleDetector,
    check_single_scale_args,
    plan_single_scale_addons,
    single_scale_backbone,
    single_scale_criterion,
)
from .criterion import SetCriterion
from .dab_deformable_detr import add_anchor_args
from .deformable_detr import PostProcess
from .outputs import DetrOutputs
from .query_groups import EncoderOutput, QueryProvider
from .registry import register_model


class DABDETR(SingleScaleDetector):
    """DAB-DETR: anchors ``refpoint_embed`` [Q (+ extra), 4] (logit space, N(0, 1) as the original).

    Args:
        backbone, transformer, num_classes, aux_loss: see SingleScaleDetector (transformer with query_dim 4;
            its ``patterns`` [P, C] pair every pattern with every anchor, pattern-major: P * Q queries).
        num_queries: Q.
        random_refpoints_xy: DAB's "fixxy": anchor centres uniform in [0, 1] (they keep training, spec P2).
        num_extra_queries: anchor rows after the Q main ones for add-on groups built like the main queries
            (H-DETR's one-to-many queries); never used at evaluation.
        label_table: DN-DETR: rows of the model's ``label_enc`` (K + 1); the matching queries' content is then
            [label_enc(K), 0] (plus the patterns); 0: zero content (DAB-DETR).
        reserved_content_channels: 1 when denoising adds DN-DETR's indicator bit (its queries end in 1).
    """

    def __init__(self, backbone: Joiner, transformer: ConditionalTransformer, num_classes: int, num_queries: int,
                 aux_loss: bool = True, random_refpoints_xy: bool = False, num_extra_queries: int = 0,
                 label_table: int = 0, reserved_content_channels: int = 0) -> None:
        super().__init__(backbone, transformer, num_classes, aux_loss, box_eps=ANCHOR_EPS, label_table=label_table)
        self.num_classes, self.num_queries, self.num_extra_queries = num_classes, num_queries, num_extra_queries
        self.reserved_content_channels = reserved_content_channels
        self.refpoint_embed = nn.Embedding(num_queries + num_extra_queries, 4)
        if random_refpoints_xy:
            with torch.no_grad():
                self.refpoint_embed.weight[:, :2].uniform_(0, 1)
                self.refpoint_embed.weight[:, :2] = inverse_sigmoid(self.refpoint_embed.weight[:, :2], ANCHOR_EPS)
        self.make_input_proj()
        self.transformer.decoder.bbox_embed = self.bbox_embed  # official alias: the decoder refines with it
        self.capabilities = self.host_capabilities()

    @staticmethod
    def host_capabilities() -> frozenset[str]:
        """Anchor groups (denoising: the decoder derives their positional queries from the boxes) and extra
        queries like the main ones; no add-on decoder layers."""
        return frozenset({"anchor_groups", "group_queries"})

    def content(self, n: int) -> Tensor:
        """[n, C] content of matching queries: zeros, or DN-DETR's [label_enc(K), 0]."""
        if self.label_enc is None:
            return self.refpoint_embed.weight.new_zeros(n, self.transformer.d_model)
        row = self.label_enc.weight[self.num_classes]
        return torch.cat([row, row.new_zeros(1)]).unsqueeze(0).expand(n, -1)

    def queries(self, bs: int) -> tuple[Tensor, Tensor]:
        """The main queries: content [B, P*Q, C] (plus the patterns) and anchors [B, P*Q, 4] (sigmoid space)."""
        patterns = self.transformer.patterns
        reps = 1 if patterns is None else patterns.num_embeddings
        tgt = self.content(self.num_queries * reps)
        if patterns is not None:  # pattern-major: pattern p with every anchor, then pattern p + 1
            tgt = tgt + patterns.weight.repeat_interleave(self.num_queries, 0)
        # sigmoid of the sequence-first copy, as the original (the same float rounding), viewed batch-first
        anchors = self.refpoint_embed.weight[: self.num_queries].repeat(reps, 1).unsqueeze(1).repeat(1, bs, 1)
        return tgt.unsqueeze(0).expand(bs, -1, -1), anchors.sigmoid().transpose(0, 1)

    def group_queries(self, enc: EncoderOutput, start: int, count: int) -> tuple[Tensor, Tensor, None]:
        """Queries built like the main ones (no patterns) from anchor rows start .. start+count-1.

        Returns:
            (content [B, N, C], anchors [B, N, 4] sigmoid space, None: the decoder derives query_pos).
        """
        bs = enc.memory.shape[0]
        anchors = self.refpoint_embed.weight[start:start + count].sigmoid()
        return (self.content(anchors.shape[0]).unsqueeze(0).expand(bs, -1, -1),
                anchors.unsqueeze(0).expand(bs, -1, -1), None)

    def forward(self, samples: NestedTensor | Sequence[Tensor], targets: Sequence[dict] | None = None,
                providers: Sequence[QueryProvider] | None = None, ctx: StepContext | None = None) -> DetrOutputs:
        """Detect objects.

        Args:
            samples: a NestedTensor (images [B, 3, H, W] + padding mask [B, H, W]) or a list of [3, H, W].
            targets: per image ``labels``/``boxes`` (training: what denoising noises, DN-DETR's convention).
            providers: query-group providers instead of the add-ons' (None: the add-ons' in training mode).
            ctx: the step context shared with the add-ons' hooks.

        Returns:
            DetrOutputs: ``pred_logits`` [B, P*Q, K] (unnormalised), ``pred_boxes`` [B, P*Q, 4] (normalised
            cxcywh), ``aux_outputs`` (layers 0..L-2); in training also ``groups``/``group_meta`` (denoising,
            one-to-many) and ``encoder``.
        """
        if not isinstance(samples, NestedTensor):
            samples = nested_tensor_from_tensor_list(samples)
        src, mask, pos = self.encode_inputs(samples)
        providers = self.addon_providers(samples, targets, ctx, providers)
        tgt, anchors = self.queries(src.shape[0])
        return self.format_outputs(self.transformer(src, mask, pos, tgt, anchors, None, providers))


def _build(args: Any, name: str, dn_detr: bool) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    check_single_scale_args(args, name, anchors=True)
    if args.num_patterns < 0:
        raise FlagError(f"--num_patterns must be >= 0, got {args.num_patterns}")
    classes, request = plan_single_scale_addons(args, name, DABDETR.host_capabilities())
    if request.extra_queries and args.num_patterns:
        raise FlagError(f"{name}: the hybrid branch's one-to-many queries have no patterns; use --num_patterns 0")
    backbone = single_scale_backbone(args, 20.0)
    transformer = ConditionalTransformer(args.hidden_dim, args.nheads, args.enc_layers, args.dec_layers,
                                         args.dim_feedforward, args.dropout, args.transformer_activation,
                                         query_dim=4, modulate_hw_attn=True, encoder_pos_scale=True,
                                         num_patterns=args.num_patterns)
    model = DABDETR(backbone, transformer, args.num_classes, args.num_queries, args.aux_loss,
                    args.random_refpoints_xy, num_extra_queries=request.extra_queries,
                    label_table=args.num_classes + 1 if dn_detr else 0,
                    reserved_content_channels=max(request.reserved_content_channels, int(dn_detr)))
    addons = build_addons(args, model, classes)
    topk = args.num_select if args.num_select is not None else args.topk
    return model, single_scale_criterion(args, addons, giou_eps=1e-6), {"bbox": PostProcess(topk)}


def build_dab_detr(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """DAB-DETR from the flags (R50/R101, DC5 with --dilation, --num_patterns, --random_refpoints_xy); add-ons:
    dn (its own label table, DN-DETR's indicator bit), hybrid (without patterns)."""
    return _build(args, "dab_detr", dn_detr=False)


def build_dn_dab_detr(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """DN-DETR (``-m dn_dab_detr --use_dn``): DAB-DETR whose model owns ``label_enc`` [K + 1, C - 1] and whose
    matching queries are [label_enc(K), 0] (its official state dict); trains without --use_dn too."""
    return _build(args, "dn_dab_detr", dn_detr=True)


build_dab_detr.add_args = add_anchor_args
build_dn_dab_detr.add_args = add_anchor_args

# IDEA-Research/DAB-DETR main.py @723ddb8 (L34-L96, L111) where it differs from Deformable-DETR's defaults; its
# README trains 50 epochs with the drop at 40 (configs/dab_detr/). One backbone / rest optimiser split.
DAB_DETR_DEFAULTS = {"lr": 1e-4, "lr_backbone": 1e-5, "lr_linear_proj_mult": 1.0, "epochs": 300, "lr_drop": 200,
                     "dim_feedforward": 2048, "dropout": 0.0, "cls_loss_coef": 1.0, "num_feature_levels": 1,
                     "transformer_activation": "prelu", "num_select": 300, "pe_temperatureH": 20.0,
                     "pe_temperatureW": 20.0}
# IDEA-Research/DN-DETR main.py @ff3902a: the same, 50 / 40 epochs, DN flags (its README passes --use_dn).
DN_DAB_DETR_DEFAULTS = {**DAB_DETR_DEFAULTS, "epochs": 50, "lr_drop": 40, "scalar": 5, "label_noise_scale": 0.2,
                        "box_noise_scale": 0.4}
register_model("dab_detr", defaults=DAB_DETR_DEFAULTS, source="IDEA-Research/DAB-DETR main.py")(build_dab_detr)
register_model("dn_dab_detr", defaults=DN_DAB_DETR_DEFAULTS,
               source="IDEA-Research/DN-DETR main.py")(build_dn_dab_detr)
