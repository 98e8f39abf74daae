"""Co-DETR's ATSS auxiliary head on the memory pyramid (specs/co_detr_od_detr.md §1.5(c), §1.11 items 2 and 5).

Written from the spec (MMDetection's ATSSHead / ATSSAssigner semantics as Co-DETR configures them); no code of
Sense-X/Co-DETR or MMDetection is reproduced.

* Anchors: one square anchor of side ``octave_base_scale * stride`` per location, centred at (x * s, y * s), from
  the configured strides (never inferred from image / feature sizes). An anchor is valid when its location lies
  inside ceil(image side / stride) of the unpadded image (MMDetection's valid flags with pad divisor 1); invalid
  anchors take no part in the assignment nor in any loss and are exported as zero boxes (its ``unmap``).
* ATSS assignment (topk 9 per level by centre distance, IoU >= mean + unbiased std, centre inside the GT by more
  than 0.01 px on all four sides, highest IoU wins among several GTs).
* Losses: sigmoid focal (alpha 0.25, gamma 2) over valid anchors / N_pos; GIoU of the decoded positives weighted by
  their centerness target / sum of centerness targets; centerness BCE / N_pos. N_pos = sum over images of
  max(positives, 1), averaged over processes, >= 1; the centerness sum averaged over processes, >= 1.
"""
from __future__ import annotations

import math
from typing import Generator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou, sigmoid_focal_loss

from util.misc import all_reduce_mean, host_tensor_to

from ...matcher import run_stages
from .common import AuxHeadOutput
from .pyramid import gn_groups
from .rcnn_ops import DeltaCoder, giou_loss

WH_CLIP = math.log(1000.0 / 16)  # MMDetection's wh_ratio_clip 16/1000, on both sides


def level_anchors(shapes: Sequence[tuple[int, int]], strides: Sequence[int], octave_base_scale: float,
                  device: torch.device) -> list[Tensor]:
    """Per level [H_l * W_l, 4] xyxy pixel anchors (row-major, like the flattened maps) from explicit strides."""
    out = []
    for (h, w), s in zip(shapes, strides):
        half = octave_base_scale * s / 2
        ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32) * s,
                                torch.arange(w, device=device, dtype=torch.float32) * s, indexing="ij")
        xs, ys = xs.reshape(-1), ys.reshape(-1)
        out.append(torch.stack([xs - half, ys - half, xs + half, ys + half], -1))
    return out


def valid_flags(shapes: Sequence[tuple[int, int]], strides: Sequence[int], size: tuple[int, int],
                device: torch.device) -> Tensor:
    """[sum H_l W_l] bool: the location lies inside ceil(h / s) x ceil(w / s) of the unpadded image (h, w)."""
    flags = []
    for (h, w), s in zip(shapes, strides):
        vh, vw = min(math.ceil(size[0] / s), h), min(math.ceil(size[1] / s), w)
        ok = torch.zeros(h, w, dtype=torch.bool, device=device)
        ok[:vh, :vw] = True
        flags.append(ok.reshape(-1))
    return torch.cat(flags)


def valid_index(shapes: Sequence[tuple[int, int]], strides: Sequence[int],
                size: tuple[int, int]) -> tuple[np.ndarray, list[int]]:
    """``valid_flags`` as host data: the valid anchors' flat indices (levels concatenated, ascending) and their
    number per level, computed from the sizes alone (no device read: ``nonzero`` and ``int`` of the flags would
    each be a host-device sync)."""
    index, counts, start = [], [], 0
    for (h, w), s in zip(shapes, strides):
        vh, vw = min(math.ceil(size[0] / s), h), min(math.ceil(size[1] / s), w)
        index.append(start + (np.arange(vh)[:, None] * w + np.arange(vw)[None]).ravel())
        counts.append(vh * vw)
        start += h * w
    return np.concatenate(index).astype(np.int64), counts


def atss_assign(anchors: Tensor, num_level: Sequence[int], gt_boxes: Tensor, topk: int = 9) -> Tensor:
    """ATSS assignment of the (valid) anchors.

    Args:
        anchors: [N, 4] xyxy pixels, levels concatenated; num_level: anchors per level (sum = N).
        gt_boxes: [G, 4] xyxy pixels.
        topk: candidates per level and GT (closest centres).

    Returns:
        [N] int64: index of the assigned GT, -1 for background.
    """
    n, g = anchors.shape[0], gt_boxes.shape[0]
    assigned = torch.full((n,), -1, dtype=torch.long, device=anchors.device)
    if n == 0 or g == 0:
        return assigned
    ious = box_iou(anchors, gt_boxes)  # [N, G]
    a_ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    g_ctr = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
    dist = (a_ctr[:, None] - g_ctr[None]).pow(2).sum(-1).sqrt()  # [N, G]
    candidates, start = [], 0
    for count in num_level:
        k = min(topk, count)
        if k > 0:
            candidates.append(dist[start:start + count].topk(k, dim=0, largest=False).indices + start)
        start += count
    cand = torch.cat(candidates, 0)  # [K, G]
    cand_iou = ious.gather(0, cand)
    threshold = cand_iou.mean(0) + cand_iou.std(0)  # unbiased std, as MMDetection
    is_pos = cand_iou >= threshold[None]
    c = a_ctr[cand]  # [K, G, 2]
    sides = torch.stack([c[..., 0] - gt_boxes[None, :, 0], c[..., 1] - gt_boxes[None, :, 1],
                         gt_boxes[None, :, 2] - c[..., 0], gt_boxes[None, :, 3] - c[..., 1]], -1)
    is_pos &= sides.min(-1).values > 0.01
    # [G, N]: each GT's IoU with the anchors it is positive for, -inf elsewhere (a GT's candidates are distinct
    # anchors, so a plain scatter; no boolean-mask indexing, whose data-dependent shape would sync)
    masked = torch.full((g, n), float("-inf"), device=anchors.device)
    masked = masked.scatter(1, cand.t(), torch.where(is_pos, cand_iou, float("-inf")).t())
    best, arg = masked.t().max(1)  # highest IoU among the GTs the anchor is positive for
    return torch.where(best != float("-inf"), arg, assigned)


def centerness_target(anchors: Tensor, gt_boxes: Tensor) -> Tensor:
    """[P] sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b)) from the anchor centre to the GT sides."""
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    lr = torch.stack([ctr[:, 0] - gt_boxes[:, 0], gt_boxes[:, 2] - ctr[:, 0]], 1)
    tb = torch.stack([ctr[:, 1] - gt_boxes[:, 1], gt_boxes[:, 3] - ctr[:, 1]], 1)
    return torch.sqrt(lr.min(1).values / lr.max(1).values * (tb.min(1).values / tb.max(1).values))


class Scale(nn.Module):
    """A learnable scalar multiplier (one per level)."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(value, dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale


def _tower(channels: int, depth: int) -> nn.ModuleList:
    """``depth`` x (conv 3x3 without bias, GroupNorm, ReLU)."""
    return nn.ModuleList(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, bias=False),
                                       nn.GroupNorm(gn_groups(channels), channels), nn.ReLU(inplace=True))
                         for _ in range(depth))


class ATSSHead(nn.Module):
    """ATSS on the memory pyramid: towers, class / box / centerness convs, per-level scale, assigner and losses.

    Args:
        num_classes: K sigmoid logits (the host's class space; background = K).
        channels: C of the pyramid.
        strides: stride of every pyramid level (explicit, e.g. 8, 16, 32, 64, 128).
        stacked_convs: convs per tower (Co-DETR: 1).
        octave_base_scale: anchor side in strides (8).
        topk: ATSS candidates per level (9).
        focal_alpha, focal_gamma: focal-loss parameters (0.25, 2).
    """

    def __init__(self, num_classes: int, channels: int, strides: Sequence[int], stacked_convs: int = 1,
                 octave_base_scale: float = 8.0, topk: int = 9, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0) -> None:
        super().__init__()
        self.num_classes, self.strides = num_classes, list(strides)
        self.octave_base_scale, self.topk = octave_base_scale, topk
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.cls_convs, self.reg_convs = _tower(channels, stacked_convs), _tower(channels, stacked_convs)
        self.atss_cls = nn.Conv2d(channels, num_classes, 3, padding=1)
        self.atss_reg = nn.Conv2d(channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale(1.0) for _ in self.strides)
        self.coder = DeltaCoder((10.0, 10.0, 5.0, 5.0), bbox_xform_clip=WH_CLIP)  # stds (0.1, 0.1, 0.2, 0.2)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, std=0.01)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0.0)
        nn.init.constant_(self.atss_cls.bias, -math.log((1 - 0.01) / 0.01))

    def predict(self, feats: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """Pyramid -> class logits [B, S, K], deltas [B, S, 4], centerness logits [B, S] (levels concatenated)."""
        if len(feats) != len(self.strides):
            raise ValueError(f"ATSS was built for {len(self.strides)} levels, got {len(feats)}")
        cls, reg, ctr = [], [], []
        for x, scale in zip(feats, self.scales):
            c, r = x, x
            for conv in self.cls_convs:
                c = conv(c)
            for conv in self.reg_convs:
                r = conv(r)
            cls.append(self.atss_cls(c).flatten(2).transpose(1, 2))
            reg.append(scale(self.atss_reg(r)).flatten(2).transpose(1, 2))
            ctr.append(self.atss_centerness(r).flatten(1))
        return torch.cat(cls, 1).float(), torch.cat(reg, 1).float(), torch.cat(ctr, 1).float()

    def decode(self, deltas: Tensor, anchors: Tensor) -> Tensor:
        """[P, 4] deltas relative to [P, 4] xyxy anchors -> xyxy boxes (dw, dh clipped on both sides)."""
        lim = WH_CLIP * 5.0  # the coder divides dw, dh by their weight 5
        deltas = torch.cat([deltas[:, :2], deltas[:, 2:].clamp(min=-lim)], 1)
        return self.coder.decode_single(deltas, anchors)

    def targets(self, anchors: Tensor, idx: Tensor, per_level: list[int],
                target: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """One image: labels [S] (background K, also for invalid anchors) and GT boxes [S, 4] (zeros if none).

        ``idx``: the valid anchors (device), ``per_level``: their number per level (``valid_index``)."""
        labels = torch.full((anchors.shape[0],), self.num_classes, dtype=torch.long, device=anchors.device)
        boxes = anchors.new_zeros(anchors.shape)
        if target["labels"].numel() == 0:
            return labels, boxes
        assigned = atss_assign(anchors[idx], per_level, target["boxes"], self.topk)
        pos, gt = assigned >= 0, assigned.clamp(min=0)  # without boolean-mask indexing (a sync on a GPU)
        labels[idx] = torch.where(pos, target["labels"][gt], self.num_classes)
        boxes[idx] = torch.where(pos[:, None], target["boxes"][gt].to(boxes.dtype), 0.0)
        return labels, boxes

    def forward(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict[str, Tensor]]) -> AuxHeadOutput:
        """Losses and every anchor's assignment.

        Args:
            feats: pyramid maps [B, C, H_l, W_l] (one per stride).
            image_sizes: unpadded (h, w) pixels per image.
            targets: per image ``boxes`` [G, 4] xyxy pixels and ``labels`` [G] int64.
        """
        return run_stages([self.stages(feats, image_sizes, targets)])[0]

    def stages(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
               targets: Sequence[dict[str, Tensor]]) -> Generator[list[Tensor], list[Tensor], AuxHeadOutput]:
        """``forward`` as a staged computation (models/matcher.py ``run_stages``): the assignment (it needs only
        the anchors and the ground truth), one host copy of the positives, then the head and its losses (created
        after the copy, so that a staged R-CNN head's RoI pooling still precedes them in the graph)."""
        device = feats[0].device
        shapes = [tuple(f.shape[-2:]) for f in feats]
        per_level = level_anchors(shapes, self.strides, self.octave_base_scale, device)
        anchors = torch.cat(per_level)
        host = [valid_index(shapes, self.strides, s) for s in image_sizes]  # the valid anchors, from the sizes
        flags = np.zeros((len(image_sizes), anchors.shape[0]), dtype=bool)  # valid_flags of every image, one upload
        for b, (idx, _) in enumerate(host):
            flags[b, idx] = True
        valid = host_tensor_to(flags, torch.bool, device)  # [B, S]
        index = host_tensor_to(np.concatenate([h[0] for h in host]), torch.long, device)
        index = index.split([len(h[0]) for h in host])
        assigned = [self.targets(anchors, i, counts, t) for i, (_, counts), t in zip(index, host, targets)]
        labels = torch.stack([a[0] for a in assigned])  # [B, S]
        boxes = torch.stack([a[1] for a in assigned])  # [B, S, 4]
        pos = labels < self.num_classes
        # the positives on the host (one copy; also what the positive queries draw from): indexing with them in
        # the boolean mask's (row-major) order needs no data-dependent shape on the device
        host_pos = (yield [pos])[0].numpy()
        cls, reg, ctr = self.predict(feats)
        pos_b, pos_s = host_tensor_to(np.stack(np.nonzero(host_pos)), torch.long, device).unbind(0)
        pos_anchors = anchors[pos_s]
        ctr_target = centerness_target(pos_anchors, boxes[pos_b, pos_s])
        local = torch.stack([pos.sum(1).clamp(min=1).sum().float(), ctr_target.sum()])
        num_pos, ctr_sum = all_reduce_mean(local).unbind(0)  # one collective for both normalisers
        num_pos, ctr_sum = num_pos.clamp(min=1.0), ctr_sum.clamp(min=1.0)

        onehot = F.one_hot(labels, self.num_classes + 1)[..., :-1].to(cls.dtype)
        focal = sigmoid_focal_loss(cls, onehot, self.focal_alpha, self.focal_gamma, reduction="none")
        loss_cls = (focal * valid[..., None].to(focal.dtype)).sum() / num_pos
        if host_pos.any():
            decoded = self.decode(reg[pos_b, pos_s], pos_anchors)
            giou = giou_loss(decoded, boxes[pos_b, pos_s])
            loss_giou = (giou * ctr_target).sum() / ctr_sum
            loss_ctr = F.binary_cross_entropy_with_logits(ctr[pos_b, pos_s], ctr_target, reduction="sum") / num_pos
        else:  # still touch every parameter (DDP without find_unused_parameters)
            loss_giou, loss_ctr = reg.sum() * 0, ctr.sum() * 0
        coords = anchors[None].expand_as(boxes) * valid[..., None].to(anchors.dtype)  # invalid anchors: zeros
        return AuxHeadOutput(losses={"loss_atss_cls": loss_cls, "loss_atss_giou": loss_giou,
                                     "loss_atss_centerness": loss_ctr},
                             coords=list(coords.unbind(0)), labels=list(labels.unbind(0)),
                             box_targets=list(boxes.unbind(0)), feats=None, host_positive=list(host_pos))
