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

MAX_PAIRS = 1 << 27  # overlap-matrix entries computed at once (images of a block in chunks above it)


def segmented_nms(boxes: Tensor, scores: Tensor, valid: Tensor, sizes: Sequence[int], iou_threshold: float,
                  rounds: int, block: int = 4096) -> tuple[Tensor, Tensor]:
    """Per image and per segment (class), greedy NMS of the valid boxes, as torchvision's ``batched_nms`` on
    each image's valid boxes with the segment index as the class (its coordinate trick).

    Consecutive segments are processed together up to ``block`` boxes (one [B, K, K] overlap matrix per block;
    a longer segment is a block of its own): the coordinate trick keeps the boxes of two segments apart as
    torchvision's single NMS call does, which assumes, as torchvision does, coordinates >= 0.

    Args:
        boxes: [B, M, 4] xyxy; scores: [B, M]; valid: [B, M] bool (invalid boxes neither suppress nor are kept).
        sizes: lengths of the M boxes' consecutive segments; segment s is class s.
        iou_threshold: a box is suppressed by an earlier kept box whose IoU with it is greater.
        rounds: fixed-point rounds (at least 1).
        block: most boxes of several segments processed together.

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
    if boxes.shape[1] == 0:
        return torch.zeros_like(valid), torch.ones((), dtype=torch.bool, device=boxes.device)
    # the coordinate trick, per image: the largest coordinate of its valid boxes (-inf without any: then no box
    # is valid and the NaN offsets are never read); one segment needs no offset (torchvision's adds 0)
    shifted = boxes
    if len(sizes) > 1:
        top = boxes.masked_fill(~valid[..., None], float("-inf")).amax(dim=(1, 2))
        ids = torch.cat([boxes.new_full((size,), float(s)) for s, size in enumerate(sizes)])  # no upload
        shifted = boxes + (ids[None] * (top[:, None] + 1))[..., None]
    keeps, done = [], []
    for start, size in _blocks(sizes, block):
        seg = slice(start, start + size)
        # images in chunks of at most MAX_PAIRS overlap entries (each float temporary [b, K, K] <= 512 MiB)
        per = max(1, MAX_PAIRS // max(size * size, 1))
        parts = [_greedy_fixed_point(shifted[i:i + per, seg], scores[i:i + per, seg], valid[i:i + per, seg],
                                     iou_threshold, rounds) for i in range(0, boxes.shape[0], per)]
        keeps.append(torch.cat([k for k, _ in parts]) if len(parts) > 1 else parts[0][0])
        done += [d for _, d in parts]
    return torch.cat(keeps, 1), torch.stack(done).all()


def _blocks(sizes: Sequence[int], block: int) -> list[tuple[int, int]]:
    """(start, length) of runs of whole consecutive segments, each at most ``block`` long unless one segment is."""
    out, start, length = [], 0, 0
    for size in sizes:
        if length and length + size > block:
            out.append((start, length))
            start, length = start + length, 0
        length += size
    if length:
        out.append((start, length))
    return out


def _greedy_fixed_point(boxes: Tensor, scores: Tensor, valid: Tensor, iou_threshold: float,
                        rounds: int) -> tuple[Tensor, Tensor]:
    """One block of every image: keep [B, K] (the boxes' order) and whether the last round changed nothing."""
    order = scores.sort(dim=1, descending=True, stable=True).indices
    x1, y1, x2, y2 = boxes.gather(1, order[..., None].expand(-1, -1, 4)).unbind(-1)
    alive = valid.gather(1, order)
    area = (x2 - x1) * (y2 - y1)
    w = (torch.min(x2[:, :, None], x2[:, None]) - torch.max(x1[:, :, None], x1[:, None])).clamp(min=0)
    h = (torch.min(y2[:, :, None], y2[:, None]) - torch.max(y1[:, :, None], y1[:, None])).clamp(min=0)
    inter = w * h
    over = inter / (area[:, :, None] + area[:, None] - inter) > iou_threshold  # [B, K (earlier), K (later)]
    size = order.shape[1]
    over &= torch.ones(size, size, dtype=torch.bool, device=order.device).triu(1) & alive[:, :, None]
    keep, last = alive, alive
    for _ in range(rounds):
        last, keep = keep, alive & ~(over & keep[:, :, None]).any(dim=1)
    return torch.zeros_like(keep).scatter_(1, order, keep), (keep == last).all()
