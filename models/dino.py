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

from .criterion import SetCriterion
from .dab_deformable_detr import add_anchor_args, build_anchor_detr, build_anchor_transformer, check_anchor_args
from .registry import register_model


@register_model("dino")
def build_dino(args: Any) -> tuple[nn.Module, SetCriterion, dict[str, nn.Module]]:
    """DINO from the flags; two-stage, mixed selection and look-forward-twice are always on."""
    check_anchor_args(args, "dino")
    transformer = build_anchor_transformer(args, two_stage=True, conditional_scale=False, final_norm=True,
                                           look_forward_twice=True)
    # 5-scale: C2-C5 plus one extra level (DINO_5scale's return_interm_indices [0, 1, 2, 3]).
    num_backbone_levels = 4 if args.num_feature_levels >= 5 else 3
    return build_anchor_detr(args, transformer, share_heads=True, enc_class_agnostic=False,
                             num_backbone_levels=num_backbone_levels)


build_dino.add_args = add_anchor_args  # the same flag group (added once)
