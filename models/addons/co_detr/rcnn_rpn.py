"""The RPN of Co-DETR's Faster R-CNN auxiliary head (specs/co_detr_od_detr.md §1.5 (a), MMDetection 2.x RPNHead).

Head: torchvision's ``RPNHead`` (3x3 conv + ReLU, 1x1 objectness, 1x1 deltas, N(0, 0.01) init, as MMDetection's).
Loss: sigmoid BCE on the sampled anchors and plain L1 on the positives' deltas (stds 1), both summed and divided
by the batch's sampled count (MMDetection counts max(#pos, 1) + max(#neg, 1) per image).
Proposals: per level the top ``pre_nms_top_n`` scores, decoded from detached deltas and clipped to the image,
boxes of zero width or height dropped, NMS per level, the best ``post_nms_top_n`` kept.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image

from util.misc import host_tensor_to

from ...matcher import to_host
from .rcnn_ops import (
    DELTA_CLIP,
    DeltaCoder,
    base_anchors,
    decode_deltas,
    grid_anchors,
    max_iou_assign,
    random_sample_host,
    valid_index,
)


class AuxRPN(nn.Module):
    """Region proposal network on every level of the memory pyramid.

    Args:
        in_channels: channels C of every level.
        strides: stride of each level in pixels (all pyramid levels).
        octave_base_scale, scales_per_octave, ratios: anchors (MMDetection AnchorGenerator).
        pos_iou, neg_iou, min_pos_iou: MaxIoU assignment with low-quality matching.
        num_samples, pos_fraction: anchors sampled per image.
        pre_nms_top_n, nms_iou, post_nms_top_n: proposals (per level, per level, per image).
    """

    def __init__(self, *, in_channels: int, strides: Sequence[int], octave_base_scale: float = 4,
                 scales_per_octave: int = 3, ratios: Sequence[float] = (0.5, 1.0, 2.0), pos_iou: float = 0.7,
                 neg_iou: float = 0.3, min_pos_iou: float = 0.3, num_samples: int = 256, pos_fraction: float = 0.5,
                 pre_nms_top_n: int = 4000, nms_iou: float = 0.7, post_nms_top_n: int = 1000) -> None:
        super().__init__()
        self.strides = tuple(int(s) for s in strides)
        for i, s in enumerate(self.strides):
            self.register_buffer(f"base_anchors_{i}", base_anchors(s, octave_base_scale, scales_per_octave, ratios),
                                 persistent=False)
        self.num_anchors = len(ratios) * scales_per_octave
        self.head = RPNHead(in_channels, self.num_anchors)
        self.coder = DeltaCoder(weights=(1.0, 1.0, 1.0, 1.0), bbox_xform_clip=DELTA_CLIP)
        self.pos_iou, self.neg_iou, self.min_pos_iou = pos_iou, neg_iou, min_pos_iou
        self.num_samples, self.pos_fraction = num_samples, pos_fraction
        self.pre_nms_top_n, self.nms_iou, self.post_nms_top_n = pre_nms_top_n, nms_iou, post_nms_top_n

    def anchors(self, feat_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Per level [H_l * W_l * A, 4] anchors, xyxy pixels."""
        return [grid_anchors(getattr(self, f"base_anchors_{i}"), size, s)
                for i, (size, s) in enumerate(zip(feat_sizes, self.strides))]

    def forward(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Losses and proposals.

        Args:
            feats: L maps [B, C, H_l, W_l], one per stride.
            image_sizes: B un-padded (h, w).
            targets: B dicts with "boxes" [G, 4] xyxy pixels.

        Returns:
            ``{"loss_rpn_cls", "loss_rpn_bbox"}`` (unweighted, normalised) and B detached proposal sets
            [P_b <= post_nms_top_n, 4] xyxy pixels, best score first.
        """
        if len(feats) != len(self.strides):
            raise ValueError(f"RPN: {len(feats)} feature levels for {len(self.strides)} strides {self.strides}")
        image_sizes = [(int(h), int(w)) for h, w in image_sizes]
        logits, deltas = self.head(list(feats))
        sizes = [tuple(f.shape[-2:]) for f in feats]
        batch = feats[0].shape[0]
        # [B, sum_l H_l W_l A] and [B, ..., 4]: location-major, then anchor (MMDetection's order)
        level_logits = [x.permute(0, 2, 3, 1).reshape(batch, -1).float() for x in logits]
        level_deltas = [x.permute(0, 2, 3, 1).reshape(batch, -1, 4).float() for x in deltas]
        level_anchors = self.anchors(sizes)
        # the device work of every image first (its anchors' assignment, its candidate boxes), then one host copy
        # of the assignments and of which candidates are non-empty, then the sampling, the loss and the NMS
        valid, gts, assigned = self.assign(level_anchors, sizes, image_sizes, targets)
        candidates = [self.candidates([x[b].detach() for x in level_logits], [x[b].detach() for x in level_deltas],
                                      level_anchors, image_sizes[b]) for b in range(batch)]
        host = to_host(assigned + [nonempty(box) for box, *_ in candidates])
        losses = self.sampled_loss(torch.cat(level_logits, 1), torch.cat(level_deltas, 1), torch.cat(level_anchors),
                                   valid, gts, host[:batch])
        proposals = [self.nms(*cand, np.flatnonzero(keep.numpy())) for cand, keep in zip(candidates, host[batch:])]
        return losses, proposals

    def loss(self, logits: Tensor, deltas: Tensor, level_anchors: Sequence[Tensor],
             sizes: Sequence[tuple[int, int]], image_sizes: Sequence[tuple[int, int]],
             targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """BCE and L1 over the anchors sampled per image, divided by the batch's sampled count.

        Args:
            logits: [B, N] objectness; deltas: [B, N, 4]; N = all anchors of all levels.
        """
        valid, gts, assigned = self.assign(level_anchors, sizes, image_sizes, targets)
        return self.sampled_loss(logits, deltas, torch.cat(level_anchors), valid, gts, to_host(assigned))

    def assign(self, level_anchors: Sequence[Tensor], sizes: Sequence[tuple[int, int]],
               image_sizes: Sequence[tuple[int, int]], targets: Sequence[dict[str, Tensor]]
               ) -> tuple[list[np.ndarray], list[Tensor], list[Tensor]]:
        """Every image's MaxIoU assignment of its valid anchors, on the device.

        Returns:
            per image: the valid anchors (host indices into all anchors, from the sizes), the ground-truth boxes,
            the assignment [n_valid] (0 negative, -1 ignored, k > 0 the k-th box; on the device).
        """
        anchors = torch.cat(level_anchors)
        device = anchors.device
        valid = [valid_index(sizes, self.strides, image_sizes[b], self.num_anchors) for b in range(len(targets))]
        valid_dev = host_tensor_to(np.concatenate([np.zeros(0, np.int64), *valid]), torch.long, device)
        valid_dev = valid_dev.split([len(v) for v in valid])
        gts = [t["boxes"].to(anchors) for t in targets]
        assigned = [max_iou_assign(box_iou(gt, anchors[idx]), self.pos_iou, self.neg_iou, self.min_pos_iou,
                                   low_quality=True) for gt, idx in zip(gts, valid_dev)]
        return valid, gts, assigned

    def sampled_loss(self, logits: Tensor, deltas: Tensor, anchors: Tensor, valid: Sequence[np.ndarray],
                     gts: Sequence[Tensor], assigned: Sequence[Tensor]) -> dict[str, Tensor]:
        """The loss from the host copy of the assignments: MMDetection's sampling draws on the host, image by
        image, one upload of the sampled anchors.

        Args:
            anchors: [N, 4] all anchors; valid, gts: from ``assign``; assigned: its assignments, on the host.
        """
        picks = []  # per image: the sampled positive and negative anchors, each positive's ground truth
        for v, gt_inds in zip(valid, assigned):
            pos, neg = random_sample_host(gt_inds.numpy(), self.num_samples, self.pos_fraction)
            picks += [v[pos], v[neg], gt_inds.numpy()[pos] - 1]
        flat = host_tensor_to(np.concatenate([np.zeros(0, np.int64), *picks]), torch.long, anchors.device)
        parts = iter(flat.split([len(p) for p in picks]))
        cls_sum, box_sum, count = logits.new_zeros(()), logits.new_zeros(()), 0
        for b, gt in enumerate(gts):
            pos_all, neg_all, matched = next(parts), next(parts), next(parts)
            count += max(pos_all.numel(), 1) + max(neg_all.numel(), 1)
            picked = logits[b, torch.cat([pos_all, neg_all])]
            labels = torch.cat([picked.new_ones(pos_all.numel()), picked.new_zeros(neg_all.numel())])
            cls_sum = cls_sum + F.binary_cross_entropy_with_logits(picked, labels, reduction="sum")
            box_targets = self.coder.encode_single(gt[matched], anchors[pos_all])
            box_sum = box_sum + (deltas[b, pos_all] - box_targets).abs().sum()
        return {"loss_rpn_cls": cls_sum / count, "loss_rpn_bbox": box_sum / count}

    def proposals(self, logits: Sequence[Tensor], deltas: Sequence[Tensor], level_anchors: Sequence[Tensor],
                  image_size: tuple[int, int]) -> Tensor:
        """One image's proposals: per level top-k, decode, clip, drop empty boxes, per-level NMS, top-n.

        Args:
            logits: per level [N_l]; deltas: per level [N_l, 4] (detached); level_anchors: per level [N_l, 4].

        Returns:
            [P, 4] xyxy pixels, sorted by score.
        """
        box, score, ids = self.candidates(logits, deltas, level_anchors, image_size)
        return self.nms(box, score, ids, np.flatnonzero(to_host([nonempty(box)])[0].numpy()))

    def candidates(self, logits: Sequence[Tensor], deltas: Sequence[Tensor], level_anchors: Sequence[Tensor],
                   image_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor]:
        """One image's boxes before the NMS: per level the top ``pre_nms_top_n`` scores, decoded and clipped.

        Returns:
            boxes [M, 4] xyxy pixels, their scores [M] and levels [M] (int64).
        """
        scores, boxes, level_ids = [], [], []
        for lvl, (logit, delta, anchor) in enumerate(zip(logits, deltas, level_anchors)):
            score = logit.sigmoid()
            if 0 < self.pre_nms_top_n < score.numel():
                score, order = score.sort(descending=True)
                score, order = score[:self.pre_nms_top_n], order[:self.pre_nms_top_n]
                delta, anchor = delta[order], anchor[order]
            scores.append(score)
            boxes.append(decode_deltas(self.coder, delta, anchor))
            level_ids.append(torch.full_like(score, lvl, dtype=torch.int64))
        return clip_boxes_to_image(torch.cat(boxes), image_size), torch.cat(scores), torch.cat(level_ids)

    def nms(self, box: Tensor, score: Tensor, ids: Tensor, keep: np.ndarray) -> Tensor:
        """The candidates ``keep`` (host indices: the non-empty boxes), NMS per level, the best ``post_nms_top_n``.

        Returns:
            [P, 4] xyxy pixels, sorted by score.
        """
        keep_dev = host_tensor_to(keep, torch.long, box.device)
        box, score, ids = box[keep_dev], score[keep_dev], ids[keep_dev]
        return box[batched_nms(box, score, ids, self.nms_iou)[:self.post_nms_top_n]]


def nonempty(boxes: Tensor) -> Tensor:
    """[M] bool: the xyxy boxes of positive width and height."""
    return (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
