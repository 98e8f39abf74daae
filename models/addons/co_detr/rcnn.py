"""Co-DETR's Faster R-CNN auxiliary head: RPN + RoI head on the encoder memory pyramid.

specs/co_detr_od_detr.md §1.5 (a) and (b), §1.6 (what the head exports), §1.11; official: Sense-X/Co-DETR
``CoStandardRoIHead`` with MMDetection 2.x ``RPNHead``, ``Shared2FCBBoxHead``, ``SingleRoIExtractor``.

Per batch:

1. RPN (``rcnn_rpn.AuxRPN``) on all pyramid levels: ``loss_rpn_cls``, ``loss_rpn_bbox`` and per image up to
   1000 detached proposals.
2. Per image: MaxIoU assignment of the proposals (0.5 / 0.5, no low-quality match), then the ground-truth boxes
   are put in front of the proposals (each assigned to itself) and 512 RoIs are sampled, at most 25 %
   positive; sampled RoIs are ordered positives first, each part by index.
   The device work of 1 and 2 comes first (on a GPU the proposals' NMS too, util/nms.py), then ONE host copy of
   the anchors' and the RoIs' assignments and the RoIs' pooling levels (``stages``; Co-DETR runs it in
   lock-step with ATSS's, so both heads share it), then the draws and everything else.
3. RoIAlign 7x7 (aligned, adaptive sampling) on the first ``num_roi_levels`` levels, the level picked by
   ``finest_scale``; box head flatten -> FC -> ReLU -> FC -> ReLU -> class scores [num_classes + 1] (softmax,
   background last) and class-specific deltas [num_classes * 4] (stds 0.1, 0.1, 0.2, 0.2).
4. ``loss_rcnn_cls``: softmax CE summed over the sampled RoIs / their count. ``loss_rcnn_giou``: 1 - GIoU of the
   decoded box of the assigned class against the matched ground truth, summed over positives / the count of
   ALL sampled RoIs of the batch (hence the official weight 10 x 12).
5. Export per image (``AuxHeadOutput``): the first n sampled RoIs, n = min over the batch of the sampled counts
   (capped at 2000): coords, labels (background = num_classes), matched ground-truth boxes (zeros for
   background) and the pooled feature averaged over the 7x7 grid (kept in the graph, as in the official code).

Random draws (``torch.randperm`` on the CPU global generator, only when a pool exceeds its quota), in this
order: for each image, RPN positives then RPN negatives; then for each image, RoI positives then negatives.

Losses are unweighted; the add-on's LossSpec applies the effective weights (official: 12 / 12 / 12 / 120).
An image without ground truth samples only negatives; every parameter still gets a gradient (an empty positive
set gives a zero-valued sum that stays in the graph).
"""
from __future__ import annotations

from typing import Generator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.faster_rcnn import TwoMLPHead

from util.box_ops import box_iou
from util.misc import host_tensor_to

from ...matcher import run_stages, to_host
from .common import AuxHeadOutput
from .rcnn_ops import (
    DELTA_CLIP,
    DeltaCoder,
    decode_deltas,
    giou_loss,
    map_roi_levels,
    max_iou_assign,
    multilevel_roi_align,
    random_sample_host,
)
from .rcnn_rpn import AuxRPN


class RCNNAuxHead(nn.Module):
    """Faster R-CNN (RPN + one RoI stage) as a Co-DETR auxiliary head.

    Args:
        in_channels: channels C of every pyramid level.
        num_classes: foreground classes; background is ``num_classes``.
        strides: strides of ALL pyramid levels the RPN sees (Co-Deformable (8, ..., 128), Co-DINO (4, ..., 128)).
        num_roi_levels: the RoI head pools from the first this-many levels (4 Co-Deformable, 5 Co-DINO).
        finest_scale: RoI level mapping scale (112 Co-Deformable, 56 Co-DINO).
        anchor_*, rpn_*: see ``AuxRPN`` (official defaults).
        roi_pos_iou, roi_neg_iou: RoI MaxIoU thresholds.
        roi_num_samples, roi_pos_fraction, roi_add_gt: RoI sampling.
        roi_output_size, roi_sampling_ratio: RoIAlign.
        fc_channels: width of the two FC layers.
        box_stds: delta stds of the box head.
        max_exported: cap of the exported RoIs per image (official 2000).
    """

    def __init__(self, *, in_channels: int, num_classes: int, strides: Sequence[int], num_roi_levels: int = 4,
                 finest_scale: float = 112, anchor_octave_base_scale: float = 4, anchor_scales_per_octave: int = 3,
                 anchor_ratios: Sequence[float] = (0.5, 1.0, 2.0), rpn_pos_iou: float = 0.7,
                 rpn_neg_iou: float = 0.3, rpn_min_pos_iou: float = 0.3, rpn_num_samples: int = 256,
                 rpn_pos_fraction: float = 0.5, rpn_pre_nms_top_n: int = 4000, rpn_nms_iou: float = 0.7,
                 rpn_post_nms_top_n: int = 1000, roi_pos_iou: float = 0.5, roi_neg_iou: float = 0.5,
                 roi_num_samples: int = 512, roi_pos_fraction: float = 0.25, roi_add_gt: bool = True,
                 roi_output_size: int = 7, roi_sampling_ratio: int = 0, fc_channels: int = 1024,
                 box_stds: Sequence[float] = (0.1, 0.1, 0.2, 0.2), max_exported: int = 2000) -> None:
        super().__init__()
        if not 1 <= num_roi_levels <= len(strides):
            raise ValueError(f"num_roi_levels={num_roi_levels} must be in [1, {len(strides)}] (strides {strides})")
        self.num_classes = num_classes
        self.strides = tuple(int(s) for s in strides)
        self.num_roi_levels, self.finest_scale = num_roi_levels, float(finest_scale)
        self.rpn = AuxRPN(in_channels=in_channels, strides=strides, octave_base_scale=anchor_octave_base_scale,
                          scales_per_octave=anchor_scales_per_octave, ratios=anchor_ratios, pos_iou=rpn_pos_iou,
                          neg_iou=rpn_neg_iou, min_pos_iou=rpn_min_pos_iou, num_samples=rpn_num_samples,
                          pos_fraction=rpn_pos_fraction, pre_nms_top_n=rpn_pre_nms_top_n, nms_iou=rpn_nms_iou,
                          post_nms_top_n=rpn_post_nms_top_n)
        self.roi_pos_iou, self.roi_neg_iou = roi_pos_iou, roi_neg_iou
        self.roi_num_samples, self.roi_pos_fraction, self.roi_add_gt = roi_num_samples, roi_pos_fraction, roi_add_gt
        self.roi_output_size, self.roi_sampling_ratio = roi_output_size, roi_sampling_ratio
        self.max_exported = max_exported
        self.box_head = TwoMLPHead(in_channels * roi_output_size ** 2, fc_channels)
        self.cls_score = nn.Linear(fc_channels, num_classes + 1)
        self.bbox_pred = nn.Linear(fc_channels, num_classes * 4)
        self.box_coder = DeltaCoder(weights=tuple(1.0 / s for s in box_stds), bbox_xform_clip=DELTA_CLIP)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """MMDetection's init: shared FCs Xavier-uniform, class scores N(0, 0.01), deltas N(0, 0.001), biases 0."""
        for fc in (self.box_head.fc6, self.box_head.fc7):
            nn.init.xavier_uniform_(fc.weight)
            nn.init.zeros_(fc.bias)
        for fc, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(fc.weight, std=std)
            nn.init.zeros_(fc.bias)

    def sample_rois(self, proposals: Tensor, gt_boxes: Tensor, gt_labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One image's RoI assignment and sampling (MMDetection MaxIoUAssigner + RandomSampler, GT added).

        Args:
            proposals: [P, 4]; gt_boxes: [G, 4] xyxy pixels; gt_labels: [G] int64.

        Returns:
            rois [N, 4], labels [N] (background = num_classes), matched ground-truth boxes [N, 4] (zeros for
            background); positives first.
        """
        rois, labels, targets, _ = self.sample_batch([proposals], [{"boxes": gt_boxes, "labels": gt_labels}])[0]
        return rois, labels, targets

    def sample_batch(self, proposals: Sequence[Tensor], targets: Sequence[dict[str, Tensor]]
                     ) -> list[tuple[Tensor, Tensor, Tensor, int]]:
        """``sample_rois`` of every image with one host copy: each image's assignment on the device, one copy of
        them all, MMDetection's sampling on the host (its draws, image by image, in the same order), one upload.
        Also returns each image's number of positives (its first rows)."""
        size = max((p.shape[0] for p in proposals), default=0)
        padded = torch.stack([F.pad(p, (0, 0, 0, size - p.shape[0])) for p in proposals])
        counts = host_tensor_to([p.shape[0] for p in proposals], torch.long, padded.device)
        images = self.assign_rois(padded, counts, targets)
        return [s[:4] for s in self.sample_assigned(images, to_host([im[3] for im in images]))]

    def assign_rois(self, proposals: Tensor, counts: Tensor, targets: Sequence[dict[str, Tensor]]
                    ) -> list[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]:
        """Every image's RoI assignment, computed for the batch at once on the device; per image (boxes: the
        ground truth then the proposals, gt_boxes, gt_labels, assignment [G + P], pooling level of every box
        [G + P]: ``map_roi_levels`` before the sampling, so that the host reads the sampled RoIs' levels from the
        assignment's copy).

        Args:
            proposals: [B, P, 4]; counts: [B] (device): each image's first ``counts[b]`` rows are its proposals,
                the rest padding, assigned -1 (ignored: no draw sees them).
        """
        batch, size = proposals.shape[:2]
        device = proposals.device
        gts = [t["boxes"].to(proposals) for t in targets]
        most = max((g.shape[0] for g in gts), default=0)
        assigned = torch.zeros(batch, size, dtype=torch.int64, device=device)
        if most and size:  # ground truth padded to the batch's most; its padding rows never match (IoU -1)
            real = host_tensor_to([[k < g.shape[0] for k in range(most)] for g in gts], torch.bool, device)
            ious = box_iou(torch.stack([F.pad(g, (0, 0, 0, most - g.shape[0])) for g in gts]), proposals)[0]
            assigned = max_iou_assign(ious.masked_fill(~real[..., None], -1.0), self.roi_pos_iou, self.roi_neg_iou,
                                      self.roi_pos_iou, low_quality=False)
        assigned = torch.where(torch.arange(size, device=device)[None] < counts[:, None], assigned, -1)
        levels = map_roi_levels(proposals.reshape(-1, 4), self.num_roi_levels, self.finest_scale).view(batch, size)
        gt_levels = map_roi_levels(torch.cat(gts), self.num_roi_levels, self.finest_scale).split(
            [g.shape[0] for g in gts]) if gts else []
        images = []
        for b, (gt_boxes, t) in enumerate(zip(gts, targets)):
            boxes, gt_inds, box_levels = proposals[b], assigned[b], levels[b]
            if self.roi_add_gt and gt_boxes.shape[0] > 0:
                boxes = torch.cat([gt_boxes, boxes])
                gt_inds = torch.cat([torch.arange(1, gt_boxes.shape[0] + 1, device=device), gt_inds])
                box_levels = torch.cat([gt_levels[b], box_levels])
            images.append((boxes, gt_boxes, t["labels"].to(device), gt_inds, box_levels))
        return images

    def sample_assigned(self, images: Sequence[tuple[Tensor, ...]], host: Sequence[Tensor]
                        ) -> list[tuple[Tensor, Tensor, Tensor, int, np.ndarray]]:
        """MMDetection's sampling of ``assign_rois``' images from the host copies of their assignments (the draws,
        image by image), one upload; per image (rois, labels, box targets, number of positives, the sampled
        rows of its boxes on the host)."""
        picks = []
        for gt_inds in host:
            pos, neg = random_sample_host(gt_inds.numpy(), self.roi_num_samples, self.roi_pos_fraction)
            picks += [pos, neg, gt_inds.numpy()[pos] - 1]
        device = images[0][0].device if len(images) else torch.device("cpu")
        flat = host_tensor_to(np.concatenate([np.zeros(0, np.int64), *picks]), torch.long, device)
        parts = iter(flat.split([len(p) for p in picks]))
        out = []
        for k, (boxes, gt_boxes, gt_labels, *_) in enumerate(images):
            pos, neg, matched = next(parts), next(parts), next(parts)
            labels = torch.cat([gt_labels[matched], gt_labels.new_full((neg.numel(),), self.num_classes)])
            box_targets = torch.cat([gt_boxes[matched], boxes.new_zeros(neg.numel(), 4)])
            rows = np.concatenate([picks[3 * k], picks[3 * k + 1]])
            out.append((torch.cat([boxes[pos], boxes[neg]]), labels, box_targets, pos.numel(), rows))
        return out

    def roi_loss(self, class_logits: Tensor, box_deltas: Tensor, rois: Tensor, labels: Tensor,
                 targets: Tensor, pos: Tensor | None = None) -> dict[str, Tensor]:
        """Softmax CE over all sampled RoIs and GIoU of the positives' class-specific boxes, both / RoI count.

        Args:
            class_logits: [N, num_classes + 1]; box_deltas: [N, num_classes * 4]; rois: [N, 4] xyxy;
            labels: [N]; targets: [N, 4] xyxy pixels.
            pos: the positive rows, ascending (None: found from the labels, a host-device sync).
        """
        count = max(rois.shape[0], 1)
        loss_cls = F.cross_entropy(class_logits, labels, reduction="sum") / count
        if pos is None:
            pos = torch.nonzero(labels < self.num_classes).reshape(-1)
        if pos.numel() == 0:
            return {"loss_rcnn_cls": loss_cls, "loss_rcnn_giou": box_deltas[pos].sum()}
        deltas = box_deltas[pos].reshape(pos.numel(), -1, 4)[torch.arange(pos.numel(), device=pos.device), labels[pos]]
        boxes = decode_deltas(self.box_coder, deltas, rois[pos])
        loss_giou = giou_loss(boxes, targets[pos]).sum() / count
        return {"loss_rcnn_cls": loss_cls, "loss_rcnn_giou": loss_giou}

    def forward(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict[str, Tensor]]) -> AuxHeadOutput:
        """RPN and RoI losses plus the sampled RoIs per image (``stages`` run alone).

        Args:
            feats: all pyramid levels [B, C, H_l, W_l], one per stride.
            image_sizes: B un-padded (h, w) in pixels.
            targets: B dicts, "boxes" [G, 4] xyxy pixels and "labels" [G] int64 in [0, num_classes).

        Returns:
            ``AuxHeadOutput``: losses ``loss_rpn_cls``, ``loss_rpn_bbox``, ``loss_rcnn_cls``, ``loss_rcnn_giou``
            (unweighted); per image coords [n, 4], labels [n], box_targets [n, 4], feats [n, C] with
            n = min(max_exported, min over the batch of the sampled RoI count).
        """
        return run_stages([self.stages(feats, image_sizes, targets)])[0]

    def stages(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
               targets: Sequence[dict[str, Tensor]]) -> Generator[list[Tensor], list[Tensor], AuxHeadOutput]:
        """``forward`` as a staged computation (models/matcher.py ``run_stages``): the RPN, its proposals and both
        assignments on the device, ONE host copy of the anchors' and the RoIs' assignments (with the device NMS's
        convergence flag), then the draws (RPN's, then the RoIs', image by image), the losses and the export."""
        if len(image_sizes) != feats[0].shape[0] or len(targets) != feats[0].shape[0]:
            raise ValueError(f"RCNN head: batch of {feats[0].shape[0]} maps, {len(image_sizes)} image sizes, "
                             f"{len(targets)} targets")
        batch = len(targets)
        rp = self.rpn.prepare(feats, image_sizes, targets)
        images = self.assign_rois(rp.proposals, rp.counts, targets)
        host = yield rp.assigned + [im[3] for im in images] + [im[4] for im in images] + [rp.converged]
        rpn_host, roi_host, level_host = host[:batch], host[batch:2 * batch], host[2 * batch:3 * batch]
        converged = bool(host[-1].numpy())
        rp = self.rpn.settle(rp, converged)
        if not converged:  # the device NMS needed more rounds: the exact proposals, their own copy
            images = self.assign_rois(rp.proposals, rp.counts, targets)
            again = to_host([im[3] for im in images] + [im[4] for im in images])
            roi_host, level_host = again[:batch], again[batch:]
        losses = self.rpn.sampled_loss(rp.logits, rp.deltas, rp.anchors, rp.valid, rp.gts, rpn_host)
        samples = self.sample_assigned(images, roi_host)
        roi_levels = np.concatenate([np.zeros(0, np.int64)] + [h.numpy()[s[4]] for h, s in zip(level_host, samples)])
        counts = [s[0].shape[0] for s in samples]
        rois = torch.cat([s[0] for s in samples])
        labels, box_targets = torch.cat([s[1] for s in samples]), torch.cat([s[2] for s in samples])
        starts = np.cumsum([0] + counts[:-1])
        pos = host_tensor_to(np.concatenate([np.zeros(0, np.int64)] + [start + np.arange(s[3])
                                            for start, s in zip(starts, samples)]), torch.long, rois.device)
        batch_idx = host_tensor_to(np.repeat(np.arange(len(samples)), counts), torch.long, rois.device)
        levels = self.num_roi_levels
        pooled = multilevel_roi_align(list(feats[:levels]), torch.cat([batch_idx[:, None].to(rois), rois], 1),
                                      self.strides[:levels], self.finest_scale, self.roi_output_size,
                                      self.roi_sampling_ratio, roi_levels)
        hidden = self.box_head(pooled)
        class_logits, box_deltas = self.cls_score(hidden).float(), self.bbox_pred(hidden).float()
        losses.update(self.roi_loss(class_logits, box_deltas, rois, labels, box_targets, pos))
        if rois.shape[0] == 0:  # no proposal and no ground truth anywhere: keep every parameter in the graph
            touch = sum(p.sum() for p in self.parameters()) * 0.0
            losses = {k: v + touch for k, v in losses.items()}
        n = min([self.max_exported] + counts)
        mean_feats = pooled.mean(dim=(-2, -1)).split(counts)
        split = [x.split(counts) for x in (rois, labels, box_targets)]
        positive = [np.arange(n) < s[3] for s in samples]  # each image's positives are its first rows
        return AuxHeadOutput(losses=losses, coords=[x[:n] for x in split[0]], labels=[x[:n] for x in split[1]],
                             box_targets=[x[:n] for x in split[2]], feats=[x[:n] for x in mean_feats],
                             host_positive=positive)
