"""OD-DETR's losses and assignments (models/addons/od.py uses them): matching distillation, prediction
distillation, and the choice of the teacher's stage queries for the auxiliary group.

specs/co_detr_od_detr.md §2.3. The paper's code was never published and its full text could not be read:
the mechanisms are the paper's (abstract), every formula below is this project's reading of it (the spec's
[INFERRED] items). Boxes are normalised (cx, cy, w, h) unless a name says ``xyxy``.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from util.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from util.misc import get_world_size, host_tensor_to, is_dist_avail_and_initialized

from ..matcher import HungarianMatcher, Matched, Stages, lockstep, run_stages, to_host
from .base import Indices, loss_key

Layer = Mapping[str, Tensor]  # one decoder layer's ``pred_logits`` [B, N, K] and ``pred_boxes`` [B, N, 4]


def elementwise_iou(boxes1: Tensor, boxes2: Tensor) -> Tensor:
    """IoU of matched pairs of xyxy boxes: [N, 4], [N, 4] -> [N] (0 for empty boxes)."""
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(-1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(-1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(-1)
    return inter / (area1 + area2 - inter).clamp(min=torch.finfo(inter.dtype).tiny)


def quality_targets(shape: Sequence[int], batch_idx: Tensor, query_idx: Tensor, labels: Tensor,
                    quality: Tensor) -> Tensor:
    """Soft class targets [B, N, K]: y[b, q, c] = the largest ``quality`` among the pairs of query (b, q) with a
    target of class c; 0 where the query has no target of that class.

    Args:
        shape: (B, N, K); batch_idx, query_idx, labels, quality: [P], one entry per (query, target) pair.
    """
    b, n, k = shape
    flat = torch.zeros(b * n * k, dtype=quality.dtype, device=quality.device)
    if quality.numel():
        flat = flat.scatter_reduce(0, (batch_idx * n + query_idx) * k + labels, quality, "amax")
    return flat.view(b, n, k)


def multi_target_qfl(logits: Tensor, soft_targets: Tensor, beta: float = 2.0, valid: Tensor | None = None) -> Tensor:
    """Multi-target quality focal loss, summed over queries and classes: BCE(sigmoid(z), y) * |y - sigmoid(z)|^beta.

    Generalises QFL (GFL, Li et al. 2020) to a query with several targets: ``soft_targets`` holds, per class, the
    best quality among the query's targets of that class (``quality_targets``). No alpha balancing.

    Args:
        logits: [B, N, K]; soft_targets: [B, N, K] in [0, 1]; valid: [B, N] bool (False: no loss), or None.
    """
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")
    loss = loss * (soft_targets - prob).abs().pow(beta)
    if valid is not None:
        loss = loss * valid.unsqueeze(-1).to(loss.dtype)
    return loss.sum()


def _mean_over_ranks(count: Tensor) -> Tensor:
    """A count averaged over processes (one all-reduce when distributed), at least 1."""
    if is_dist_avail_and_initialized():
        count = count.clone()
        dist.all_reduce(count)
    return torch.clamp(count / get_world_size(), min=1)


def _flat_pairs(pairs: Indices, targets: Sequence[Mapping[str, Tensor]],
                device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image (query, target) pairs -> flat device (image, query, target in the targets concatenated over
    images) [P], without a sync: the criterion's ``Matched`` holds them already; host pairs (the Hungarian
    matcher's, and their unions and differences below) are flattened with numpy and uploaded in one non-blocking
    copy (indexing a device tensor with a host index would wait for the device)."""
    if isinstance(pairs, Matched):
        return pairs.batch_idx, pairs.src_idx, pairs.tgt_idx
    lengths = np.array([len(t["labels"]) for t in targets], dtype=np.int64)
    offsets = np.cumsum(lengths) - lengths
    if all(s.device.type == "cpu" and t.device.type == "cpu" for s, t in pairs):
        src = [s.numpy().astype(np.int64, copy=False) for s, _ in pairs]
        tgt = [t.numpy().astype(np.int64, copy=False) for _, t in pairs]
        batch = np.repeat(np.arange(len(pairs), dtype=np.int64), [len(x) for x in src])
        src_all, tgt_all = (np.concatenate([np.zeros(0, np.int64), *xs]) for xs in (src, tgt))
        rows = host_tensor_to(np.stack([batch, src_all, tgt_all + offsets[batch]]), torch.long, device)
        return rows[0], rows[1], rows[2]
    empty = [torch.zeros(0, dtype=torch.long, device=device)]
    batch = torch.cat(empty + [torch.full_like(src, b).to(device) for b, (src, _) in enumerate(pairs)])
    tgt = torch.cat(empty + [t.to(device) + int(o) for (_, t), o in zip(pairs, offsets)])
    return batch, torch.cat(empty + [src.to(device) for src, _ in pairs]), tgt


def _gather(targets: Sequence[Mapping[str, Tensor]], key: str, index: Tensor) -> Tensor:
    """``targets[b][key][j]`` of every pair from ``_flat_pairs``' flat target index (one gather)."""
    return torch.cat([t[key] for t in targets]).to(index.device)[index]


def union_pairs(own: Indices, teacher: Indices, num_queries: int) -> Indices:
    """Per image the union of two assignments: each (query, target) pair once (own pairs first, each set in its
    order). Host index tensors in and out (numpy: no device work, no sync)."""
    out = []
    for (s1, t1), (s2, t2) in zip(own, teacher):
        src, tgt = np.concatenate([s1.numpy(), s2.numpy()]), np.concatenate([t1.numpy(), t2.numpy()])
        keep = np.sort(np.unique(tgt * num_queries + src, return_index=True)[1])  # first occurrences, in order
        out.append((torch.from_numpy(src[keep]), torch.from_numpy(tgt[keep])))
    return out


def differing_pairs(own: Indices, teacher: Indices, num_queries: int) -> Indices:
    """Per image the teacher's pairs (query i, target sigma_T(i)) whose query the student matched elsewhere or not.
    Host index tensors in and out (numpy)."""
    out = []
    for (s1, t1), (s2, t2) in zip(own, teacher):
        own_target = np.full(num_queries, -1, dtype=np.int64)
        own_target[s1.numpy()] = t1.numpy()
        s2, t2 = s2.numpy(), t2.numpy()
        keep = own_target[s2] != t2
        out.append((torch.from_numpy(s2[keep]), torch.from_numpy(t2[keep])))
    return out


class TeacherGuidedMatcher:
    """Matching distillation's assigner of one supervised group at one step (spec §2.3.1).

    The criterion calls it once per decoder layer with that layer's student outputs. It matches the student
    itself (sigma_S, the criterion's Hungarian matcher) and the teacher's predictions on the corresponding
    queries (sigma_T, the same matcher), and returns the pairs the box loss uses: sigma_S (``box_mode`` "both"
    or "student", so the box terms equal the baseline's) or sigma_T ("teacher"). Its ``label_loss`` replaces the
    group's focal loss by the multi-target quality focal loss on the union of both assignments;
    ``teacher_box_losses`` gives the extra box terms toward sigma_T where it differs from sigma_S ("both").

    Args:
        hungarian: the criterion's matcher (same costs).
        layers: per student layer, in the criterion's order (last, then aux 0..L-2): (the layer's ``pred_logits``
            tensor, which identifies it, the teacher's predictions for the same queries at the paired layer).
        names: the layers' key indices (None for the last layer, 0.. for aux layers).
        box_mode: "both", "student" or "teacher".
        beta: the quality focal loss exponent.
    """

    def __init__(self, hungarian: HungarianMatcher, layers: Sequence[tuple[Tensor, Layer]],
                 names: Sequence[int | None], box_mode: str = "both", beta: float = 2.0) -> None:
        self.hungarian, self.layers, self.names = hungarian, list(layers), list(names)
        self.box_mode, self.beta = box_mode, beta
        self.own: dict[int, Indices] = {}
        self.teacher: dict[int, Indices] = {}
        self.outputs: dict[int, Mapping[str, Tensor]] = {}
        self.num_boxes: Tensor | None = None

    def _layer(self, outputs: Mapping[str, Tensor]) -> int:
        for i, (logits, _) in enumerate(self.layers):
            if logits is outputs["pred_logits"]:
                return i
        raise KeyError("TeacherGuidedMatcher: these outputs are not a layer of the group it was made for")

    def __call__(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Indices:
        return run_stages([self.stages(outputs, targets)])[0]

    def stages(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]]) -> Stages:
        """Staged (models/matcher.py): the student's and the teacher's Hungarian matching of this layer in
        lock-step, so that the criterion's one copy serves them with every other group's and layer's."""
        i = self._layer(outputs)
        own, teacher = yield from lockstep([self.hungarian.stages(outputs, targets),
                                             self.hungarian.stages(self.layers[i][1], targets)])
        self.own[i], self.teacher[i], self.outputs[i] = own, teacher, outputs
        return teacher if self.box_mode == "teacher" else own

    def label_loss(self, outputs: Mapping[str, Tensor], targets: Sequence[Mapping[str, Tensor]], indices: Indices,
                   num_boxes: Tensor, log: bool = False, valid: Tensor | None = None) -> dict[str, Tensor]:
        """``loss_ce``: the multi-target QFL of this layer, normalised by the number of (query, target) pairs
        (all-reduced); soft targets are the IoU of the detached predicted box with each target. ``class_error``
        (``log``) as SetCriterion's, on ``indices``."""
        i = self._layer(outputs)
        self.num_boxes = num_boxes
        logits = outputs["pred_logits"].float()
        pairs = union_pairs(self.own[i], self.teacher[i], logits.shape[1])
        batch_idx, query_idx, tgt_idx = _flat_pairs(pairs, targets, logits.device)
        labels = _gather(targets, "labels", tgt_idx)
        gt = _gather(targets, "boxes", tgt_idx).float()
        pred = outputs["pred_boxes"][batch_idx, query_idx].detach().float()
        iou = elementwise_iou(box_cxcywh_to_xyxy(pred), box_cxcywh_to_xyxy(gt))
        soft = quality_targets(logits.shape, batch_idx, query_idx, labels, iou)
        count = _mean_over_ranks(host_tensor_to(float(query_idx.numel()), torch.float, logits.device))
        losses = {"loss_ce": multi_target_qfl(logits, soft, self.beta, valid) / count}
        if log:
            src = _flat_pairs(indices, targets, logits.device)
            matched = logits[src[0], src[1]]
            target = _gather(targets, "labels", src[2])
            acc = ((matched.argmax(-1) == target).float().mean() * 100 if matched.numel()
                   else torch.zeros((), device=logits.device))
            losses["class_error"] = 100 - acc
        return losses

    def teacher_box_losses(self, targets: Sequence[Mapping[str, Tensor]], suffix: str) -> dict[str, Tensor]:
        """L1 and GIoU toward sigma_T(i) for the queries whose sigma_T differs from sigma_S (keys ``suffix``),
        normalised like the group's box terms (its all-reduced box count); every matched layer."""
        losses: dict[str, Tensor] = {}
        for i, name in enumerate(self.names):
            if i not in self.outputs:
                continue
            boxes = self.outputs[i]["pred_boxes"]
            pairs = differing_pairs(self.own[i], self.teacher[i], boxes.shape[1])
            batch_idx, query_idx, tgt_idx = _flat_pairs(pairs, targets, boxes.device)
            src = boxes[batch_idx, query_idx].float()
            gt = _gather(targets, "boxes", tgt_idx).float()
            norm = self.num_boxes if self.num_boxes is not None else torch.ones((), device=boxes.device)
            giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(gt))
            losses[loss_key("loss_bbox", name, suffix)] = F.l1_loss(src, gt, reduction="sum") / norm
            losses[loss_key("loss_giou", name, suffix)] = (1 - giou).sum() / norm
        return losses


BY_MASK: bool | None = None  # prediction_distillation's default path (None: by device; the sync and op counters
# of tools/ set True to count what a GPU step does)


def prediction_distillation(student: Layer, teacher: Layer, threshold: float,
                            by_mask: bool | None = None) -> dict[str, Tensor]:
    """Pull the student's predictions on the teacher's initial queries toward the teacher's (spec §2.3.2).

    ``loss_ce``: BCE(sigmoid(z_S), sigmoid(z_T)) summed over classes, averaged over queries;
    ``loss_bbox`` / ``loss_giou``: L1 (summed over the 4 coordinates) and 1 - GIoU to the teacher's box,
    averaged over the queries whose best teacher score exceeds ``threshold`` (0 when there is none).

    ``by_mask`` (default ``BY_MASK``, None: on a GPU): the box terms over every query with the others' terms made
    exactly 0 (both boxes replaced by one fixed box), instead of selecting the kept queries with a boolean mask,
    whose data-dependent shape is a host-device sync per layer. The same terms, summed in another order; the CPU
    keeps the selection (its previous results bitwise).

    Args:
        student, teacher: ``pred_logits`` [B, N, K] and ``pred_boxes`` [B, N, 4] of the same queries.
    """
    zs, zt = student["pred_logits"].float(), teacher["pred_logits"].float()
    pt = zt.sigmoid()
    ce = F.binary_cross_entropy_with_logits(zs, pt, reduction="none").sum(-1).mean()
    keep = pt.max(-1).values > threshold
    count = keep.sum().clamp(min=1)
    by_mask = BY_MASK if by_mask is None else by_mask
    if by_mask if by_mask is not None else keep.device.type != "cpu":
        bs, bt = student["pred_boxes"].float().flatten(0, 1), teacher["pred_boxes"].float().flatten(0, 1)
        kept = keep.flatten()[:, None]
        # dropped pairs become the valid box (0.5, 0.5, 0.5, 0.5) on both sides: L1 0 and GIoU 1 exactly (a number,
        # not new_tensor: that would be a blocking upload on a GPU)
        bs, bt = torch.where(kept, bs, 0.5), torch.where(kept, bt, 0.5)
    else:
        bs, bt = student["pred_boxes"][keep].float(), teacher["pred_boxes"][keep].float()
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(bs), box_cxcywh_to_xyxy(bt))
    return {"loss_ce": ce, "loss_bbox": (bs - bt).abs().sum() / count, "loss_giou": (1 - giou).sum() / count}


def select_stage_queries(cost: Tensor, k: int, shared: bool = False) -> Tensor:
    """The k lowest-cost candidates of every target (spec §2.3.3): [G, k] candidate indices, in the order taken.

    Without ``shared`` a candidate serves one target only, unless there are too few (fewer than k * G): pairs
    are taken in increasing cost, each target until it has k, each candidate once; a target still short
    then takes its best remaining candidates even if another target has them. With ``shared`` every
    target simply takes its k best (two targets may pick the same candidate).

    One image; ``OnlineDistillation.aux_group`` runs the parts for all images with one copy: ``stage_query_parts``
    on the device, ``finish_stage_queries`` on the host.

    Args:
        cost: [M, G] matching cost of M candidates (teacher queries of every stage) against G targets.
        k: candidates per target (capped at M).
    """
    m, g = cost.shape
    parts = stage_query_parts(cost, k, shared)
    if shared or not parts:
        return parts[0] if parts else torch.zeros(g, min(k, m), dtype=torch.long, device=cost.device)
    return host_tensor_to(finish_stage_queries(to_host(parts), g, min(k, m)), torch.long, cost.device)


def stage_query_parts(cost: Tensor, k: int, shared: bool = False) -> list[Tensor]:
    """``select_stage_queries``' device work for one image (no sync): with ``shared`` the answer itself ([G, k]);
    otherwise what the host needs: the ``k * G`` best costs and candidates of every target (fewer when M is
    smaller) and, when there are fewer than k * G candidates (some target must then share), every target's full
    ranking. Empty when G or k is 0."""
    m, g = cost.shape
    k = min(k, m)
    if g == 0 or k == 0:
        return []
    if shared:
        return [cost.topk(k, dim=0, largest=False).indices.T]
    depth = min(m, k * g)  # a target can lose at most k * (g - 1) of its best candidates to the others
    values, cands = cost.topk(depth, dim=0, largest=False)  # [depth, G], ascending per target
    if m < k * g:  # too few candidates: the greedy below cannot fill every target
        return [values, cands, cost.argsort(dim=0, stable=True).T]
    return [values, cands]


def finish_stage_queries(host: Sequence[Tensor], g: int, k: int) -> np.ndarray:
    """``select_stage_queries`` without ``shared`` on the host (numpy) from ``stage_query_parts``' host copies:
    [G, k] int64 picks (k already capped at M)."""
    values, cands = host[0].numpy(), host[1].numpy()
    order = np.argsort(values.ravel(), kind="stable")
    flat_cands = cands.ravel()
    picks: list[list[int]] = [[] for _ in range(g)]
    used: set[int] = set()
    filled = 0
    for pos in order.tolist():
        target, cand = pos % g, int(flat_cands[pos])
        if len(picks[target]) < k and cand not in used:
            picks[target].append(cand)
            used.add(cand)
            filled += len(picks[target]) == k
            if filled == g:
                break
    if filled < g:  # too few candidates: the remaining targets share (their best ones they do not have yet)
        ranked = host[2].numpy().tolist()
        for target in range(g):
            for cand in ranked[target]:
                if len(picks[target]) == k:
                    break
                if cand not in picks[target]:
                    picks[target].append(cand)
    return np.array(picks, dtype=np.int64).reshape(g, k)


def stage_costs(hungarian: HungarianMatcher, logits: Tensor, boxes: Tensor, labels: Tensor,
                gt_boxes: Tensor) -> Tensor:
    """Matching cost [M, G] of candidates (logits [M, K], boxes [M, 4]) against one image's targets, computed as
    the Hungarian matcher's; non-finite predictions are tamed as the matcher does."""
    logits = torch.nan_to_num(logits.float())
    boxes = torch.nan_to_num(boxes.float(), nan=0.5)
    cost = hungarian.cost_matrix(logits, boxes, labels, gt_boxes.float())
    return torch.nan_to_num(cost, nan=1e8, posinf=1e8, neginf=-1e8)


def zero_loss_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """One-slot stand-in predictions for a group without queries (every fixed-index term is 0; same keys)."""
    def one(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        logits = out["pred_logits"].new_zeros(out["pred_logits"].shape[0], 1, out["pred_logits"].shape[-1])
        return {"pred_logits": logits, "pred_boxes": out["pred_boxes"].new_full((logits.shape[0], 1, 4), 0.5)}

    stand_in = one(outputs)
    if "aux_outputs" in outputs:
        stand_in["aux_outputs"] = [one(aux) for aux in outputs["aux_outputs"]]
    return stand_in
