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
        losses = self.loss(torch.cat(level_logits, 1), torch.cat(level_deltas, 1), level_anchors, sizes,
                           image_sizes, targets)
        proposals = [self.proposals([x[b].detach() for x in level_logits], [x[b].detach() for x in level_deltas],
                                    level_anchors, image_sizes[b]) for b in range(batch)]
        return losses, proposals

    def loss(self, logits: Tensor, deltas: Tensor, level_anchors: Sequence[Tensor],
             sizes: Sequence[tuple[int, int]], image_sizes: Sequence[tuple[int, int]],
             targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """BCE and L1 over the anchors sampled per image, divided by the batch's sampled count.

        Args:
            logits: [B, N] objectness; deltas: [B, N, 4]; N = all anchors of all levels.
        """
        anchors = torch.cat(level_anchors)
        device = anchors.device
        # The valid anchors from the sizes (host), every image's assignment on the device, one copy of them all,
        # the sampling on the host (MMDetection's draws, image by image), one upload of the sampled anchors.
        valid = [valid_index(sizes, self.strides, image_sizes[b], self.num_anchors) for b in range(len(targets))]
        valid_dev = host_tensor_to(np.concatenate([np.zeros(0, np.int64), *valid]), torch.long, device)
        valid_dev = valid_dev.split([len(v) for v in valid])
        gts = [t["boxes"].to(anchors) for t in targets]
        assigned = to_host([max_iou_assign(box_iou(gt, anchors[idx]), self.pos_iou, self.neg_iou, self.min_pos_iou,
                                           low_quality=True) for gt, idx in zip(gts, valid_dev)])
        picks = []  # per image: the sampled positive and negative anchors, each positive's ground truth
        for v, gt_inds in zip(valid, assigned):
            pos, neg = random_sample_host(gt_inds.numpy(), self.num_samples, self.pos_fraction)
            picks += [v[pos], v[neg], gt_inds.numpy()[pos] - 1]
        flat = host_tensor_to(np.concatenate([np.zeros(0, np.int64), *picks]), torch.long, device)
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
        score, ids = torch.cat(scores), torch.cat(level_ids)
        box = clip_boxes_to_image(torch.cat(boxes), image_size)
        keep = ((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])).nonzero().squeeze(1)  # one sync, not three
        box, score, ids = box[keep], score[keep], ids[keep]
        keep = batched_nms(box, score, ids, self.nms_iou)[:self.post_nms_top_n]
        return box[keep]
