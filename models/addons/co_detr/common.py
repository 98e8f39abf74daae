"""What every Co-DETR auxiliary head returns (specs/co_detr_od_detr.md §1.6 "What each auxiliary head exports").

A head (ATSS, RPN + RoI) runs on the memory pyramid and returns its own loss terms and, per image, the entries
the positive-query builder draws from: every entry's box, its assigned label (background = ``num_classes``)
and its assigned ground-truth box, plus an optional content feature per entry (the RoI head's pooled feature).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from torch import Tensor


@dataclass
class AuxHeadOutput:
    """One auxiliary head's result for a batch.

    Attributes:
        losses: unweighted, already normalised terms under their loss keys (``loss_rpn_cls``, ``loss_rpn_bbox``,
            ``loss_rcnn_cls``, ``loss_rcnn_giou``, ``loss_atss_cls``, ``loss_atss_giou``,
            ``loss_atss_centerness``); the add-on's LossSpec declares their weights.
        coords: per image [N_b, 4] entry boxes, xyxy in pixels of the (unpadded) image (ATSS: all anchors;
            RoI head: the sampled RoIs).
        labels: per image [N_b] int64 assigned class, ``num_classes`` = background.
        box_targets: per image [N_b, 4] assigned ground-truth box, xyxy pixels (zeros for background).
        feats: per image [N_b, C] content feature of each entry (RoI head: the pooled RoI feature averaged over
            the 7x7 grid), or None when the builder takes the feature elsewhere (ATSS: the memory).
        host_positive: per image [N_b] bool on the host, ``labels < num_classes`` (a head that knows it without
            reading the device), or None (the builder copies the labels).
    """

    losses: dict[str, Tensor]
    coords: list[Tensor]
    labels: list[Tensor]
    box_targets: list[Tensor]
    feats: list[Tensor] | None = None
    host_positive: list[np.ndarray] | None = None
