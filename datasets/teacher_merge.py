"""Teach-DETR's merge of several teachers' boxes of one image into one target set (specs/deformable_family.md §5.1).

The released code merges in the data set, per training image, BEFORE the augmentation, on the teachers' boxes as
xyxy pixels of the image as stored (clamped to the image, zero-width/height boxes dropped):

1. the boxes of every teacher that has an entry for the image are concatenated (teacher by teacher, each in its
   file's order); each box is ranked by its score + its teacher's weight (``--ext-ann-weights``, 0.5 each);
2. class-aware NMS at IoU 0.2 (classes kept apart by shifting each class's boxes by class × (largest coordinate
   + 1), then one plain NMS, as the released code and torchvision's small-input path do);
3. the first floor(N / T) survivors, best first, are kept: N = the boxes left after step 0's drops, T = the
   teachers that have an entry for the image (an entry may be an empty list: it still counts);
4. the stored score is the raw teacher score (without the weight);
5. an image for which no teacher has an entry gets ONE whole-image box ``[0, 0, w, h]``, label 0, score 0 (the
   "dummy" box); an image whose teachers' entries hold no usable box gets nothing.

The augmentation then moves, clips and drops the merged boxes (and the dummy box) like the ground truth's.
:class:`datasets.teacher_boxes.TeacherBoxes` runs this in merged mode and marks the target with
``target[MERGED_KEY] = True``; the Teach-DETR add-on (models/addons/teach.py) then uses the boxes as they are.
Nothing here draws random numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torchvision.ops import nms

DEFAULT_TEACHER_WEIGHT = 0.5  # the released default weight of every teacher (--ext-ann-weights)
NMS_IOU = 0.2  # the released class-aware NMS threshold of the merge
MERGED_KEY = "ext_merged"  # target key (Python bool): the ext_* box set is already the merged teacher set
DUMMY_TEACHER = -1  # ext_teacher of the whole-image dummy box


@dataclass(frozen=True)
class TeacherMerge:
    """Settings of the data-path merge (merged mode).

    Attributes:
        weights: per teacher (index order), the ranking bonus added to its scores.
        dummy: give an image without any teacher entry the whole-image box (released; off: ``--ensemble_no_dummy``).
        iou_threshold: NMS threshold (IoU > threshold suppressed).
    """

    weights: tuple[float, ...]
    dummy: bool = True
    iou_threshold: float = NMS_IOU


def class_aware_nms(boxes: Tensor, scores: Tensor, classes: Tensor, iou_threshold: float) -> Tensor:
    """NMS within each class; indices of the kept boxes by decreasing score.

    Classes are kept apart by shifting each box by class × (largest coordinate + 1) before one NMS (the released
    code's way: the shifted coordinates, hence the IoUs, round exactly as there).

    Args:
        boxes: [N, 4] float xyxy. scores: [N]. classes: [N] int64 (the released code uses the category ids).
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    offsets = classes.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def merge_teachers(boxes: Tensor, labels: Tensor, scores: Tensor, teacher: Tensor, weights: Tensor,
                   iou_threshold: float = NMS_IOU, num_teachers: int | None = None) -> Tensor:
    """The released merge of one image's teacher boxes: indices of the kept boxes, best first.

    Class-aware NMS (IoU > ``iou_threshold`` suppressed) ranked by score + the box's teacher weight, then the
    first floor(N / ``num_teachers``) survivors.

    Args:
        boxes: [N, 4] float xyxy (pixels as released; IoU does not depend on the scale of either axis).
        labels: [N] int64 NMS classes; scores: [N] float; teacher: [N] int64 index into ``weights`` [n_teachers].
        num_teachers: T of floor(N / T), the teachers with an entry for the image; None: the distinct values of
            ``teacher`` (the same when every teacher with an entry has a box).
    """
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.int64, device=boxes.device)
    ranking = scores + weights.to(scores.device, scores.dtype)[teacher]
    keep = class_aware_nms(boxes.float(), ranking, labels, iou_threshold)
    num_teachers = torch.unique(teacher).numel() if num_teachers is None else num_teachers
    return keep[: boxes.shape[0] // max(num_teachers, 1)]


def merge_image(boxes: Tensor, labels: Tensor, scores: Tensor, teacher: Tensor, classes: Tensor,
                num_teachers: int, size: tuple[int, int], merge: TeacherMerge) -> tuple[Tensor, ...]:
    """One image's merged teacher set in the data path (before the transforms).

    Args:
        boxes: [N, 4] float32 xyxy pixels, clamped to the image, no zero-width/height box.
        labels: [N] int64 labels (label space of the targets); scores: [N] float32; teacher: [N] int64.
        classes: [N] int64 NMS classes (the category ids, as released).
        num_teachers: teachers with an entry for the image (0: the dummy box, if ``merge.dummy``).
        size: (width, height) of the image in pixels.

    Returns:
        (boxes [M, 4], labels [M], scores [M], teacher [M]); the dummy box has teacher :data:`DUMMY_TEACHER`.
    """
    if num_teachers == 0:
        if not merge.dummy:
            return boxes[:0], labels[:0], scores[:0], teacher[:0]
        w, h = size
        return (torch.tensor([[0, 0, w, h]], dtype=torch.float32), torch.zeros(1, dtype=torch.int64),
                torch.zeros(1, dtype=torch.float32), torch.full((1,), DUMMY_TEACHER, dtype=torch.int64))
    weights = torch.tensor(merge.weights, dtype=torch.float32)
    keep = merge_teachers(boxes, classes, scores, teacher, weights, merge.iou_threshold, num_teachers)
    return boxes[keep], labels[keep], scores[keep], teacher[keep]
