"""DINO: DAB-Deformable anchors, two-stage mixed query selection, look forward twice (+ the CDN add-on).

4-scale by default (C3-C5 + one extra level); ``--num_feature_levels 5`` is DINO-5scale (C2-C5 + one).

specs/dn_dab_dino.md §4: the top-Q encoder proposals (by their best class logit) give the anchors
(detached), a learned table the content; one class head and one box head shared by the decoder
layers, separate copies for the encoder proposals (supervised with the real labels, suffix ``enc``);
a LayerNorm on the decoder outputs; box predictions look forward twice. Contrastive denoising is the
``dn`` add-on (``--use_dn --contrastive``), on in configs/dino_*.sh; the model trains without it too.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from util.errors import FlagError

from .criterion import SetCriterion
from .dab_deformable_detr import (
    add_anchor_args,
    build_anchor_detr,
    build_anchor_transformer,
    check_anchor_args,
    plan_anchor_addons,
)
from .deformable_detr import backbone_levels
from .registry import register_model


def build_dino(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """DINO from the flags: two-stage mixed query selection (always), look forward twice (DINO's default)."""
    check_anchor_args(args, "dino")
    off = [f"--no-{f}" for f in ("two_stage", "with_box_refine", "mixed_selection") if not getattr(args, f)]
    if off:
        raise FlagError(f"dino always selects its queries from encoder proposals with learned content and refines "
                        f"its boxes; {' '.join(off)} is not supported (use -m dab_deformable_detr for one-stage)")
    # --no-look_forward_twice is DINO's use_detached_boxes_dec_out.
    classes, request, reserved = plan_anchor_addons(args)
    transformer = build_anchor_transformer(args, request, two_stage=True, conditional_scale=False, final_norm=True,
                                           look_forward_twice=args.look_forward_twice,
                                           reserved_content_channels=reserved)
    # 5-scale: C2-C5 plus one extra level (DINO_5scale's return_interm_indices [0, 1, 2, 3]).
    num_backbone_levels = 4 if args.num_feature_levels >= 5 else backbone_levels(args.num_feature_levels)
    share_class = True if args.dec_pred_class_embed_share is None else args.dec_pred_class_embed_share
    share_box = True if args.dec_pred_bbox_embed_share is None else args.dec_pred_bbox_embed_share
    # DINO's image position encoding: SineHW, temperature 20 on both axes, no -0.5 offset (spec §0.4);
    # its model always owns the label table of denoising (label_enc [K + 1, C]).
    return build_anchor_detr(args, transformer, request, classes, share_class_head=share_class,
                             share_box_head=share_box, box_bias_quirk=False, enc_class_agnostic=False,
                             num_backbone_levels=num_backbone_levels, pe_temperature=20.0, pe_offset=0.0,
                             reserved_content_channels=reserved, label_table=True)


build_dino.add_args = add_anchor_args  # the same flag group (added once)


# IDEA-Research/DINO config/DINO/DINO_4scale.py (line numbers @faa8520), where it differs from Deformable-DETR's
# main.py. DINO's optimiser (param_dict_type 'default', L6) has no 0.1x linear-projection group; the two-stage
# flags are what DINO always does (two_stage_type 'standard' L63, embed_init_tgt L102: mixed query selection,
# look forward twice). The shipped scripts override dn_box_noise_scale to 1.0 (configs/r50_dino_4scale.sh).
DINO_DEFAULTS = {
    "lr": 1e-4, "lr_backbone": 1e-5, "lr_linear_proj_mult": 1.0,  # L5-7
    "epochs": 12, "lr_drop": 11,  # L14-15
    "pe_temperatureH": 20.0, "pe_temperatureW": 20.0,  # L30-31
    "dim_feedforward": 2048, "dropout": 0.0, "num_queries": 900,  # L38, L40, L42
    "two_stage": True, "with_box_refine": True, "mixed_selection": True, "look_forward_twice": True,
    "topk": 300,  # num_select L71 (--num_select, when given, still overrides --topk)
    "cls_loss_coef": 1.0,  # L79
    "dec_pred_bbox_embed_share": True, "dec_pred_class_embed_share": True,  # L94-95
    "use_dn": True, "contrastive": True, "dn_number": 100, "dn_box_noise_scale": 0.4,  # L98-100
    "dn_label_noise_ratio": 0.5,  # L101
}
register_model("dino", defaults=DINO_DEFAULTS, source="IDEA-Research/DINO config/DINO/DINO_4scale.py")(build_dino)
