"""MS-DETR's mixed supervision: one-to-many supervision of the primary queries through an auxiliary FFN.

specs/deformable_family.md §4 ([MS] Atten4Vis/MS-DETR; the assigner follows its ``Stage2Assigner``,
itself adapted from DETA). No extra queries: the add-on asks the builder for MS-DETR's decoder layer
(models/ms_detr_layer.py: cross-attention first, auxiliary FFN with the official names), and supervises
the model's ``o2m_outputs`` on every decoder layer with the one-to-many assigner below (suffix ``_o2m``).
On Deformable-DETR two-stage hosts the encoder proposals are matched on their fixed anchors, as the
official code always does (``AnchorMatcher``).
"""
from __future__ import annotations

import argparse
from dataclasses import replace
from functools import partial
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, box_iou
from util.misc import get_rank

from ..matcher import HungarianMatcher
from ..ms_detr_layer import MSDETRDecoderLayer
from ..registry import register_addon
from .base import AddOn, Indices, LossGroup, LossSpec, ModelOptions

SUFFIX = "o2m"


class AnchorMatcher:
    """MS-DETR's encoder-proposal assignment: Hungarian on the tokens' fixed anchors, not on the predictions.

    specs/deformable_family.md §4.3: cost_class 0, cost_bbox 5, cost_giou 2 between the anchors (cell
    centre, size 0.05 * 2^level) and the ground truth; the losses are then computed on the predicted
    proposals. Invalid (padded or border) tokens are matched only when there are fewer valid ones than
    ground-truth boxes (the official code may match them: their anchor is the box (1, 1, 1, 1)).
    """

    def __init__(self, cost_bbox: float = 5.0, cost_giou: float = 2.0) -> None:
        self.hungarian = HungarianMatcher(cost_class=0.0, cost_bbox=cost_bbox, cost_giou=cost_giou)

    def __call__(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        return self.hungarian({"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["anchors"],
                               "valid": outputs["anchor_valid"]}, targets)


class OneToManyAssigner:
    """Assign up to k queries per ground-truth box by a quality score (no gradient).

    Per image, with quality S(g, q) = iou_weight * IoU(box_q, box_g) + cls_weight * sigmoid(logit_q)[c_g]:
    1. every query is positive when its best S over the GTs is >= threshold; each GT's best query is
       positive too (low-quality matches);
    2. at most floor(positive_fraction * Q) positives are kept, drawn at random with this assigner's own
       seeded generator (deterministic, and saved in checkpoints by the add-on);
    3. c_g = kept positives whose best GT is g, raised to at least 1 so every GT keeps its best query
       (the official code can leave a GT without a query when its best query prefers another GT or the
       random cap drops it);
    4. GT g gets its min(c_g, k) best queries by S over all Q queries;
    5. pairs are sorted by S ascending: when a query is paired with several GTs, the best pair comes
       last and sets its class target (SetCriterion writes the last pair of a duplicated query).

    Args:
        threshold: quality threshold of step 1 (``--o2m_matcher_threshold``).
        k: queries per GT at most (``--o2m_matcher_k``).
        iou_weight, cls_weight: quality mix (official: 0.7, 0.3; not exposed as flags there either).
        positive_fraction: cap of step 2 as a fraction of Q (official: 0.25).
        seed: seed of the subsampling generator.
    """

    def __init__(self, threshold: float = 0.4, k: int = 6, iou_weight: float = 0.7, cls_weight: float = 0.3,
                 positive_fraction: float = 0.25, seed: int = 0) -> None:
        self.threshold, self.k = threshold, k
        self.iou_weight, self.cls_weight, self.positive_fraction = iou_weight, cls_weight, positive_fraction
        self.generator = torch.Generator().manual_seed(seed)

    def quality(self, logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """S [G, Q] for one image: logits [Q, K], boxes [Q, 4] and gt_boxes [G, 4] cxcywh, labels [G]."""
        iou = box_iou(box_cxcywh_to_xyxy(gt_boxes), box_cxcywh_to_xyxy(boxes))[0]
        return self.iou_weight * iou + self.cls_weight * logits.sigmoid()[:, labels].T

    def assign(self, quality: Tensor) -> tuple[Tensor, Tensor]:
        """(query indices, GT indices) from a quality matrix [G, Q], sorted by quality ascending."""
        num_gt, num_queries = quality.shape
        best_val, best_gt = quality.max(0)
        positive = best_val >= self.threshold
        positive[quality.argmax(1)] = True
        pos_idx = positive.nonzero().squeeze(1)
        cap = int(self.positive_fraction * num_queries)
        if pos_idx.numel() > cap:
            keep = torch.randperm(pos_idx.numel(), generator=self.generator)[:cap].to(pos_idx.device)
            pos_idx = pos_idx[keep]
        counts = torch.bincount(best_gt[pos_idx], minlength=num_gt).clamp(min=1)
        k = min(self.k, num_queries)
        top_queries = quality.topk(k, dim=1).indices  # [G, k], best first
        keep = torch.arange(k, device=quality.device)[None] < counts[:, None]
        query_idx = top_queries[keep]
        gt_idx = torch.arange(num_gt, device=quality.device)[:, None].expand(-1, k)[keep]
        order = quality[gt_idx, query_idx].argsort(stable=True)
        return query_idx[order], gt_idx[order]

    @torch.no_grad()
    def __call__(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        """Per image (query indices, target indices), int64; a query may appear for several targets."""
        logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        indices = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                empty = torch.empty(0, dtype=torch.int64, device=logits.device)
                indices.append((empty, empty))
                continue
            indices.append(self.assign(self.quality(logits[b], boxes[b], t["labels"], t["boxes"].float())))
        return indices


@register_addon("ms_detr")
class MixedSupervision(AddOn):
    """MS-DETR: one-to-many losses (suffix ``_o2m``) on the auxiliary-FFN outputs of every decoder layer.

    The loss is normalised by the ground-truth count (as the official code), not by the number of pairs.

    Args:
        assigner: the one-to-many assigner.
        coefs: {loss_ce, loss_bbox, loss_giou} coefficients of the o2m losses.
    """

    name = "ms_detr"
    order = 30

    def __init__(self, assigner: OneToManyAssigner, coefs: Mapping[str, float]) -> None:
        self.assigner, self.coefs = assigner, dict(coefs)
        self.anchor_matcher = AnchorMatcher()

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("MS-DETR mixed supervision")
        g.add_argument("--use_ms_detr", action="store_true", help="MS-DETR decoder order + one-to-many losses")
        g.add_argument("--use_aux_ffn", action="store_true",
                       help="auxiliary FFN for the one-to-many features (off by default as in the official "
                            "parser; every MS-DETR script and released checkpoint uses it)")
        g.add_argument("--o2m_matcher_threshold", default=0.4, type=float, help="assigner quality threshold")
        g.add_argument("--o2m_matcher_k", default=6, type=int, help="assigner: queries per ground truth at most")
        g.add_argument("--o2m_cls_loss_coef", default=2.0, type=float)
        g.add_argument("--o2m_bbox_loss_coef", default=5.0, type=float)
        g.add_argument("--o2m_giou_loss_coef", default=2.0, type=float)

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.use_ms_detr

    @classmethod
    def model_options(cls, args: argparse.Namespace, options: ModelOptions) -> ModelOptions:
        if options.decoder_layer is not None:
            raise ValueError("MS-DETR needs its own decoder layer, but another add-on already chose one")
        return replace(options, decoder_layer=partial(MSDETRDecoderLayer, use_aux_ffn=args.use_aux_ffn))

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> MixedSupervision:
        if not any(isinstance(m, MSDETRDecoderLayer) for m in model.modules()):
            raise ValueError(f"model {args.model!r} was built without MS-DETR's decoder layer "
                             f"(its builder ignores ModelOptions.decoder_layer); use -m deformable_detr, "
                             f"dab_deformable_detr or dino")
        assigner = OneToManyAssigner(args.o2m_matcher_threshold, args.o2m_matcher_k, seed=args.seed + get_rank())
        return cls(assigner, {"loss_ce": args.o2m_cls_loss_coef, "loss_bbox": args.o2m_bbox_loss_coef,
                              "loss_giou": args.o2m_giou_loss_coef})

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        return [LossSpec(SUFFIX, main.num_aux_layers, self.coefs)]

    def loss_groups(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> list[LossGroup]:
        if "o2m_outputs" not in outputs:
            raise KeyError("MS-DETR needs a model whose decoder makes one-to-many features (o2m_outputs); "
                           "this model was built without MS-DETR's decoder layer")
        return [LossGroup(SUFFIX, outputs["o2m_outputs"], targets, matcher=self.assigner)]

    def encoder_matcher(self, enc_outputs: Mapping[str, Any]) -> AnchorMatcher | None:
        """Deformable-DETR hosts (proposals on every token): match on the anchors, as MS-DETR always does.
        DINO's encoder loss (top-Q proposals, real labels) keeps its own matching."""
        return self.anchor_matcher if "anchors" in enc_outputs else None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.assigner.generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "generator" in state:
            self.assigner.generator.set_state(state["generator"])
