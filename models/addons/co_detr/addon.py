"""Co-DETR (ICCV 2023) as the ``co_detr`` add-on: auxiliary dense heads on the encoder memory and their positive
samples as extra decoder query groups (specs/co_detr_od_detr.md §1, §3.2, §4).

Written from the spec; Sense-X/Co-DETR was read to understand it, none of its code is reproduced.

Every training step (inside the host's forward, after the encoder, through the ``query_groups`` hook):
1. the memory becomes a pyramid (its levels plus one stride-2 level, pyramid.py);
2. the enabled auxiliary heads run on it, in the official order: the Faster R-CNN head (RPN + RoI, rcnn.py) as
   head 0, ATSS (atss.py) as head 1, each returning its loss terms and its assignment (common.AuxHeadOutput);
3. each head's positives become a query group (queries.py) named ``co_<head>``, decoded behind the one block
   mask (equivalent to the official separate decoder pass: the group sees neither the main queries nor the other
   groups, the main queries never see it) and supervised on every decoder layer with the head's fixed targets
   (``loss_*[_i]_co_<head>``, weight lambda_1 x the main coefficients, normalised by the all-reduced positives).
The heads' own terms (``loss_atss_*``, ``loss_rpn_*``, ``loss_rcnn_*``) are weighted lambda_2 x num_dec_layer x
their native weight (the official configs pre-multiply 2.0 x 6 = 12 into every weight; here both are explicit).
Evaluation runs none of it; every parameter lives under ``model.addons["co_detr"]``.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from util.errors import FlagError

from ...matcher import run_stages, to_host
from ...query_groups import EncoderOutput, QueryGroup
from ...registry import register_addon
from ..base import AddOn, LossGroup, LossSpec, StepContext
from .atss import ATSSHead
from .common import AuxHeadOutput
from .pyramid import MemoryPyramid, image_sizes, level_strides, pixel_targets
from .queries import PositiveQueries, select_positives

HEADS = ("rcnn", "atss")  # the official order: query group 0 is the R-CNN head, group 1 ATSS
NATIVE_COEFS = {  # the heads' loss weights before the lambda_2 x num_dec_layer factor (spec §1.5)
    "rcnn": {"loss_rpn_cls": 1.0, "loss_rpn_bbox": 1.0, "loss_rcnn_cls": 1.0, "loss_rcnn_giou": 10.0},
    "atss": {"loss_atss_cls": 1.0, "loss_atss_giou": 2.0, "loss_atss_centerness": 1.0},
}
LOSSES_META = "co_detr_head_losses"


def build_rcnn_head(num_classes: int, channels: int, strides: list[int], roi_levels: int,
                    fc_channels: int = 1024) -> nn.Module:
    """The RPN + RoI auxiliary head (rcnn.py); a clear error while it is not available."""
    try:
        from .rcnn import RCNNAuxHead
    except ImportError as e:
        raise FlagError(f"co_detr: the R-CNN auxiliary head is not available ({e}); use --co_heads atss") from e
    # finest_scale 112 on strides 8.. (Co-Deformable), 56 on strides 4.. (Co-DINO): 14 x the finest stride
    return RCNNAuxHead(in_channels=channels, num_classes=num_classes, strides=strides, num_roi_levels=roi_levels,
                       finest_scale=14.0 * strides[0], fc_channels=fc_channels)


class CoDETRModule(nn.Module):
    """Every parameter of the add-on: the pyramid's extra level, the auxiliary heads, the query projections."""

    def __init__(self, heads: tuple[str, ...], num_classes: int, channels: int, strides: list[int],
                 queries: PositiveQueries | None, fc_channels: int = 1024, atss_octave_base_scale: float = 8.0) -> None:
        super().__init__()
        self.pyramid = MemoryPyramid(channels)
        if "rcnn" in heads:  # RoIs pool from the memory levels only (the extra level excluded), spec §1.3 item 4
            self.rcnn = build_rcnn_head(num_classes, channels, strides, roi_levels=len(strides) - 1,
                                         fc_channels=fc_channels)
        if "atss" in heads:
            self.atss = ATSSHead(num_classes, channels, strides, octave_base_scale=atss_octave_base_scale)
        self.queries = queries


@register_addon("co_detr")
class CoDETR(AddOn):
    """Co-DETR's collaborative hybrid assignments (``--addons co_detr``; Co-Deformable-DETR, Co-DINO)."""

    name = "co_detr"
    order = 40
    requires = frozenset({"anchor_groups"})

    def __init__(self, module: CoDETRModule, heads: tuple[str, ...], num_classes: int, lambda_1: float,
                 lambda_2: float, num_dec_layer: int, max_pos_coords: int, with_pos_coord: bool) -> None:
        self.mod, self.heads, self.num_classes = module, heads, num_classes
        self.lambda_1, self.lambda_2, self.num_dec_layer = lambda_1, lambda_2, num_dec_layer
        self.max_pos_coords, self.with_pos_coord = max_pos_coords, with_pos_coord

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("Co-DETR add-on (--addons co_detr; names of the official config keys)")
        g.add_argument("--co_heads", nargs="*", default=list(HEADS), choices=list(HEADS),
                       help="auxiliary heads on the memory pyramid, in the official order (rcnn: RPN + RoI head, "
                            "query group 0; atss: group 1)")
        g.add_argument("--lambda_1", default=1.0, type=float,
                       help="weight of the customized positive queries' losses (x the main coefficients)")
        g.add_argument("--lambda_2", default=2.0, type=float,
                       help="weight of the auxiliary heads' losses, x --num_dec_layer x their native weights")
        g.add_argument("--num_dec_layer", default=None, type=int,
                       help="L in lambda_2 x L (official configs: 6); default --dec_layers")
        g.add_argument("--max_pos_coords", default=300, type=int,
                       help="most positive queries per head and image (groups: max(9, min(this, max positives)))")
        g.add_argument("--with_pos_coord", default=True, action=argparse.BooleanOptionalAction,
                       help="the heads' positives as decoder query groups (--no-with_pos_coord: heads only)")
        g.add_argument("--with_coord_feat", default=None, action=argparse.BooleanOptionalAction,
                       help="add the entries' content feature to the positive queries (default: on for "
                            "deformable_detr, off for dino, as the official configs)")
        g.add_argument("--fc_out_channels", default=1024, type=int,
                       help="width of the R-CNN RoI head's two shared FCs (roi_head.bbox_head.fc_out_channels)")
        g.add_argument("--atss_octave_base_scale", default=8.0, type=float,
                       help="side of the ATSS head's anchors in strides (official 8: on 800x1333 COCO images; "
                            "bbox_head.anchor_generator.octave_base_scale)")
        g.add_argument("--fix_head_pos_embed", action="store_true",
                       help="Co-Deformable: a C-d learned head embedding (official: one scalar per head, spec §4.1)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> CoDETR:
        heads = tuple(h for h in HEADS if h in args.co_heads)
        if not heads:
            raise FlagError("co_detr: --co_heads names no head (rcnn, atss)")
        if not args.atss_octave_base_scale > 0:
            raise FlagError(f"co_detr: --atss_octave_base_scale must be > 0, got {args.atss_octave_base_scale}")
        style = "dino" if args.model == "dino" else "deformable"
        coord_feat = (style == "deformable") if args.with_coord_feat is None else args.with_coord_feat
        strides = level_strides(model.backbone.strides, args.num_feature_levels)
        strides.append(strides[-1] * 2)
        queries = (PositiveQueries(args.hidden_dim, len(heads), style, coord_feat, args.fix_head_pos_embed)
                   if args.with_pos_coord else None)
        module = CoDETRModule(heads, args.num_classes, args.hidden_dim, strides, queries, args.fc_out_channels,
                              args.atss_octave_base_scale)
        return cls(module, heads, args.num_classes, args.lambda_1, args.lambda_2,
                   args.num_dec_layer or args.dec_layers, args.max_pos_coords, args.with_pos_coord)

    def module(self) -> nn.Module:
        return self.mod

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        specs = []
        if self.with_pos_coord:
            specs += [LossSpec(f"co_{h}", main.num_aux_layers, dict(main.coefs), self.lambda_1) for h in self.heads]
        coefs = {k: v for h in self.heads for k, v in NATIVE_COEFS[h].items()}
        return specs + [LossSpec("", 0, coefs, self.lambda_2 * self.num_dec_layer)]

    def run_heads(self, enc: EncoderOutput, ctx: StepContext) -> tuple[dict[str, AuxHeadOutput], list[Tensor],
                                                                       list[tuple[int, int]]]:
        """The pyramid and every enabled head's result (in the official order). The heads are staged and run in
        lock-step: one host copy serves both (the R-CNN head's anchor and RoI assignments, ATSS's positives)."""
        sizes = image_sizes(ctx.images, ctx.targets)
        targets = pixel_targets(ctx.targets, sizes)
        feats = self.mod.pyramid(enc.memory, enc.spatial_shapes, enc.shapes)
        outs = run_stages([getattr(self.mod, h).stages(feats, sizes, targets) for h in self.heads])
        return dict(zip(self.heads, outs)), feats, sizes

    def query_groups(self, enc: EncoderOutput, ctx: StepContext) -> list[QueryGroup]:
        """One group per head (``co_rcnn``, ``co_atss``) carrying the heads' losses in its meta; none without
        targets. With ``--no-with_pos_coord`` an empty group carries the losses."""
        if ctx.targets is None:
            return []
        outs, feats, sizes = self.run_heads(enc, ctx)
        losses = {k: v for out in outs.values() for k, v in out.losses.items()}
        if not self.with_pos_coord:
            empty = enc.memory[:, :0]
            return [QueryGroup("co_detr", empty, enc.memory.new_zeros(empty.shape[0], 0, 4),
                               meta={LOSSES_META: losses})]
        groups = []
        flat = None
        copied = [head for head in self.heads if outs[head].host_positive is None]  # heads that need the copy
        host = to_host([lab for head in copied for lab in outs[head].labels])  # their labels, one copy
        host_labels = {head: host[i * len(sizes):(i + 1) * len(sizes)] for i, head in enumerate(copied)}
        for k, head in enumerate(self.heads):
            out = outs[head]
            entry_feats = out.feats
            if entry_feats is None and self.mod.queries.with_coord_feat:  # ATSS: the pyramid at every anchor
                flat = flat if flat is not None else torch.cat([f.flatten(2) for f in feats], 2).transpose(1, 2)
                entry_feats = list(flat.unbind(0))
            sel = select_positives(out, sizes, self.num_classes, entry_feats, self.max_pos_coords,
                                   host_labels.get(head))
            tgt, query_pos = self.mod.queries(k, sel.boxes, sel.feats)
            indices = [(torch.arange(p, device=tgt.device), torch.arange(p, device=tgt.device)) for p in sel.num_pos]
            meta: dict[str, Any] = {"targets": sel.targets, "indices": indices, "num_pos": float(sum(sel.num_pos))}
            if k == 0:
                meta[LOSSES_META] = losses
            groups.append(QueryGroup(f"co_{head}", tgt, sel.boxes, query_pos, meta=meta))
        return groups

    def loss_groups(self, outputs: Mapping[str, Any], ctx: StepContext) -> list[LossGroup]:
        """Each head's group on every decoder layer with its fixed targets (label weight 1 for every entry)."""
        found = outputs.get("groups", {})
        groups = []
        for head in self.heads:
            name = f"co_{head}"
            if name in found and self.with_pos_coord:
                meta = outputs["group_meta"][name]
                groups.append(LossGroup(name, found[name], meta["targets"], indices=meta["indices"],
                                        num_boxes=meta["num_pos"]))
        return groups

    def extra_losses(self, outputs: Mapping[str, Any], ctx: StepContext) -> dict[str, Tensor]:
        """The auxiliary heads' terms (computed in the forward, carried by the first group's meta)."""
        for meta in outputs.get("group_meta", {}).values():
            if LOSSES_META in meta:
                return dict(meta[LOSSES_META])
        return {}
