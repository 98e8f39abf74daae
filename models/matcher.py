"""Hungarian matcher between predictions and ground truth (scipy's linear_sum_assignment)."""
from __future__ import annotations

from typing import Mapping, Sequence

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, generalized_box_iou

Indices = list[tuple[Tensor, Tensor]]


def focal_class_cost(logits: Tensor, labels: Tensor, alpha: float = 0.25, gamma: float = 2.0) -> Tensor:
    """Focal-loss matching cost [Q, G] of classifying each query as each target's class."""
    prob = logits.sigmoid()
    neg = (1 - alpha) * (prob ** gamma) * (-(1 - prob + 1e-8).log())
    pos = alpha * ((1 - prob) ** gamma) * (-(prob + 1e-8).log())
    return pos[:, labels] - neg[:, labels]


class HungarianMatcher(nn.Module):
    """One-to-one assignment minimising cost_class * focal + cost_bbox * L1 + cost_giou * (-GIoU).

    Costs are computed per image (no B x B cross terms) and moved to the CPU in one transfer.
    Non-finite costs (a diverged model) are replaced by a large finite value so matching never fails.

    Args:
        cost_class, cost_bbox, cost_giou: weights of the three costs.
        focal_alpha, focal_gamma: focal parameters of the class cost (the official code hard-codes 0.25, 2).
    """

    def __init__(self, cost_class: float = 2.0, cost_bbox: float = 5.0, cost_giou: float = 2.0,
                 focal_alpha: float = 0.25, focal_gamma: float = 2.0) -> None:
        super().__init__()
        if cost_class == 0 and cost_bbox == 0 and cost_giou == 0:
            raise ValueError("all matcher costs can't be 0")
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma

    def cost_matrix(self, logits: Tensor, boxes: Tensor, tgt_labels: Tensor, tgt_boxes: Tensor) -> Tensor:
        """Cost [Q, G] for one image: logits [Q, K], boxes [Q, 4] cxcywh, targets [G], [G, 4]."""
        cost_bbox = torch.cdist(boxes, tgt_boxes, p=1)
        cost_class = focal_class_cost(logits, tgt_labels, self.focal_alpha, self.focal_gamma)
        cost_giou = -generalized_box_iou(box_cxcywh_to_xyxy(boxes), box_cxcywh_to_xyxy(tgt_boxes))
        c = self.cost_bbox * cost_bbox + self.cost_class * cost_class + self.cost_giou * cost_giou
        return c

    @torch.no_grad()
    def forward(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        """Match every image.

        Args:
            outputs: ``pred_logits`` [B, Q, K] and ``pred_boxes`` [B, Q, 4] (cxcywh); optionally ``valid``
                [B, Q] bool: queries that may be matched (others only when fewer valid queries than targets).
            targets: per image ``labels`` [G_b] and ``boxes`` [G_b, 4] (cxcywh).

        Returns:
            Per image (query indices, target indices), int64, of length min(Q, G_b).
        """
        # A diverged step may carry NaNs; matching must still succeed so the step can be skipped cleanly.
        logits = torch.nan_to_num(outputs["pred_logits"].float())
        boxes = torch.nan_to_num(outputs["pred_boxes"].float(), nan=0.5)
        valid = outputs.get("valid")
        costs = []
        for b, t in enumerate(targets):
            if len(t["labels"]) == 0:
                continue
            cost = self.cost_matrix(logits[b], boxes[b], t["labels"], t["boxes"].float())
            if valid is not None:
                cost = cost.masked_fill(~valid[b, :, None], 1e8)
            costs.append(cost.flatten())
        flat = torch.cat(costs).cpu() if costs else torch.empty(0)
        flat = torch.nan_to_num(flat, nan=1e8, posinf=1e8, neginf=-1e8)
        indices, offset, q = [], 0, logits.shape[1]
        for t in targets:
            g = len(t["labels"])
            if g == 0:
                indices.append((torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64)))
                continue
            rows, cols = linear_sum_assignment(flat[offset:offset + q * g].view(q, g).numpy())
            offset += q * g
            indices.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return indices


def build_matcher(args) -> HungarianMatcher:
    return HungarianMatcher(cost_class=args.set_cost_class, cost_bbox=args.set_cost_bbox,
                            cost_giou=args.set_cost_giou, focal_alpha=0.25)
