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

from .matcher import to_host


@torch.no_grad()
def soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, keep: int,
             min_score: float = 1e-3) -> tuple[Tensor, Tensor]:
    """Class-wise linear soft-NMS of one image.

    Args:
        boxes: [N, 4] xyxy; scores: [N]; labels: [N]; keep: how many selections to make (at most N).

    Returns:
        (indices into the inputs [M], their decayed scores [M]) in selection order, M <= keep.
    """
    picked, picked_scores, count = batched_soft_nms(boxes[None], scores[None], labels[None], iou_threshold, keep,
                                                    min_score)
    n = int(count[0])  # one read at the end (selections are valid up to the first invalid one)
    return picked[0, :n], picked_scores[0, :n]


@torch.no_grad()
def batched_soft_nms(boxes: Tensor, scores: Tensor, labels: Tensor, iou_threshold: float, keep: int,
                     min_score: float = 1e-3) -> tuple[Tensor, Tensor, Tensor]:
    """``soft_nms`` of every image at once ([B, N] inputs): ``keep`` fixed steps for the whole batch, no host read.

    Each step is elementwise per image plus a per-row ``argmax`` (the first maximum, as the one-image argmax), so
    every image's selections are bitwise those of ``soft_nms`` on it alone.

    Returns:
        indices [B, S] and decayed scores [B, S] in selection order (S = min(keep, N)), and each image's number
        of valid selections [B] (its first ones).
    """
    b, n = scores.shape
    steps = min(keep, n)
    if steps == 0:
        return (torch.empty(b, 0, dtype=torch.long, device=scores.device), scores.new_empty(b, 0),
                torch.zeros(b, dtype=torch.long, device=scores.device))
    iou = box_iou(boxes, boxes)[0]
    iou = torch.where(labels[:, :, None] == labels[:, None, :], iou, torch.zeros_like(iou))
    decay = torch.where(iou > iou_threshold, 1 - iou, torch.ones_like(iou))
    scores = scores.clone()
    alive = scores >= min_score
    rows = torch.arange(b, device=scores.device)
    picked = torch.empty(b, steps, dtype=torch.long, device=scores.device)
    picked_scores = scores.new_empty(b, steps)
    valid = torch.zeros(b, steps, dtype=torch.bool, device=scores.device)
    for step in range(steps):
        i = torch.where(alive, scores, float("-inf")).argmax(dim=1)  # a number, not a tensor: no upload
        valid[:, step] = alive[rows, i]
        picked[:, step], picked_scores[:, step] = i, scores[rows, i]
        alive[rows, i] = False
        scores = torch.where(alive, scores * decay[rows, i], scores)
        alive &= scores >= min_score
    return picked, picked_scores, valid.sum(1)


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
        h, w = target_sizes.unbind(1)
        size = torch.stack([w, h, w, h], 1).to(out_boxes)[:, None]  # [B, 1, 4]
        boxes = box_cxcywh_to_xyxy(out_boxes.gather(1, (indexes // k)[..., None].expand(-1, -1, 4)))
        boxes = torch.minimum((boxes * size).clamp(min=0), size)
        labels = indexes % k
        # every image at once, then ONE read of the images' selection counts (was a read per image)
        keep, scores, counts = batched_soft_nms(boxes, values, labels, self.iou_threshold, self.num_select)
        counts = to_host([counts])[0].numpy().tolist() if b else []
        return [{"scores": scores[i, :n], "labels": labels[i, keep[i, :n]], "boxes": boxes[i, keep[i, :n]]}
                for i, n in enumerate(counts)]
