"""``gpu_paths()``: run on the CPU the code paths a GPU run takes where the two differ, so that the counting tools
(count_syncs.py, count_ops.py) report what a GPU step pays.

* The Hungarian matcher's batched costs (on the CPU it loops over images for its bitwise results; ``costs``
  and ``layer_costs`` with ``batched=True``).
* OD-DETR's prediction distillation without boolean masks (``od_losses.BY_MASK``).
* torchvision's ``batched_nms`` (Co-DETR's RPN): one NMS with the boxes offset per level up to 20000 boxes
  (the CPU takes its per-level loop, a ``unique`` and one NMS per level, above 4000).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor
from torchvision.ops import boxes as tv_boxes

from models import matcher as matcher_module
from models.addons import od_losses
from models.addons.co_detr import rcnn_rpn


def _batched_nms_gpu(boxes: Tensor, scores: Tensor, idxs: Tensor, iou_threshold: float) -> Tensor:
    """torchvision's ``batched_nms`` with the choice a CUDA tensor gets."""
    if boxes.numel() > 20000:
        return tv_boxes._batched_nms_vanilla(boxes, scores, idxs, iou_threshold)
    return tv_boxes._batched_nms_coordinate_trick(boxes, scores, idxs, iou_threshold)


@contextlib.contextmanager
def gpu_paths() -> Iterator[None]:
    cls = matcher_module.HungarianMatcher
    saved = {name: cls.__dict__[name] for name in ("costs", "layer_costs") if name in cls.__dict__}
    by_mask = od_losses.BY_MASK
    nms = rcnn_rpn.batched_nms

    def forcing(fn):
        return lambda self, outputs, targets, batched=None: fn(self, outputs, targets, batched=True)

    try:
        for name, fn in saved.items():
            setattr(cls, name, forcing(fn))
        od_losses.BY_MASK = True
        rcnn_rpn.batched_nms = _batched_nms_gpu
        yield
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)
        od_losses.BY_MASK = by_mask
        rcnn_rpn.batched_nms = nms
