"""Box-level pieces of Co-DETR's Faster R-CNN auxiliary head (specs/co_detr_od_detr.md §1.5 (a)-(b), §1.11).

Everything here computes what MMDetection 2.x computes in the official Co-DETR configs; torchvision parts are
used where they compute the same thing (``BoxCoder``'s encoding, ``roi_align``; ``max_iou_assign`` writes its
``Matcher``'s thresholds with ``where``). What torchvision does differently is written here:

* anchors from the configured strides (torchvision infers the stride from image / feature size and rounds the
  base anchors), MMDetection sizes and centre offset 0, and MMDetection's per-image "valid" flags;
* the low-quality match with its ``min_pos_iou`` floor (torchvision has no floor and keeps each prediction's
  own best ground truth instead of the ground truth whose best match it is);
* the random sampler: MMDetection draws ``torch.randperm`` on the CPU generator only when a pool is larger
  than its quota (torchvision always draws, on the tensor's device);
* the RoI level mapping with ``finest_scale`` and the pooler with ``aligned=True``.

Boxes are xyxy in pixels of the un-padded image throughout.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor
from torchvision.models.detection._utils import BoxCoder, encode_boxes
from torchvision.ops import roi_align

from util.misc import host_tensor_to

from ...matcher import to_host

DELTA_CLIP = math.log(1000.0 / 16)  # MMDetection's wh_ratio_clip = 16 / 1000, the same as torchvision's default


class DeltaCoder(BoxCoder):
    """torchvision's ``BoxCoder`` without a host-to-device copy per call.

    Its ``encode_single`` uploads the four weights and its ``decode_single`` two 0.5 scalars on every call; on a
    GPU each is a blocking copy that waits for the device (Co-DETR's heads made about 80 a step). Here the
    encoder's weights are uploaded once per dtype and device, and the decoder scales by 0.5 as a number. The
    arithmetic is the same operation for operation, so the results are bitwise torchvision's
    (tests/addons/test_co_rcnn.py).
    """

    def __init__(self, weights: tuple[float, float, float, float], bbox_xform_clip: float = DELTA_CLIP) -> None:
        super().__init__(weights, bbox_xform_clip)
        self._weight_tensors: dict[tuple[torch.dtype, torch.device], Tensor] = {}

    def encode_single(self, reference_boxes: Tensor, proposals: Tensor) -> Tensor:
        key = (reference_boxes.dtype, reference_boxes.device)
        if key not in self._weight_tensors:
            self._weight_tensors[key] = torch.as_tensor(self.weights, dtype=key[0], device=key[1])
        return encode_boxes(reference_boxes, proposals, self._weight_tensors[key])

    def decode_single(self, rel_codes: Tensor, boxes: Tensor) -> Tensor:
        """Deltas [N, 4k] (dx, dy, dw, dh per class) relative to [N, 4] xyxy boxes -> [N, 4k] xyxy boxes."""
        boxes = boxes.to(rel_codes.dtype)
        widths, heights = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
        ctr_x, ctr_y = boxes[:, 0] + 0.5 * widths, boxes[:, 1] + 0.5 * heights
        wx, wy, ww, wh = self.weights
        dw = torch.clamp(rel_codes[:, 2::4] / ww, max=self.bbox_xform_clip)
        dh = torch.clamp(rel_codes[:, 3::4] / wh, max=self.bbox_xform_clip)
        centre_x = rel_codes[:, 0::4] / wx * widths[:, None] + ctr_x[:, None]
        centre_y = rel_codes[:, 1::4] / wy * heights[:, None] + ctr_y[:, None]
        half_w, half_h = 0.5 * (torch.exp(dw) * widths[:, None]), 0.5 * (torch.exp(dh) * heights[:, None])
        return torch.stack((centre_x - half_w, centre_y - half_h, centre_x + half_w, centre_y + half_h),
                           dim=2).flatten(1)


def giou_loss(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - GIoU of matched xyxy pairs [N, 4], [N, 4] -> [N]: torchvision's ``generalized_box_iou_loss`` (no
    reduction), operation for operation, with the intersection of non-overlapping pairs set to 0 by ``where``
    instead of boolean-mask indexing (a host-device sync on a GPU). Bitwise the same values and gradients: the
    boxes are unpacked twice, as there, so that each unpacked coordinate's gradient sums at most two terms (their
    order then does not matter)."""
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    left, top = torch.max(x1, x1g), torch.max(y1, y1g)
    right, bottom = torch.min(x2, x2g), torch.min(y2, y2g)
    overlaps = (bottom > top) & (right > left)
    inter = torch.where(overlaps, (right - left) * (bottom - top), torch.zeros_like(x1))
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    iou = inter / (union + eps)
    x1, y1, x2, y2 = boxes1.unbind(dim=-1)
    x1g, y1g, x2g, y2g = boxes2.unbind(dim=-1)
    hull = (torch.max(x2, x2g) - torch.min(x1, x1g)) * (torch.max(y2, y2g) - torch.min(y1, y1g))
    return 1 - (iou - ((hull - union) / (hull + eps)))


def base_anchors(stride: int, octave_base_scale: float, scales_per_octave: int,
                 ratios: Sequence[float]) -> Tensor:
    """The A = len(ratios) * scales_per_octave anchors of one location at (0, 0) (MMDetection center_offset 0).

    Sizes: side = stride * octave_base_scale * 2^(i / scales_per_octave); ratio r = h / w keeps the area
    (h = side * sqrt(r), w = side / sqrt(r)). Ratio-major order (index = ratio * scales_per_octave + scale).

    Returns:
        [A, 4] xyxy relative to the location.
    """
    scales = octave_base_scale * 2 ** (torch.arange(scales_per_octave, dtype=torch.float32) / scales_per_octave)
    h_ratios = torch.sqrt(torch.as_tensor(ratios, dtype=torch.float32))
    w_ratios = 1 / h_ratios
    ws = (stride * w_ratios[:, None] * scales[None, :]).reshape(-1)
    hs = (stride * h_ratios[:, None] * scales[None, :]).reshape(-1)
    return torch.stack([-0.5 * ws, -0.5 * hs, 0.5 * ws, 0.5 * hs], dim=-1)


def grid_anchors(base: Tensor, feat_size: tuple[int, int], stride: int) -> Tensor:
    """All anchors of one level, location (x * stride, y * stride) row-major, then the A anchors of a location.

    Args:
        base: [A, 4] from ``base_anchors``.
        feat_size: (H, W) of the level.

    Returns:
        [H * W * A, 4] xyxy pixels.
    """
    h, w = feat_size
    shift_x = torch.arange(w, device=base.device).to(base.dtype) * stride
    shift_y = torch.arange(h, device=base.device).to(base.dtype) * stride
    yy, xx = torch.meshgrid(shift_y, shift_x, indexing="ij")
    shifts = torch.stack([xx.reshape(-1), yy.reshape(-1), xx.reshape(-1), yy.reshape(-1)], dim=-1)
    return (base[None, :, :] + shifts[:, None, :]).reshape(-1, 4)


def valid_flags(feat_size: tuple[int, int], stride: int, image_size: tuple[int, int], num_base: int,
                device: torch.device) -> Tensor:
    """MMDetection's anchor valid flags: locations within ceil(image side / stride) of the un-padded image.

    Co-DETR pads to a multiple of 1, so MMDetection's ``pad_shape`` is the image's own (h, w); anchors over the
    batch padding take no part in the RPN's assignment and sampling (they still make proposals).

    Returns:
        [H * W * A] bool, in ``grid_anchors`` order.
    """
    feat_h, feat_w = feat_size
    valid_h = min(math.ceil(image_size[0] / stride), feat_h)
    valid_w = min(math.ceil(image_size[1] / stride), feat_w)
    ys = torch.arange(feat_h, device=device) < valid_h
    xs = torch.arange(feat_w, device=device) < valid_w
    return (ys[:, None] & xs[None, :]).reshape(-1, 1).expand(-1, num_base).reshape(-1)


def valid_index(feat_sizes: Sequence[tuple[int, int]], strides: Sequence[int], image_size: tuple[int, int],
                num_base: int) -> np.ndarray:
    """``valid_flags`` of every level (concatenated) as host data: the valid anchors' indices, ascending, from
    the sizes alone (``nonzero`` of the flags would be a host-device sync)."""
    index, start = [], 0
    for (feat_h, feat_w), stride in zip(feat_sizes, strides):
        valid_h = min(math.ceil(image_size[0] / stride), feat_h)
        valid_w = min(math.ceil(image_size[1] / stride), feat_w)
        locations = (np.arange(valid_h)[:, None] * feat_w + np.arange(valid_w)[None]).ravel()
        index.append(start + (locations[:, None] * num_base + np.arange(num_base)[None]).ravel())
        start += feat_h * feat_w * num_base
    return np.concatenate(index).astype(np.int64)


def max_iou_assign(ious: Tensor, pos_iou: float, neg_iou: float, min_pos_iou: float,
                   low_quality: bool) -> Tensor:
    """MMDetection's MaxIoUAssigner on a [..., G, N] IoU matrix (ground truth x boxes; leading dimensions: a batch
    of images, each assigned alone).

    Returns:
        [..., N] int64: 0 = negative (max IoU < neg_iou), k + 1 = assigned to ground truth k, -1 = ignored.
        Low-quality matching (``gt_max_assign_all``): every box that ties a ground truth's best IoU, if that
        IoU >= min_pos_iou, is assigned to it; a later ground truth overrides an earlier one.
    """
    num_gt, num_boxes = ious.shape[-2:]
    if num_boxes == 0 or num_gt == 0:
        return torch.zeros(ious.shape[:-2] + (num_boxes,), dtype=torch.int64, device=ious.device)
    # torchvision's Matcher (best ground truth per box; below neg_iou -> negative, between -> ignored), written
    # with where: its boolean-mask assignments count as syncs
    best, matches = ious.max(dim=-2)
    gt_inds = torch.where(best < neg_iou, 0, torch.where(best < pos_iou, -1, matches + 1))
    if low_quality:
        gt_max = ious.max(dim=-1).values
        hits = (ious == gt_max[..., None]) & (gt_max[..., None] >= min_pos_iou)
        last = (hits * torch.arange(1, num_gt + 1, device=ious.device)[:, None]).max(dim=-2).values
        gt_inds = torch.where(last > 0, last, gt_inds)
    return gt_inds


def _random_choice(pool: Tensor, num: int) -> Tensor:
    """``num`` of ``pool`` drawn with ``torch.randperm`` on the CPU global generator (MMDetection)."""
    return pool[torch.randperm(pool.numel())[:num].to(pool.device)]


def random_sample_host(gt_inds: np.ndarray, num: int, pos_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """``random_sample`` on a host copy of ``gt_inds`` (numpy): the same draws on the CPU global generator, in the
    same order, the same sorted indices."""
    num_pos = int(num * pos_fraction)
    pos = np.flatnonzero(gt_inds > 0)
    if pos.size > num_pos:
        pos = pos[torch.randperm(pos.size)[:num_pos].numpy()]
    pos = np.unique(pos)
    num_neg = num - pos.size
    neg = np.flatnonzero(gt_inds == 0)
    if neg.size > num_neg:
        neg = neg[torch.randperm(neg.size)[:num_neg].numpy()]
    return pos, np.unique(neg)


def random_sample(gt_inds: Tensor, num: int, pos_fraction: float) -> tuple[Tensor, Tensor]:
    """MMDetection's RandomSampler: at most int(num * pos_fraction) positives, the rest of ``num`` negatives.

    Random draws (CPU global generator): one ``randperm`` over the positives if there are more than the
    positive quota, then one over the negatives if there are more than the remaining quota; none otherwise.

    Args:
        gt_inds: [N] from ``max_iou_assign`` (> 0 positive, 0 negative, -1 ignored).

    Returns:
        positive and negative indices into the N boxes, each sorted ascending.
    """
    num_pos = int(num * pos_fraction)
    pos = torch.nonzero(gt_inds > 0).reshape(-1)
    if pos.numel() > num_pos:
        pos = _random_choice(pos, num_pos)
    pos = pos.unique()
    num_neg = num - pos.numel()
    neg = torch.nonzero(gt_inds == 0).reshape(-1)
    if neg.numel() > num_neg:
        neg = _random_choice(neg, num_neg)
    return pos, neg.unique()


def decode_deltas(coder: BoxCoder, deltas: Tensor, boxes: Tensor) -> Tensor:
    """MMDetection's delta2bbox with torchvision's coder: dw/dh clamped to +-log(1000/16) on both sides.

    Args:
        deltas: [N, 4k] (dx, dy, dw, dh) per box, k classes.
        boxes: [N, 4] xyxy reference boxes.

    Returns:
        [N, 4k] xyxy boxes (not clipped).
    """
    ww, wh = coder.weights[2], coder.weights[3]
    deltas = deltas.reshape(deltas.shape[0], -1, 4)
    dwh = torch.stack([deltas[..., 2].clamp(min=-DELTA_CLIP * ww), deltas[..., 3].clamp(min=-DELTA_CLIP * wh)], -1)
    return coder.decode_single(torch.cat([deltas[..., :2], dwh], dim=-1).flatten(1), boxes)


def map_roi_levels(boxes: Tensor, num_levels: int, finest_scale: float) -> Tensor:
    """MMDetection's SingleRoIExtractor level: floor(log2(sqrt(w * h) / finest_scale + 1e-6)) in [0, L - 1].

    Args:
        boxes: [N, 4] xyxy pixels.

    Returns:
        [N] int64 level index.
    """
    scale = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    return torch.floor(torch.log2(scale / finest_scale + 1e-6)).clamp(min=0, max=num_levels - 1).long()


def multilevel_roi_align(feats: Sequence[Tensor], rois: Tensor, strides: Sequence[int], finest_scale: float,
                         output_size: int, sampling_ratio: int, levels: np.ndarray | None = None) -> Tensor:
    """RoIAlign (aligned=True, MMCV's default) of each RoI on the level ``map_roi_levels`` picks.

    A level that gets no RoI still joins the graph with a zero term (MMDetection does the same), so every
    level's producer gets a gradient.

    Args:
        feats: L maps [B, C, H_l, W_l] at ``strides``.
        rois: [N, 5] (batch index, x1, y1, x2, y2) pixels.
        levels: the RoIs' ``map_roi_levels`` on the host when the caller has them (None: computed here, one
            host copy).

    Returns:
        [N, C, output_size, output_size].
    """
    # every level's RoIs from one host copy of the levels and one upload (not a nonzero per level: each a sync)
    host = to_host([map_roi_levels(rois[:, 1:], len(feats), finest_scale)])[0].numpy() if levels is None else levels
    per_level = [np.flatnonzero(host == lvl) for lvl in range(len(feats))]
    flat = host_tensor_to(np.concatenate([np.zeros(0, np.int64), *per_level]), torch.long, rois.device)
    out = feats[0].new_zeros(rois.shape[0], feats[0].shape[1], output_size, output_size)
    for feat, stride, inds in zip(feats, strides, flat.split([len(x) for x in per_level])):
        if inds.numel() > 0:
            out[inds] = roi_align(feat, rois[inds].to(feat.dtype), output_size, spatial_scale=1.0 / stride,
                                  sampling_ratio=sampling_ratio, aligned=True).to(out.dtype)
        else:
            out = out + feat.sum() * 0.0
    return out
