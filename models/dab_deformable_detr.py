"""DAB-Deformable-DETR (and DN-DETR's ``dn_dab_deformable_detr``): learned 4-d anchor queries.

specs/dn_dab_dino.md §1.5: deformable encoder, decoder whose positional queries come from the sine
embedding of each query's anchor box (conditionally scaled after layer 0), anchors refined layer by
layer (detached, "look forward once"), one class/box head per layer. Denoising is the ``dn`` add-on
(``--use_dn``; models/addons/dn.py), so the model trains with or without it.
"""
from __future__ import annotations

import argparse
from typing import Any

from torch import nn

from util.errors import FlagError

from .addons import HostRequest, build_addons, plan_addons
from .anchor_detr import AnchorDeformableDETR
from .anchor_transformer import AnchorDeformableTransformer
from .backbone import build_backbone
from .criterion import SetCriterion, main_coefs, set_giou_eps
from .deformable_detr import PostProcess, backbone_levels
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
    g.add_argument("--pe_temperatureH", default=None, type=float,
                   help="image position encoding temperature along y (DAB/DN/DINO: 20, no -0.5 offset); "
                        "default: the model's own (dino 20, the deformable models 10000 with the offset)")
    g.add_argument("--pe_temperatureW", default=None, type=float, help="same along x")
    g.add_argument("--dec_pred_class_embed_share", default=None, action=argparse.BooleanOptionalAction,
                   help="dino: one class head shared by every decoder layer (DINO's default: on)")
    g.add_argument("--dec_pred_bbox_embed_share", default=None, action=argparse.BooleanOptionalAction,
                   help="dino: one box head shared by every decoder layer (DINO's default: on)")


def check_anchor_args(args: Any, model: str) -> None:
    if args.num_patterns:
        raise FlagError(f"{model}: --num_patterns > 0 is not supported (DINO crashes on it too, spec P13)")
    if args.masks or args.frozen_weights:
        raise FlagError(f"{model}: segmentation (--masks/--frozen_weights) is not supported")
    if args.hidden_dim % 32 != 0:
        raise FlagError(f"--hidden_dim must be a multiple of 32 (GroupNorm(32)), got {args.hidden_dim}")


def build_anchor_transformer(args: Any, request: HostRequest, two_stage: bool, conditional_scale: bool,
                             final_norm: bool, look_forward_twice: bool,
                             reserved_content_channels: int = 0) -> AnchorDeformableTransformer:
    """The anchor transformer from the flags and what the add-ons request (MS-DETR's decoder layer, reserved
    content channels: DN-DETR's indicator bit, also DN-DETR's own model's; two-stage: extra content rows
    for H-DETR's one-to-many queries)."""
    return AnchorDeformableTransformer(
        d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
        num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward, dropout=args.dropout,
        activation="relu", num_feature_levels=args.num_feature_levels, dec_n_points=args.dec_n_points,
        enc_n_points=args.enc_n_points, num_queries=args.num_queries, two_stage=two_stage,
        conditional_scale=conditional_scale, final_norm=final_norm, look_forward_twice=look_forward_twice,
        use_checkpoint=args.use_checkpoint, msda_impl=args.msda_impl,
        num_extra_queries=request.extra_queries if two_stage else 0, decoder_layer=request.decoder_layer,
        reserved_content_channels=reserved_content_channels, mask_invalid_proposals=args.mask_invalid_proposals)


def build_anchor_detr(args: Any, transformer: AnchorDeformableTransformer, request: HostRequest,
                      addon_classes: list, *, share_class_head: bool = False, share_box_head: bool = False,
                      box_bias_quirk: bool = True, enc_class_agnostic: bool = True, num_backbone_levels: int = 3,
                      pe_temperature: float = 10000.0, pe_offset: float = -0.5, reserved_content_channels: int = 0,
                      label_table: bool = False) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """Backbone, detector, add-ons, criterion and post-processor around an anchor transformer.

    ``pe_temperature``/``pe_offset``: the model's image position encoding (``--pe_temperatureH/W`` override
    the temperature); ``label_table``: the model owns the official ``label_enc`` (K + 1 rows).
    """
    temp_h = pe_temperature if args.pe_temperatureH is None else args.pe_temperatureH
    temp_w = pe_temperature if args.pe_temperatureW is None else args.pe_temperatureW
    position_embedding = build_position_encoding(args.hidden_dim, args.position_embedding, temp_h, temp_w, pe_offset)
    backbone = build_backbone(args.backbone, position_embedding, lr_backbone=args.lr_backbone,
                              num_feature_levels=args.num_feature_levels, dilation=args.dilation,
                              pretrained_path=args.pretrained_backbone_path, drop_path_rate=args.drop_path_rate,
                              from_scratch=args.backbone_from_scratch, num_backbone_levels=num_backbone_levels,
                              amp_backbone_half=args.amp_backbone_half, channels_last=args.channels_last)
    model = AnchorDeformableDETR(backbone, transformer, num_classes=args.num_classes, num_queries=args.num_queries,
                                 num_feature_levels=args.num_feature_levels, aux_loss=args.aux_loss,
                                 share_class_head=share_class_head, share_box_head=share_box_head,
                                 box_bias_quirk=box_bias_quirk, random_refpoints_xy=args.random_refpoints_xy,
                                 num_extra_queries=request.extra_queries,
                                 reserved_content_channels=reserved_content_channels,
                                 label_table=args.num_classes + 1 if label_table else 0)
    addons = build_addons(args, model, addon_classes)
    criterion = SetCriterion(args.num_classes, build_matcher(args), main_coefs(args),
                             num_aux_layers=args.dec_layers - 1 if args.aux_loss else 0,
                             two_stage=transformer.two_stage, focal_alpha=args.focal_alpha, addons=addons,
                             enc_class_agnostic=enc_class_agnostic)
    set_giou_eps(criterion, 1e-6)  # DAB-DETR's, DN-DETR's and DINO's util/box_ops.generalized_box_iou
    topk = args.num_select if args.num_select is not None else args.topk
    return model, criterion, {"bbox": PostProcess(topk)}


def plan_anchor_addons(args: Any, forced_reserved: int = 0) -> tuple[list, HostRequest, int]:
    """The add-ons of an anchor host, their request, and the content channels to reserve (at least
    ``forced_reserved``: DN-DETR's model always has its indicator bit)."""
    classes, request = plan_addons(args, AnchorDeformableDETR.host_capabilities())
    return classes, request, max(request.reserved_content_channels, forced_reserved)


def _build_dab(args: Any, name: str, dn_detr: bool) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    check_anchor_args(args, name)
    if args.two_stage or args.mixed_selection:
        raise FlagError(f"{name} is one-stage (learned anchors); use -m dino for two-stage "
                        f"with mixed query selection")
    classes, request, reserved = plan_anchor_addons(args, forced_reserved=int(dn_detr))
    transformer = build_anchor_transformer(args, request, two_stage=False, conditional_scale=True, final_norm=False,
                                           look_forward_twice=args.look_forward_twice)
    return build_anchor_detr(args, transformer, request, classes, enc_class_agnostic=True,
                             reserved_content_channels=reserved, label_table=dn_detr,
                             num_backbone_levels=backbone_levels(args.num_feature_levels))


def build_dab_deformable_detr(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """DAB-Deformable-DETR (IDEA-Research/DAB-DETR) from the flags: always iterative anchor refinement, one-stage.

    With ``--use_dn`` the denoising add-on owns its label table (``addons.dn.label_enc``) and the content
    queries get DN-DETR's indicator bit.
    """
    return _build_dab(args, "dab_deformable_detr", dn_detr=False)


def build_dn_dab_deformable_detr(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """DN-DETR's DN-DAB-Deformable-DETR (IDEA-Research/DN-DETR): DAB-Deformable-DETR whose model always owns
    DN-DETR's label table ``label_enc`` [K+1, C-1] and 255-wide content queries with the indicator bit (its
    official state dict), trained with denoising by ``--use_dn`` (and, unlike the official code, without it).
    """
    return _build_dab(args, "dn_dab_deformable_detr", dn_detr=True)


build_dab_deformable_detr.add_args = add_anchor_args
build_dn_dab_deformable_detr.add_args = add_anchor_args


# Defaults of the official repositories where they differ from Deformable-DETR's main.py. Both optimisers have only
# a backbone / rest split (no 0.1x linear-projection group). Their argparse num_select 300 and pe_temperatureH/W 20
# do not reach these deformable models (their PostProcess keeps the top 100, their position encoding is
# Deformable-DETR's), nor does transformer_activation prelu (the deformable builders hard-code ReLU).
# IDEA-Research/DAB-DETR main.py @723ddb8 (L34-42, L75-79, L121, L237); its README trains 50 / 40 epochs.
DAB_DEFAULTS = {"lr": 1e-4, "lr_backbone": 1e-5, "lr_linear_proj_mult": 1.0, "epochs": 300, "lr_drop": 200,
                "dim_feedforward": 2048, "dropout": 0.0, "cls_loss_coef": 1.0}
# IDEA-Research/DN-DETR main.py @ff3902a (L37-41 DN flags, L51-59, L95-99, L143, L263); its README passes --use_dn.
DN_DAB_DEFAULTS = {**DAB_DEFAULTS, "epochs": 50, "lr_drop": 40,
                   "scalar": 5, "label_noise_scale": 0.2, "box_noise_scale": 0.4}
register_model("dab_deformable_detr", defaults=DAB_DEFAULTS,
               source="IDEA-Research/DAB-DETR main.py")(build_dab_deformable_detr)
register_model("dn_dab_deformable_detr", defaults=DN_DAB_DEFAULTS,
               source="IDEA-Research/DN-DETR main.py")(build_dn_dab_deformable_detr)
