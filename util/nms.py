"""Greedy NMS of a batch of images on the device, without a host-device synchronisation.

torchvision's ``nms`` is exact greedy NMS, but its CUDA kernel reads the overlap mask on the host: one blocking
copy per call, one call per image. ``segmented_nms`` computes the same keep set for every image at once with
tensor operations only. Greedy NMS over boxes sorted by score keeps box i iff no kept box before it overlaps it
by more than the threshold; that rule is a fixed point, and iterating it from "keep every box",

    keep_{t+1}[i] = valid[i] and not any(keep_t[j] and overlap[j, i] for j < i),

reaches it (the matrix form of greedy NMS known as Cluster-NMS): after t rounds every box whose chain of
possible suppressors is shorter than t is final, and a round that changes nothing has reached the unique fixed
point, the greedy result. The number of rounds is data-dependent, so the function runs a fixed number and also
returns whether the last one changed anything; the caller reads that flag with a host copy it makes anyway and
falls back to an exact per-image NMS in the rare case it did not converge.

The arithmetic is torchvision's (``batched_nms``' coordinate trick: boxes offset by class times (largest
coordinate + 1); areas (x2 - x1) (y2 - y1); IoU inter / ((area_i + area_j) - inter) > threshold; scores
sorted stable, descending), so on the CPU the keep set is bitwise torchvision's (tests/test_nms.py). A CUDA
build of torchvision may contract the IoU's products and sums into fused multiply-adds, which can move a pair
that sits within a rounding of the threshold.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def segmented_nms(boxes: Tensor, scores: Tensor, valid: Tensor, sizes: Sequence[int], iou_threshold: float,
                  rounds: int) -> tuple[Tensor, Tensor]:
    """Per image and per segment (class), greedy NMS of the valid boxes, as torchvision's ``batched_nms`` on
    each image's valid boxes with the segment index as the class (its coordinate trick).

    Args:
        boxes: [B, M, 4] xyxy; scores: [B, M]; valid: [B, M] bool (invalid boxes neither suppress nor are kept).
        sizes: lengths of the M boxes' consecutive segments; segment s is class s.
        iou_threshold: a box is suppressed by an earlier kept box whose IoU with it is greater.
        rounds: fixed-point rounds (at least 1).

    Returns:
        keep [B, M] bool, and converged [] bool: False when the last round still changed the keep set (then
        ``keep`` is not final: run an exact NMS).
    """
    if boxes.dim() != 3 or boxes.shape[-1] != 4 or scores.shape != boxes.shape[:2] or valid.shape != scores.shape:
        raise ValueError(f"segmented_nms: boxes [B, M, 4], scores and valid [B, M]; got {tuple(boxes.shape)}, "
                         f"{tuple(scores.shape)}, {tuple(valid.shape)}")
    if sum(sizes) != boxes.shape[1] or rounds < 1:
        raise ValueError(f"segmented_nms: segment sizes {list(sizes)} must sum to M = {boxes.shape[1]}, "
                         f"rounds ({rounds}) >= 1")
    keep = torch.zeros_like(valid)
    converged = torch.ones((), dtype=torch.bool, device=boxes.device)
    if boxes.shape[1] == 0:
        return keep, converged
    # the coordinate trick, per image: the largest coordinate of its valid boxes (-inf without any: then no box
    # is valid and the NaN offsets are never read)
    top = boxes.masked_fill(~valid[..., None], float("-inf")).amax(dim=(1, 2))
    ids = torch.cat([boxes.new_full((size,), float(s)) for s, size in enumerate(sizes)])  # no upload
    offsets = ids[None] * (top[:, None] + 1)
    shifted = boxes + offsets[..., None]
    start = 0
    for size in sizes:
        if size:
            seg = slice(start, start + size)
            k, done = _greedy_fixed_point(shifted[:, seg], scores[:, seg], valid[:, seg], iou_threshold, rounds)
            keep[:, seg] = k
            converged = converged & done
        start += size
    return keep, converged


def _greedy_fixed_point(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float,
                        rounds: int) -> tuple[Tensor, Tensor]:
    """One segment of every image: keep [B, K] (the boxes' order) and whether the last round changed nothing."""
    order = scores.sort(dim=1, descending=True, stable=True).indices
    boxes = boxes.gather(1, order[..., None].expand(-1, -1, 4))
    alive = valid.gather(1, order)
    x1, y1, x2, y2 = boxes.unbind(-1)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.min(x2[:, :, None], x2[:, None]) - torch.max(x1[:, :, None], x1[:, None])).clamp(min=0)
    h = (torch.min(y2[:, :, None], y2[:, None]) - torch.max(y1[:, :, None], y1[:, None])).clamp(min=0)
    inter = w * h
    over = inter / (area[:, :, None] + area[:, None] - inter) > iou_threshold  # [B, K (earlier), K (later)]
    size = boxes.shape[1]
    over &= torch.ones(size, size, dtype=torch.bool, device=boxes.device).triu(1)[None]
    over &= alive[:, :, None]
    keep, last = alive, alive
    for _ in range(rounds):
        last, keep = keep, alive & ~(over & keep[:, :, None]).any(dim=1)
    inverse = torch.empty_like(order).scatter_(1, order, torch.arange(size, device=order.device).expand_as(order))
    return keep.gather(1, inverse), (keep == last).all()
