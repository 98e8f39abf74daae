"""``gpu_paths()``: run on the CPU the code paths a GPU run takes where the two differ, so that the counting tools
(count_syncs.py, count_ops.py) report what a GPU step pays.

* The Hungarian matcher's batched costs (on the CPU it loops over images for its bitwise results; ``costs``
  and ``layer_costs`` with ``batched=True``).
* OD-DETR's prediction distillation without boolean masks (``od_losses.BY_MASK``).
* Co-DETR's RPN proposals by the device NMS (``util/nms.py``, ``rcnn_rpn.DEVICE_NMS``), not torchvision's
  image by image.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

from models import matcher as matcher_module
from models.addons import od_losses
from models.addons.co_detr import rcnn_rpn


@contextlib.contextmanager
def gpu_paths() -> Iterator[None]:
    cls = matcher_module.HungarianMatcher
    saved = {name: cls.__dict__[name] for name in ("costs", "layer_costs") if name in cls.__dict__}
    by_mask = od_losses.BY_MASK
    device_nms = rcnn_rpn.DEVICE_NMS

    def forcing(fn):
        return lambda self, outputs, targets, batched=None: fn(self, outputs, targets, batched=True)

    try:
        for name, fn in saved.items():
            setattr(cls, name, forcing(fn))
        od_losses.BY_MASK = True
        rcnn_rpn.DEVICE_NMS = True
        yield
    finally:
        for name, fn in saved.items():
            setattr(cls, name, fn)
        od_losses.BY_MASK = by_mask
        rcnn_rpn.DEVICE_NMS = device_nms
