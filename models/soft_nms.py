"""Class-wise linear soft-NMS after the top-k (``--soft_nms IOU``): Co-DINO's test-time post-processing.

Sense-X/Co-DETR ``co_dino_5scale_*`` test_cfg ``max_per_img=300, nms=dict(type='soft_nms', iou_threshold=0.8)``
with the head's ``with_nms`` path: the top ``num_query`` (900) (query, class) pairs by sigmoid score, boxes in
pixels clipped to the image, then MMCV's ``batched_nms`` → ``soft_nms`` with its defaults (linear decay,
min_score 1e-3, IoU without the +1 offset), classes kept apart, the first 300 kept in selection order with
their decayed scores.

Linear soft-NMS: repeatedly take the highest-scoring remaining box; every other remaining box of its class
whose IoU with it exceeds the threshold has its score multiplied by (1 - IoU); boxes whose score falls below
``min_score`` are dropped.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, box_iou


@torch.no_grad()
def soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, keep: int,
             min_score: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Class-wise linear soft-NMS of one image.

    Args:
        boxes: [N, 4] xyxy; scores: [N]; labels: [N]; keep: how many selections to make (at most N).

    Returns:
        (indices into the inputs [M], their decayed scores [M]) in selection order, M <= keep. Runs ``keep``
        fixed steps without a host synchronisation; the result is cut to the valid selections at the end.
    """
    n = scores.numel()
    steps = min(keep, n)
    if steps == 0:
        return torch.empty(0, dtype=torch.long, device=scores.device), scores.new_empty(0)
    iou = box_iou(boxes, boxes)[0]
    iou = torch.where(labels[:, None] == labels[None, :], iou, torch.zeros_like(iou))
    decay = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
    scores = scores.clone()
    alive = scores >= min_score
    picked = torch.empty(steps, dtype=torch.long, device=scores.device)
    picked_scores = scores.new_empty(steps)
    valid = torch.zeros(steps, dtype=torch.bool, device=scores.device)
    neg_inf = torch.tensor(float("-inf"), device=scores.device, dtype=scores.dtype)
    for step in range(steps):
        i = torch.where(alive, scores, neg_inf).argmax()
        valid[step] = alive[i]
        picked[step], picked_scores[step] = i, scores[i]
        alive[i] = False
        scores = torch.where(alive, scores * decay[i], scores)
        alive &= scores >= min_score
    count = int(valid.sum())  # one read at the end (selections are valid up to the first invalid one)
    return picked[:count], picked_scores[:count]


class SoftNMSPostProcess(nn.Module):
    """Top ``pre_select`` (query, class) pairs by sigmoid score, boxes in pixels clipped to the image, class-wise
    soft-NMS at ``iou_threshold``, the first ``num_select`` kept (module docstring)."""

    def __init__(self, iou_threshold: float, pre_select: int, num_select: int = 300) -> None:
        super().__init__()
        self.iou_threshold, self.pre_select, self.num_select = iou_threshold, pre_select, num_select

    @torch.no_grad()
    def forward(self, outputs: dict, target_sizes: Tensor) -> list[dict[str, Tensor]]:
        """target_sizes: [B, 2] (H, W). Returns per image ``scores``, ``labels``, ``boxes`` (xyxy pixels)."""
        logits, out_boxes = outputs["pred_logits"].float(), outputs["pred_boxes"].float()
        if len(logits) != len(target_sizes) or target_sizes.shape[1] != 2:
            raise ValueError("target_sizes must be [B, 2] with one row per image")
        b, q, k = logits.shape
        values, indexes = torch.topk(logits.sigmoid().view(b, -1), min(self.pre_select, q * k), dim=1)
        results = []
        for i in range(b):
            h, w = target_sizes[i].unbind()
            size = torch.stack([w, h, w, h]).to(out_boxes)
            boxes = torch.minimum((box_cxcywh_to_xyxy(out_boxes[i, indexes[i] // k]) * size).clamp(min=0), size)
            labels = indexes[i] % k
            keep, scores = soft_nms(boxes, values[i], labels, self.iou_threshold, self.num_select)
            results.append({"scores": scores, "labels": labels[keep], "boxes": boxes[keep]})
        return results
