"""DAB-Deformable-DETR (and DN-DETR's ``dn_dab_deformable_detr``): learned 4-d anchor queries.

specs/dn_dab_dino.md §1.5: deformable encoder, decoder whose positional queries come from the sine
embedding of each query's anchor box (conditionally scaled after layer 0), anchors refined layer by
layer (detached, "look forward once"), one class/box head per layer. Denoising is the ``dn`` add-on
(``--use_dn``; models/criterion/denoising.py), so the model trains with or without it.
"""
from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from .addon_builder import build_addons, model_options
from .anchor_detr import AnchorDeformableDETR
from .anchor_transformer import AnchorDeformableTransformer
from .backbone import build_backbone
from .criterion import SetCriterion, main_coefs
from .deformable_detr import PostProcess
from .matcher import build_matcher
from .position_encoding import build_position_encoding
from .registry import register_model


def add_anchor_args(parser: argparse.ArgumentParser) -> None:
    """Flags of the DN-DETR/DINO command lines that the deformable anchor models read or accept."""
    g = parser.add_argument_group("anchor-query models (dab_deformable_detr, dino)")
    g.add_argument("--transformer_activation", default="relu", choices=("relu", "prelu", "gelu"),
                   help="accepted for DN-DETR command lines; the deformable models use ReLU (as the originals)")
    g.add_argument("--num_patterns", default=0, type=int, help="DAB pattern embeddings (only 0 is supported)")
    g.add_argument("--random_refpoints_xy", action="store_true",
                   help="DAB 'fixxy': anchor centres initialised uniformly (they keep training, as in DAB)")
    g.add_argument("--num_select", default=None, type=int, help="DINO's name for --topk (detections per image)")


def check_anchor_args(args: Any, model: str) -> None:
    if args.num_patterns:
        raise ValueError(f"{model}: --num_patterns > 0 is not supported (DINO crashes on it too, spec P13)")
    if args.masks or args.frozen_weights:
        raise ValueError(f"{model}: segmentation (--masks/--frozen_weights) is not supported")
    if args.hidden_dim % 32 != 0:
        raise ValueError(f"--hidden_dim must be a multiple of 32 (GroupNorm(32)), got {args.hidden_dim}")


def build_anchor_transformer(args: Any, two_stage: bool, conditional_scale: bool, final_norm: bool,
                             look_forward_twice: bool) -> AnchorDeformableTransformer:
    """The anchor transformer from the flags, with what the enabled add-ons ask of it (ModelOptions):
    MS-DETR's decoder layer, DN-DETR's indicator bit and (two-stage) extra content rows for H-DETR's
    one-to-many queries."""
    options = model_options(args)
    return AnchorDeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        activation="relu", num_feature_levels=args.num_feature_levels, dec_n_points=args.dec_n_points,
        enc_n_points=args.enc_n_points, num_queries=args.num_queries, two_stage=two_stage,
        conditional_scale=conditional_scale, final_norm=final_norm, look_forward_twice=look_forward_twice,
        use_checkpoint=args.use_checkpoint, msda_impl=args.msda_impl,
        num_extra_queries=options.extra_queries if two_stage else 0, decoder_layer=options.decoder_layer,
        content_indicator=options.content_indicator)


def build_anchor_detr(args: Any, transformer: AnchorDeformableTransformer, share_heads: bool,
                      enc_class_agnostic: bool, num_backbone_levels: int = 3
                      ) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Backbone, detector, add-ons, criterion and post-processor around an anchor transformer."""
    options = model_options(args)
    position_embedding = build_position_encoding(args.hidden_dim, args.position_embedding)
    backbone = build_backbone(args.backbone, position_embedding, lr_backbone=args.lr_backbone,
                              num_feature_levels=args.num_feature_levels, dilation=args.dilation,
                              pretrained_path=args.pretrained_backbone_path, drop_path_rate=args.drop_path_rate,
                              from_scratch=args.backbone_from_scratch, num_backbone_levels=num_backbone_levels)
    model = AnchorDeformableDETR(backbone, transformer, num_classes=args.num_classes, num_queries=args.num_queries,
                                 num_feature_levels=args.num_feature_levels, aux_loss=args.aux_loss,
                                 share_heads=share_heads, random_refpoints_xy=args.random_refpoints_xy,
                                 num_extra_queries=options.extra_queries, content_indicator=options.content_indicator)
    addons = build_addons(args, model)
    criterion = SetCriterion(args.num_classes, build_matcher(args), main_coefs(args),
                             num_aux_layers=args.dec_layers - 1 if args.aux_loss else 0,
                             two_stage=transformer.two_stage, focal_alpha=args.focal_alpha, addons=addons,
                             enc_class_agnostic=enc_class_agnostic)
    topk = args.num_select if args.num_select is not None else args.topk
    return model, criterion, {"bbox": PostProcess(topk)}


@register_model("dab_deformable_detr")
def build_dab_deformable_detr(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """DAB-Deformable-DETR from the flags (always iterative anchor refinement; no two-stage)."""
    check_anchor_args(args, "dab_deformable_detr")
    if args.two_stage or args.mixed_selection:
        raise ValueError("dab_deformable_detr is one-stage (learned anchors); use -m dino for two-stage "
                         "with mixed query selection")
    transformer = build_anchor_transformer(args, two_stage=False, conditional_scale=True, final_norm=False,
                                           look_forward_twice=args.look_forward_twice)
    return build_anchor_detr(args, transformer, share_heads=False, enc_class_agnostic=True)


build_dab_deformable_detr.add_args = add_anchor_args
# DN-DETR's model name: the same model, denoising switched on by its own flag (-m dn_dab_deformable_detr --use_dn).
register_model("dn_dab_deformable_detr")(build_dab_deformable_detr)
