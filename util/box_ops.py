"""Box conventions and geometry.

Boxes are normalised (cx, cy, w, h) unless a name says ``xyxy`` (x0, y0, x1, y1).
"""
from __future__ import annotations

import torch
from torch import Tensor


def box_cxcywh_to_xyxy(x: Tensor) -> Tensor:
    """[..., 4] (cx, cy, w, h) -> [..., 4] (x0, y0, x1, y1)."""
    cx, cy, w, h = x.unbind(-1)
    return torch.stack([cx - 0.5 * w, cy - 0.5 * h, cx + 0.5 * w, cy + 0.5 * h], dim=-1)


def box_xyxy_to_cxcywh(x: Tensor) -> Tensor:
    """[..., 4] (x0, y0, x1, y1) -> [..., 4] (cx, cy, w, h)."""
    x0, y0, x1, y1 = x.unbind(-1)
    return torch.stack([(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], dim=-1)


def box_area(boxes: Tensor) -> Tensor:
    """Area of [..., N, 4] xyxy boxes -> [..., N]."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: Tensor, boxes2: Tensor) -> tuple[Tensor, Tensor]:
    """Pairwise IoU and union of xyxy boxes: [..., N, 4], [..., M, 4] -> ([..., N, M], [..., N, M]) (leading
    dimensions broadcast; every pair's arithmetic is that of the 2-D case)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[..., 0] * wh[..., 1]
    union = area1[..., :, None] + area2[..., None, :] - inter
    return inter / union, union


def check_xyxy(boxes: Tensor, name: str = "boxes") -> None:
    """Raise ValueError if any xyxy box [..., 4] is degenerate (x1 < x0 or y1 < y0; NaN counts as degenerate).

    Reads a device tensor's values on the host: one host-device synchronisation.
    """
    if not (boxes[..., 2:] >= boxes[..., :2]).all():
        raise ValueError(f"generalized_box_iou: {name} has x1 < x0 or y1 < y0")


def generalized_box_iou(boxes1: Tensor, boxes2: Tensor, check: bool = True, eps: float = 0.0) -> Tensor:
    """Pairwise generalised IoU (https://giou.stanford.edu/) of xyxy boxes: [..., N, 4], [..., M, 4] ->
    [..., N, M], in [-1, 1] (leading dimensions broadcast).

    Degenerate boxes (x1 < x0 or y1 < y0) would give inf/nan, so they are rejected (``check_xyxy``). The
    check costs two host-device synchronisations; ``check=False`` skips it for callers whose boxes are
    valid by construction (the matcher: sigmoid predictions, targets validated when the data is loaded).
    ``eps`` > 0 is added to the union and the enclosing area (DAB-DETR, DN-DETR and DINO's version).
    """
    if check:
        check_xyxy(boxes1, "boxes1")
        check_xyxy(boxes2, "boxes2")
    iou, union = box_iou(boxes1, boxes2)
    if eps:
        iou = _intersection(boxes1, boxes2) / (union + eps)
    lt = torch.min(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.max(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[..., 0] * wh[..., 1]
    if eps:
        return iou - (area - union) / (area + eps)
    return iou - (area - union) / area


def _intersection(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """Pairwise intersection areas of xyxy boxes (as in :func:`box_iou`)."""
    lt = torch.max(boxes1[..., :, None, :2], boxes2[..., None, :, :2])
    rb = torch.min(boxes1[..., :, None, 2:], boxes2[..., None, :, 2:])
    wh = (rb - lt).clamp(min=0)
    return wh[..., 0] * wh[..., 1]


def elementwise_generalized_box_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """GIoU of matched pairs of xyxy boxes: [N, 4], [N, 4] -> [N] (no N x N matrix)."""
    area1 = box_area(boxes1)
    area2 = box_area(boxes2)
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    union = area1 + area2 - inter
    iou = inter / union
    lt = torch.min(boxes1[:, :2], boxes2[:, :2])
    rb = torch.max(boxes1[:, 2:], boxes2[:, 2:])
    wh = (rb - lt).clamp(min=0)
    area = wh[:, 0] * wh[:, 1]
    return iou - (area - union) / area
