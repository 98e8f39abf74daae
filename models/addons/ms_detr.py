"""MS-DETR's mixed supervision: one-to-many supervision of the primary queries through an auxiliary FFN.

specs/deformable_family.md §4 ([MS] Atten4Vis/MS-DETR; the assigner follows its ``Stage2Assigner``,
itself adapted from DETA). No extra queries: the add-on asks the builder for MS-DETR's decoder layer
(``MSDETRDecoderLayer`` below: cross-attention first, auxiliary FFN with the official names), and supervises
the model's ``o2m_outputs`` on every decoder layer with the one-to-many assigner below (suffix ``_o2m``).
On Deformable-DETR two-stage hosts the encoder proposals are matched on their fixed anchors, as the
official code always does (``AnchorMatcher``). Official by default, including the assigner's random
subsampling on torch's global generator (same draws, same order); the deliberate fixes are opt-in flags
(``--o2m_keep_best_query``, ``--enc_match_valid_anchors_only``).
"""
from __future__ import annotations

import argparse
from functools import partial
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, box_iou

from ..deformable_transformer import DeformableTransformerDecoderLayer, _with_pos
from ..matcher import HungarianMatcher, Stages, run_stages
from ..registry import register_addon
from .base import AddOn, HostRequest, Indices, LossGroup, LossSpec, StepContext

SUFFIX = "o2m"


class MSDETRDecoderLayer(DeformableTransformerDecoderLayer):
    """Post-norm decoder layer in MS-DETR's order: cross-attention -> self-attention -> FFN.

    Args:
        d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points, msda_impl: as the standard layer.
        use_aux_ffn: the one-to-many features go through their own FFN block (linear3/linear4/norm4, width
            d_ffn); otherwise they are the cross-attention output itself.
    """

    def __init__(self, d_model: int = 256, d_ffn: int = 1024, dropout: float = 0.1, activation: str = "relu",
                 n_levels: int = 4, n_heads: int = 8, n_points: int = 4, msda_impl: str = "auto",
                 use_aux_ffn: bool = True) -> None:
        super().__init__(d_model, d_ffn, dropout, activation, n_levels, n_heads, n_points, msda_impl)
        self.use_aux_ffn = use_aux_ffn
        if use_aux_ffn:
            self.linear3 = nn.Linear(d_model, d_ffn)
            self.dropout5 = nn.Dropout(dropout)
            self.linear4 = nn.Linear(d_ffn, d_model)
            self.dropout6 = nn.Dropout(dropout)
            self.norm4 = nn.LayerNorm(d_model)

    def forward(self, tgt: Tensor, query_pos: Tensor, reference_points: Tensor, src: Tensor,
                src_spatial_shapes: Tensor, level_start_index: Tensor, src_padding_mask: Tensor | None = None,
                self_attn_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """Shapes as the standard layer.

        Returns:
            (output [B, T, C] fed to the next layer and supervised one-to-one,
             one-to-many features [B, T, C] only predicted from; None in evaluation mode).
        """
        tgt2 = self.cross_attn(_with_pos(tgt, query_pos), reference_points, src, src_spatial_shapes,
                               level_start_index, src_padding_mask)
        tgt = self.norm1(tgt + self.dropout1(tgt2))
        o2m = tgt if self.training else None
        if self.use_aux_ffn and self.training:
            o2m = self.norm4(tgt + self.dropout6(self.linear4(self.dropout5(self.activation(self.linear3(tgt))))))
        q = k = _with_pos(tgt, query_pos)
        tgt2 = self.self_attn(q, k, tgt, attn_mask=self_attn_mask, need_weights=self.official_dropout_path)[0]
        tgt = self.norm2(tgt + self.dropout2(tgt2))
        tgt2 = self.linear2(self.dropout3(self.activation(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout4(tgt2)), o2m


class AnchorMatcher:
    """MS-DETR's encoder-proposal assignment: Hungarian on the tokens' fixed anchors, not on the predictions.

    specs/deformable_family.md §4.3: cost_class 0, cost_bbox and cost_giou as the main matcher
    (``--set_cost_bbox`` 5, ``--set_cost_giou`` 2) between the anchors (cell centre, size 0.05 * 2^level) and
    the ground truth; the losses are then computed on the predicted proposals. As in the official code,
    every token may be matched, invalid (padded or border) ones included: their anchor is the box
    (1, 1, 1, 1). With ``valid_only`` the invalid tokens are matched only when there are fewer valid ones
    than ground-truth boxes (``--enc_match_valid_anchors_only``).
    """

    def __init__(self, cost_bbox: float = 5.0, cost_giou: float = 2.0, valid_only: bool = False) -> None:
        self.hungarian = HungarianMatcher(cost_class=0.0, cost_bbox=cost_bbox, cost_giou=cost_giou)
        self.valid_only = valid_only

    def __call__(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        return run_stages([self.stages(outputs, targets)])[0]

    def stages(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Stages:
        """Staged matching (models/matcher.py): the Hungarian matcher's, on the anchors."""
        anchor_outputs = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["anchors"]}
        if self.valid_only:
            anchor_outputs["valid"] = outputs["anchor_valid"]
        return self.hungarian.stages(anchor_outputs, targets)


class OneToManyAssigner:
    """Assign up to k queries per ground-truth box by a quality score (no gradient), as the official assigner.

    Per image, with quality S(g, q) = iou_weight * IoU(box_q, box_g) + cls_weight * sigmoid(logit_q)[c_g]:
    1. every query whose best S over the GTs is >= threshold is positive, and so is each GT's top-1 query
       (low-quality matches); a positive query keeps its own best GT g*(q) either way;
    2. detectron2-style subsampling with Q samples: two permutations are drawn on torch's GLOBAL generator,
       on the device of the predictions, first ``randperm(#positives)`` then ``randperm(#negatives)`` (the
       second one is never used, but the official code draws it, so the generator advances the same way);
       the first floor(positive_fraction * Q) positives of the permutation are kept;
    3. c_g = kept positives whose g* is g; a GT with c_g = 0 gets no query (its best query may prefer another
       GT, or the cap may drop it) unless ``keep_best_query`` raises c_g to 1;
    4. each GT with c_g > 0 gets its min(c_g, k) best queries by S over all Q queries;
    5. the pairs, GT by GT (ascending) and best first within a GT, are reordered by ``argsort`` of S
       (ascending, torch's default sort, as the official code): when a query is paired with several GTs the
       best pair comes last and sets its class target (SetCriterion writes the last pair of a query).
    Images without ground truth draw the two permutations too (of 0 and Q elements) and get no pair.

    Args:
        threshold: quality threshold of step 1 (``--o2m_matcher_threshold``).
        k: queries per GT at most (``--o2m_matcher_k``; capped at Q, where the official code fails).
        iou_weight, cls_weight: quality mix (official: 0.7, 0.3; not exposed as flags there either).
        positive_fraction: cap of step 2 as a fraction of Q (official: 0.25).
        keep_best_query: every GT keeps at least its best query (``--o2m_keep_best_query``; off officially).
    """

    def __init__(self, threshold: float = 0.4, k: int = 6, iou_weight: float = 0.7, cls_weight: float = 0.3,
                 positive_fraction: float = 0.25, keep_best_query: bool = False) -> None:
        self.threshold, self.k = threshold, k
        self.iou_weight, self.cls_weight, self.positive_fraction = iou_weight, cls_weight, positive_fraction
        self.keep_best_query = keep_best_query

    def quality(self, logits: Tensor, boxes: Tensor, labels: Tensor, gt_boxes: Tensor) -> Tensor:
        """S [G, Q] for one image: logits [Q, K], boxes [Q, 4] and gt_boxes [G, 4] cxcywh, labels [G].

        Computed [Q, G] and transposed (a view), like the official matrix, so that reductions over it
        break ties identically.
        """
        iou = box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(gt_boxes))[0]
        return (self.iou_weight * iou + self.cls_weight * logits.sigmoid()[:, labels]).T

    def qualities(self, logits: Tensor, boxes: Tensor, targets: Sequence[Mapping[str, Tensor]]) -> list[Tensor | None]:
        """``quality`` of every image ([G_b, Q], None without GT) from one computation for the batch ([B, Q, sum
        G_b]: host work that does not grow with the images). Each entry is bitwise ``quality``'s: the IoU and
        the mix are exact elementwise operations; the sigmoid is taken image by image on the CPU, whose
        vectorised transcendental functions round differently at a tensor's tail (a GPU computes every element
        alike). Each image's matrix is laid out as ``quality``'s ([Q, G_b] contiguous, transposed), so that
        reductions over it break ties identically."""
        sizes = [len(t["labels"]) for t in targets]
        if sum(sizes) == 0:
            return [None] * len(targets)
        labels = torch.cat([t["labels"] for t in targets])
        gt = box_cxcywh_to_xyxy(torch.cat([t["boxes"] for t in targets]).float())
        iou = box_iou(box_cxcywh_to_xyxy(boxes), gt)[0]  # [B, Q, sum G]
        prob = logits.sigmoid() if logits.device.type != "cpu" else torch.stack([x.sigmoid() for x in logits])
        mixed = self.iou_weight * iou + self.cls_weight * prob[..., labels]
        out, start = [], 0
        for b, g in enumerate(sizes):
            out.append(mixed[b, :, start:start + g].contiguous().T if g else None)
            start += g
        return out

    def device_part(self, quality: Tensor) -> list[Tensor]:
        """What the host needs of one image's quality [G, Q] (G > 0), computed on the device without a sync:
        positive [Q] bool (step 1), the best GT per query [Q], and every GT's k best queries and scores [G, k]
        (``topk`` row by row over all GTs; the host keeps the rows with c_g > 0)."""
        best_val, best_gt = quality.max(0)
        positive = best_val >= self.threshold
        positive[quality.topk(1, dim=1).indices.flatten()] = True
        scores, queries = quality.topk(min(self.k, quality.shape[1]), dim=1)  # [G, k], best first
        return [positive, best_gt, scores, queries]

    def draw(self, positive: Tensor | None, num_queries: int, device: torch.device) -> Tensor:
        """Step 2's draws for one image (host ``positive`` [Q] bool; None: an image without GT): the two
        permutations on the global generator of ``device``. Returns the kept entries of the first [P']."""
        num_pos = 0 if positive is None else int(positive.numpy().sum())
        cap = min(num_pos, int(num_queries * self.positive_fraction))
        keep = torch.randperm(num_pos, device=device)[:cap]
        torch.randperm(num_queries - num_pos, device=device)  # the official negatives' draw: only advances the RNG
        return keep

    def finish(self, host: Sequence[Tensor], keep: Tensor) -> tuple[Tensor, Tensor]:
        """Steps 2-5 on the host (numpy: no device work) from ``device_part``'s host copies and the drawn ``keep``."""
        positive, best_gt, scores, queries = (t.numpy() for t in host)
        kept = np.flatnonzero(positive)[keep.numpy()]
        counts = np.bincount(best_gt[kept], minlength=scores.shape[0])
        if self.keep_best_query:
            counts = np.maximum(counts, 1)
        gt_ids = np.flatnonzero(counts)
        mask = np.arange(scores.shape[1])[None] < counts[gt_ids, None]
        gt_idx = np.broadcast_to(gt_ids[:, None], mask.shape)[mask]
        scores, queries = torch.from_numpy(scores[gt_ids][mask]), torch.from_numpy(queries[gt_ids][mask])
        order = scores.argsort()  # torch's sort, as the official code (the host's: ties may differ from a GPU's)
        return queries[order], torch.from_numpy(gt_idx)[order]

    def stages(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Stages:
        """Staged assignment (models/matcher.py): device parts of every image, one copy; the draws, in the
        official order (image by image, positives then negatives), one copy of the kept draws; the pairs."""
        with torch.no_grad():
            logits, boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
            parts = [self.device_part(q) if q is not None else [] for q in self.qualities(logits, boxes, targets)]
        host = yield [x for part in parts for x in part]
        per_image, start = [], 0
        for part in parts:
            per_image.append(host[start:start + len(part)])
            start += len(part)
        keeps = [self.draw(h[0] if h else None, logits.shape[1], logits.device) for h in per_image]
        keeps = yield keeps
        empty = torch.empty(0, dtype=torch.int64)
        return [self.finish(h, keep) if h else (empty, empty) for h, keep in zip(per_image, keeps)]

    def assign(self, quality: Tensor) -> tuple[Tensor, Tensor]:
        """(query indices, GT indices) from one image's quality matrix [G, Q], in the official order (see the
        class); host int64 tensors."""
        def one() -> Stages:
            host = yield self.device_part(quality) if quality.shape[0] else []
            keep = yield [self.draw(host[0] if host else None, quality.shape[1], quality.device)]
            empty = torch.empty(0, dtype=torch.int64)
            return self.finish(host, keep[0]) if host else (empty, empty)
        return run_stages([one()])[0]

    def __call__(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        """Per image (query indices, target indices), int64 host tensors; a query may appear for several targets."""
        return run_stages([self.stages(outputs, targets)])[0]


@register_addon("ms_detr")
class MixedSupervision(AddOn):
    """MS-DETR: one-to-many losses (suffix ``_o2m``) on the auxiliary-FFN outputs of every decoder layer.

    The loss is normalised by the ground-truth count (as the official code), not by the number of pairs.
    Evaluation makes no one-to-many outputs (the layer skips that branch), hence no o2m losses.

    Args:
        assigner: the one-to-many assigner (kept as ``o2m_assigner``; ``assigner`` is the hook).
        coefs: {loss_ce, loss_bbox, loss_giou} coefficients of the o2m losses.
        anchor_matcher: assigner of the encoder proposals on Deformable-DETR two-stage hosts
            (default: ``AnchorMatcher()``, the official one).
    """

    name = "ms_detr"
    order = 30
    requires = frozenset({"decoder_layer"})

    def __init__(self, assigner: OneToManyAssigner, coefs: Mapping[str, float],
                 anchor_matcher: AnchorMatcher | None = None) -> None:
        self.o2m_assigner, self.coefs = assigner, dict(coefs)
        self.anchor_matcher = anchor_matcher or AnchorMatcher()

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
        g.add_argument("--o2m_keep_best_query", action="store_true",
                       help="deliberate fix: every ground truth keeps at least its best query in the one-to-many "
                            "assignment (officially a GT whose best query prefers another GT, or whose positives "
                            "the random cap drops, gets none)")
        g.add_argument("--enc_match_valid_anchors_only", action="store_true",
                       help="deliberate fix: the encoder proposals' anchor matching takes invalid (padded or "
                            "border) tokens only when there are fewer valid ones than ground truths (officially "
                            "any token may be matched; an invalid token's anchor is the box (1, 1, 1, 1))")

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return args.use_ms_detr

    @classmethod
    def request(cls, args: argparse.Namespace) -> HostRequest:
        return HostRequest(decoder_layer=partial(MSDETRDecoderLayer, use_aux_ffn=args.use_aux_ffn))

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> MixedSupervision:
        assigner = OneToManyAssigner(args.o2m_matcher_threshold, args.o2m_matcher_k,
                                     keep_best_query=args.o2m_keep_best_query)
        anchor_matcher = AnchorMatcher(args.set_cost_bbox, args.set_cost_giou, args.enc_match_valid_anchors_only)
        return cls(assigner, {"loss_ce": args.o2m_cls_loss_coef, "loss_bbox": args.o2m_bbox_loss_coef,
                              "loss_giou": args.o2m_giou_loss_coef}, anchor_matcher)

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        return [LossSpec(SUFFIX, main.num_aux_layers, self.coefs)]

    def loss_groups(self, outputs: Mapping[str, Any], ctx: StepContext) -> list[LossGroup]:
        """The o2m group on every decoder layer (last first, then aux 0..L-2, as the official criterion);
        none in evaluation (no ``o2m_outputs``). The last layer logs ``class_error_o2m`` as the official code."""
        if "o2m_outputs" not in outputs:  # evaluation (the host offers the decoder layer: plan_addons checked)
            return []
        return [LossGroup(SUFFIX, outputs["o2m_outputs"], ctx.targets, matcher=self.o2m_assigner, log=True)]

    def assigner(self, group: LossGroup, ctx: StepContext) -> AnchorMatcher | None:
        """Deformable-DETR hosts (proposals on every token): the encoder group is matched on the anchors, as
        MS-DETR always does. DINO's encoder loss (top-Q proposals, real labels) keeps its own matching."""
        return self.anchor_matcher if group.suffix == "enc" and "anchors" in group.outputs else None

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the assigner draws on the global generator, which checkpoints already save."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Accepts any earlier state (checkpoints of the private-generator assigner hold a "generator")."""
        del state
