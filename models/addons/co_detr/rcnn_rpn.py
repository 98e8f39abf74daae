"""The RPN of Co-DETR's Faster R-CNN auxiliary head (specs/co_detr_od_detr.md §1.5 (a), MMDetection 2.x RPNHead).

Head: torchvision's ``RPNHead`` (3x3 conv + ReLU, 1x1 objectness, 1x1 deltas, N(0, 0.01) init, as MMDetection's).
Loss: sigmoid BCE on the sampled anchors and plain L1 on the positives' deltas (stds 1), both summed and divided
by the batch's sampled count (MMDetection counts max(#pos, 1) + max(#neg, 1) per image).
Proposals: per level the top ``pre_nms_top_n`` scores, decoded from detached deltas and clipped to the image,
boxes of zero width or height dropped, NMS per level, the best ``post_nms_top_n`` kept. On a GPU the NMS of
every image and level runs at once without reading anything on the host (util/nms.py, torchvision's arithmetic);
the proposals are padded to one size for the batch, with their counts on the device, so that the RoI head's
assignment needs no host read either.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops import batched_nms, clip_boxes_to_image

from util.box_ops import box_iou
from util.misc import host_tensor_to
from util.nms import MAX_PAIRS, segmented_nms

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

# The proposals' NMS: True = util.nms.segmented_nms (no host read), False = torchvision's, image by image (its
# CUDA kernel reads each image's overlap mask on the host); None = the device NMS on a GPU only.
# tools/gpu_paths.py sets True so that the CPU counts what a GPU runs.
DEVICE_NMS: bool | None = None
NMS_ROUNDS = 16  # the device NMS's fixed-point rounds to start with (random RPN candidates needed 10-12)


class RPNPass(NamedTuple):
    """A batch's RPN work before the host copy (``AuxRPN.prepare``)."""

    logits: Tensor  # [B, N] objectness of all anchors (in the graph)
    deltas: Tensor  # [B, N, 4]
    anchors: Tensor  # [N, 4]
    valid: list[np.ndarray]  # per image its valid anchors (host indices)
    gts: list[Tensor]  # per image its ground-truth boxes [G, 4]
    assigned: list[Tensor]  # per image the MaxIoU assignment of all anchors [N] (device; valid ones meaningful)
    boxes: Tensor  # [B, M, 4] the NMS candidates, level by level (detached)
    scores: Tensor  # [B, M]
    level_sizes: list[int]  # the candidates per level
    proposals: Tensor  # [B, P, 4] each image's proposals first, zeros after
    counts: Tensor  # [B] int64 each image's number of proposals (device)
    converged: Tensor  # [] bool: the device NMS reached its fixed point (always True for torchvision's)


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
        self.nms_rounds = NMS_ROUNDS  # fixed-point rounds of the device NMS (adapted by ``settle``)
        self._converged_steps = 0

    def anchors(self, feat_sizes: Sequence[tuple[int, int]]) -> list[Tensor]:
        """Per level [H_l * W_l * A, 4] anchors, xyxy pixels."""
        return [grid_anchors(getattr(self, f"base_anchors_{i}"), size, s)
                for i, (size, s) in enumerate(zip(feat_sizes, self.strides))]

    def forward(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict[str, Tensor]]) -> tuple[dict[str, Tensor], list[Tensor]]:
        """Losses and proposals (the R-CNN head runs ``prepare``, ``settle`` and ``sampled_loss`` itself, to share
        its one host copy).

        Args:
            feats: L maps [B, C, H_l, W_l], one per stride.
            image_sizes: B un-padded (h, w).
            targets: B dicts with "boxes" [G, 4] xyxy pixels.

        Returns:
            ``{"loss_rpn_cls", "loss_rpn_bbox"}`` (unweighted, normalised) and B detached proposal sets
            [P_b <= post_nms_top_n, 4] xyxy pixels, best score first.
        """
        rp = self.prepare(feats, image_sizes, targets)
        host = to_host(rp.assigned + [rp.converged])
        rp = self.settle(rp, bool(host[-1].numpy()))
        losses = self.sampled_loss(rp.logits, rp.deltas, rp.anchors, rp.valid, rp.gts, host[:-1])
        counts = to_host([rp.counts])[0].tolist()
        return losses, [rp.proposals[b, :n] for b, n in enumerate(counts)]

    def prepare(self, feats: Sequence[Tensor], image_sizes: Sequence[tuple[int, int]],
                targets: Sequence[dict[str, Tensor]]) -> RPNPass:
        """The batch's device work: the head, every image's anchor assignment, candidate boxes and proposals
        (padded to one size P for the batch, with their counts). Nothing is read on the host here (with the
        device NMS); ``settle`` then checks the NMS's convergence flag from the caller's host copy."""
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
        valid, gts, assigned = self.assign(level_anchors, sizes, image_sizes, targets)
        boxes, scores, level_sizes = self.batch_candidates([x.detach() for x in level_logits],
                                                           [x.detach() for x in level_deltas], level_anchors,
                                                           image_sizes)
        rp = RPNPass(torch.cat(level_logits, 1), torch.cat(level_deltas, 1), torch.cat(level_anchors), valid, gts,
                     assigned, boxes, scores, level_sizes, boxes.new_zeros(batch, 0, 4),
                     torch.zeros(batch, dtype=torch.int64, device=boxes.device),
                     torch.ones((), dtype=torch.bool, device=boxes.device))
        if use_device_nms(boxes):
            return self.device_proposals(rp)
        return self.exact_proposals(rp)

    def device_proposals(self, rp: RPNPass) -> RPNPass:
        """Proposals by ``util.nms.segmented_nms`` (every image and level at once, no host read): per image the
        kept boxes by score (stable, descending: torchvision's order), the best ``post_nms_top_n``."""
        keep, converged = segmented_nms(rp.boxes, rp.scores, nonempty(rp.boxes), rp.level_sizes, self.nms_iou,
                                        self.nms_rounds)
        size = self._padded_size(rp.boxes.shape[1])
        rank = torch.where(keep, rp.scores, -1.0).sort(dim=1, descending=True, stable=True).indices[:, :size]
        counts = keep.sum(1).clamp(max=size)
        proposals = rp.boxes.gather(1, rank[..., None].expand(-1, -1, 4))
        inside = torch.arange(size, device=counts.device)[None] < counts[:, None]
        proposals = torch.where(inside[..., None], proposals, 0.0)
        return rp._replace(proposals=proposals, counts=counts, converged=converged)

    def exact_proposals(self, rp: RPNPass) -> RPNPass:
        """Proposals by torchvision's ``batched_nms``, image by image, after one host copy of which boxes are
        non-empty (the CPU's path, and a GPU's when the device NMS did not converge: each NMS reads on the host
        there)."""
        ids = torch.cat([torch.full((n,), lvl, dtype=torch.int64, device=rp.boxes.device)
                         for lvl, n in enumerate(rp.level_sizes)])
        nonempty_host = to_host([nonempty(rp.boxes)])[0].numpy()
        found = [self.nms(box, score, ids, np.flatnonzero(keep))
                 for box, score, keep in zip(rp.boxes, rp.scores, nonempty_host)]
        size = self._padded_size(rp.boxes.shape[1])
        proposals = torch.stack([F.pad(p, (0, 0, 0, size - p.shape[0])) for p in found]) if found else rp.proposals
        counts = host_tensor_to([p.shape[0] for p in found], torch.long, rp.boxes.device)
        return rp._replace(proposals=proposals, counts=counts,
                           converged=torch.ones((), dtype=torch.bool, device=rp.boxes.device))

    def settle(self, rp: RPNPass, converged: bool) -> RPNPass:
        """``rp`` itself when its device NMS converged (the flag read on the host by the caller), else its exact
        proposals; the next steps then run twice as many fixed-point rounds (up to 64). After 100 converged steps
        in a row a raised count halves again (not below ``NMS_ROUNDS``), so that one deep step does not cost
        every later one."""
        if converged:
            self._converged_steps += 1
            if self._converged_steps >= 100 and self.nms_rounds > NMS_ROUNDS:
                self.nms_rounds, self._converged_steps = max(NMS_ROUNDS, self.nms_rounds // 2), 0
            return rp
        self._converged_steps = 0
        self.nms_rounds = min(2 * self.nms_rounds, 64)
        return self.exact_proposals(rp)

    def _padded_size(self, num_candidates: int) -> int:
        return max(0, min(num_candidates, self.post_nms_top_n))

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
        """Every image's MaxIoU assignment of its valid anchors, computed for the batch at once on the device
        (the ground truth padded to the batch's most; padding rows and invalid anchors take IoU -1, so that they
        neither match nor count in a ground truth's best IoU).

        Returns:
            per image: the valid anchors (host indices into all anchors, from the sizes), the ground-truth boxes,
            the assignment of ALL anchors [N] (0 negative, -1 ignored, k > 0 the k-th box; on the device; only its
            valid anchors' entries are the image's assignment).
        """
        anchors = torch.cat(level_anchors)
        device, batch = anchors.device, len(targets)
        valid = [valid_index(sizes, self.strides, image_sizes[b], self.num_anchors) for b in range(batch)]
        gts = [t["boxes"].to(anchors) for t in targets]
        most = max((g.shape[0] for g in gts), default=0)
        if most == 0 or anchors.shape[0] == 0:
            return valid, gts, list(torch.zeros(batch, anchors.shape[0], dtype=torch.int64, device=device))
        usable = np.zeros((batch, most + anchors.shape[0]), dtype=bool)  # per image: its real GT rows, valid anchors
        for b, (g, v) in enumerate(zip(gts, valid)):
            usable[b, :g.shape[0]] = True
            usable[b, most + v] = True
        usable = host_tensor_to(usable, torch.bool, device)
        padded = torch.stack([F.pad(g, (0, 0, 0, most - g.shape[0])) for g in gts])
        assigned = []
        per = max(1, MAX_PAIRS // (most * anchors.shape[0]))  # images at once: IoU temporaries <= 2^27 entries
        for i in range(0, batch, per):
            ious = box_iou(padded[i:i + per], anchors)[0]
            ious = ious.masked_fill(~(usable[i:i + per, :most, None] & usable[i:i + per, None, most:]), -1.0)
            assigned += list(max_iou_assign(ious, self.pos_iou, self.neg_iou, self.min_pos_iou,
                                            low_quality=True).unbind(0))
        return valid, gts, assigned

    def sampled_loss(self, logits: Tensor, deltas: Tensor, anchors: Tensor, valid: Sequence[np.ndarray],
                     gts: Sequence[Tensor], assigned: Sequence[Tensor]) -> dict[str, Tensor]:
        """The loss from the host copy of the assignments: MMDetection's sampling draws on the host, image by
        image, one upload of the sampled anchors.

        Args:
            anchors: [N, 4] all anchors; valid, gts: from ``assign``; assigned: its assignments (of all anchors),
                on the host.
        """
        picks = []  # per image: the sampled positive and negative anchors, each positive's ground truth
        for v, all_inds in zip(valid, assigned):
            gt_inds = all_inds.numpy()[v]  # the valid anchors' assignment
            pos, neg = random_sample_host(gt_inds, self.num_samples, self.pos_fraction)
            picks += [v[pos], v[neg], gt_inds[pos] - 1]
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

    def batch_candidates(self, logits: Sequence[Tensor], deltas: Sequence[Tensor], level_anchors: Sequence[Tensor],
                         image_sizes: Sequence[tuple[int, int]]) -> tuple[Tensor, Tensor, list[int]]:
        """``candidates`` of every image at once (bitwise: the same sort per row, the same elementwise arithmetic).

        Args:
            logits: per level [B, N_l]; deltas: per level [B, N_l, 4] (detached); level_anchors: per level [N_l, 4].

        Returns:
            boxes [B, M, 4] xyxy pixels, scores [B, M], and the candidates per level (M in all).
        """
        batch = len(image_sizes)
        scores, boxes, sizes = [], [], []
        for logit, delta, anchor in zip(logits, deltas, level_anchors):
            # the CPU's vectorised sigmoid rounds a tensor's tail differently: image by image there, as ``candidates``
            score = logit.sigmoid() if logit.device.type != "cpu" else torch.stack([x.sigmoid() for x in logit])
            if 0 < self.pre_nms_top_n < score.shape[1]:
                score, order = score.sort(dim=1, descending=True)
                score, order = score[:, :self.pre_nms_top_n], order[:, :self.pre_nms_top_n]
                delta, anchor = delta.gather(1, order[..., None].expand(-1, -1, 4)), anchor[order]
            else:
                anchor = anchor.expand(batch, -1, -1)
            scores.append(score)
            boxes.append(decode_deltas(self.coder, delta.reshape(-1, 4), anchor.reshape(-1, 4)).view(batch, -1, 4))
            sizes.append(score.shape[1])
        boxes = torch.cat(boxes, 1)
        # clip_boxes_to_image per image: x to [0, w], y to [0, h]
        limits = host_tensor_to([[w, h, w, h] for h, w in image_sizes], boxes.dtype, boxes.device)
        return torch.minimum(boxes.clamp(min=0), limits[:, None]), torch.cat(scores, 1), sizes

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
    """[..., M] bool: the xyxy boxes [..., M, 4] of positive width and height."""
    return (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])


def use_device_nms(boxes: Tensor) -> bool:
    """``DEVICE_NMS``, or (None) whether the boxes are on a GPU."""
    return boxes.is_cuda if DEVICE_NMS is None else DEVICE_NMS
