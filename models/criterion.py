"""SetCriterion: matching + focal/L1/GIoU losses for the main queries, aux layers, encoder and add-ons.

Follows specs/deformable_family.md §1.13. Every supervised set of predictions is a ``LossGroup``
with its own matcher (or fixed indices) and its own all-reduced ``num_boxes``; all groups' box
counts are all-reduced in ONE collective.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from util.misc import get_world_size, is_dist_avail_and_initialized

from .addons.base import AddOn, Indices, LossGroup, LossSpec, StepContext, loss_key, overrides
from .matcher import Matched, layer_staged, run_stages, staged, upload


def sigmoid_focal_loss(inputs: Tensor, targets: Tensor, num_boxes: Tensor | float, alpha: float = 0.25,
                       gamma: float = 2.0, valid: Tensor | None = None) -> Tensor:
    """Focal loss (RetinaNet) averaged over the query axis, summed, divided by num_boxes.

    Args:
        inputs: [B, Q, K] logits; targets: [B, Q, K] one-hot (or soft) targets.
        valid: [B, Q] bool; queries marked False contribute nothing (None: every query counts).
    """
    prob = inputs.sigmoid()
    ce_loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    loss = ce_loss * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if valid is not None:
        loss = loss * valid.unsqueeze(-1).to(loss.dtype)
    return loss.mean(1).sum() / num_boxes


def quality_focal_loss(logits: Tensor, soft_targets: Tensor, beta: float = 2.0,
                       valid: Tensor | None = None) -> Tensor:
    """Quality focal loss (GFL, Li et al. 2020; MMDetection's ``QualityFocalLoss`` with sigmoid), summed over
    queries and classes: BCE(sigmoid(z), y) * |y - sigmoid(z)|^beta, with y the IoU of a positive's class
    and 0 elsewhere (then the factor is sigmoid(z)^beta). No alpha balancing.

    Args:
        logits: [B, Q, K]; soft_targets: [B, Q, K] in [0, 1]; valid: [B, Q] bool (False: no loss), or None.
    """
    prob = logits.sigmoid()
    loss = F.binary_cross_entropy_with_logits(logits, soft_targets, reduction="none")
    loss = loss * (soft_targets - prob).abs().pow(beta)
    if valid is not None:
        loss = loss * valid.unsqueeze(-1).to(loss.dtype)
    return loss.sum()


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """IoU of matched xyxy pairs [N, 4] -> [N], the union floored at ``eps`` (MMDetection's aligned
    ``bbox_overlaps``: the quality target of Co-DINO's quality focal loss)."""
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    return inter / torch.clamp(area1 + area2 - inter, min=eps)


def _src_permutation_idx(indices: Indices) -> tuple[Tensor, Tensor]:
    """(image, query) of every pair: [N], [N]."""
    if isinstance(indices, Matched):
        return indices.batch_idx, indices.src_idx
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
    src_idx = torch.cat([src for src, _ in indices])
    return batch_idx, src_idx


def _matched_targets(targets: Sequence[Mapping[str, Tensor]], indices: Indices, key: str) -> Tensor:
    """``targets[b][key][j]`` of every pair (b, (i, j)), in pair order."""
    if isinstance(indices, Matched):
        return indices.gather(targets, key)
    return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices)])


def _write_last_pairs(target: Tensor, idx: tuple[Tensor, Tensor], values: Tensor) -> Tensor:
    """``target`` [B, Q] where every query that has pairs takes the value [N] of its LAST pair.

    A one-to-many assigner may pair a query with several targets; it orders its pairs so that the one
    whose class the query should learn comes last. Writing only those makes the class target explicit
    (an indexed write with duplicate indices is undefined on GPU). Sync-free: the last pair of every query
    is a scatter-max of pair positions into [B * Q], then one gather (no data-dependent shape).
    """
    n = values.numel()
    if n == 0:
        return target
    keys = (idx[0] * target.shape[1] + idx[1]).to(target.device, non_blocking=True)
    last = torch.full((target.numel(),), -1, dtype=torch.int64, device=target.device)
    last = last.scatter_reduce(0, keys, torch.arange(n, device=target.device), "amax")
    picked = values.to(target.device, non_blocking=True)[last.clamp(min=0)]
    return torch.where(last >= 0, picked, target.view(-1)).view_as(target)


def _giou_with_eps(boxes1: Tensor, boxes2: Tensor, eps: float) -> Tensor:
    """GIoU of matched xyxy pairs [N, 4] -> [N] with ``eps`` added to the union and the enclosing area (DAB-DETR,
    DN-DETR: their ``generalized_box_iou``)."""
    wh = (torch.min(boxes1[:, 2:], boxes2[:, 2:]) - torch.max(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    inter = wh[:, 0] * wh[:, 1]
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    union = area1 + area2 - inter
    wh = (torch.max(boxes1[:, 2:], boxes2[:, 2:]) - torch.min(boxes1[:, :2], boxes2[:, :2])).clamp(min=0)
    area = wh[:, 0] * wh[:, 1]
    return inter / (union + eps) - (area - union) / (area + eps)


def _layers(group: LossGroup) -> list[tuple[int | None, Mapping[str, Any]]]:
    """(aux layer number or None for the last layer, its outputs): the last layer first, then aux 0, 1, ..."""
    return [(None, group.outputs)] + list(enumerate(group.outputs.get("aux_outputs", [])))


class SetCriterion(nn.Module):
    """Loss of a DETR-family detector with composable add-ons.

    ``criterion(outputs, targets)`` returns the loss dict with the official keys (``loss_ce``,
    ``loss_bbox``, ``loss_giou``, ``_0``.. for aux layers, ``_enc`` for two-stage proposals, add-on
    suffixes), plus logged-only ``class_error`` and ``cardinality_error*``. ``weight_dict`` holds the
    weight of every loss key; the total loss is ``sum(loss[k] * weight_dict[k])``.

    Args:
        num_classes: K, the number of class logits.
        matcher: default assigner (Hungarian).
        coefs: {"loss_ce", "loss_bbox", "loss_giou"} coefficients of the main queries.
        num_aux_layers: decoder layers before the last that are supervised (0 without aux loss).
        two_stage: supervise the encoder proposals (suffix ``enc``).
        enc_class_agnostic: encoder targets are one class (Deformable-DETR); False keeps the real labels
            (DINO's interm loss on its top-k proposals).
        enc_coefs: coefficients of the encoder loss (default: ``coefs``).
        focal_alpha, focal_gamma: focal-loss parameters.
        addons: enabled add-ons, in their fixed order.
    """

    def __init__(self, num_classes: int, matcher: nn.Module, coefs: Mapping[str, float], num_aux_layers: int,
                 two_stage: bool = False, enc_coefs: Mapping[str, float] | None = None, focal_alpha: float = 0.25,
                 focal_gamma: float = 2.0, addons: Sequence[AddOn] = (), enc_class_agnostic: bool = True,
                 cls_loss: str = "focal", eos_coef: float = 0.1) -> None:
        super().__init__()
        if cls_loss not in ("focal", "softmax", "qfl"):
            raise ValueError(f"cls_loss must be 'focal', 'qfl' or 'softmax', got {cls_loss!r}")
        self.num_classes = num_classes
        self.matcher = matcher
        self.focal_alpha, self.focal_gamma = focal_alpha, focal_gamma
        self.cls_loss, self.eos_coef = cls_loss, eos_coef
        self.qfl_beta = 2.0  # --cls_loss qfl: Co-DINO's QualityFocalLoss beta
        self.giou_eps = 0.0  # DAB-/DN-DETR's and DINO's GIoU adds 1e-6 to the union and hull (set_giou_eps)
        self.two_stage = two_stage
        self.enc_class_agnostic = enc_class_agnostic
        self.addons = list(addons)
        main = LossSpec("", num_aux_layers, dict(coefs))
        # The official weight_dict always declares the _enc keys (also one-stage); keep it identical.
        self.specs = [main, LossSpec("enc", 0, dict(enc_coefs or coefs))]
        for addon in self.addons:
            self.specs.extend(addon.loss_specs(main))
        self.weight_dict: dict[str, float] = {}
        for spec in self.specs:
            self.weight_dict.update(spec.weight_dict())

    # ---------------------------------------------------------------------------------- terms
    def loss_labels(self, outputs: Mapping[str, Tensor], targets, indices: Indices, num_boxes: Tensor,
                    log: bool = False, valid: Tensor | None = None) -> dict[str, Tensor]:
        """Sigmoid focal loss (or with ``cls_loss="qfl"`` the quality focal loss) over all (``valid``) queries
        and classes; unmatched queries are background."""
        logits = outputs["pred_logits"].float()
        idx = _src_permutation_idx(indices)
        target_classes_o = _matched_targets(targets, indices, "labels")
        target_classes = torch.full(logits.shape[:2], self.num_classes, dtype=torch.int64, device=logits.device)
        target_classes = _write_last_pairs(target_classes, idx, target_classes_o)
        if self.cls_loss == "softmax":
            loss_ce = self.softmax_loss(logits, target_classes, valid)
        elif self.cls_loss == "qfl":
            # the matched class's target is the IoU of the detached predicted box with its GT (0 elsewhere)
            src = box_cxcywh_to_xyxy(outputs["pred_boxes"][idx].detach().float())
            quality = aligned_iou(src, box_cxcywh_to_xyxy(_matched_targets(targets, indices, "boxes").float()))
            quality = _write_last_pairs(logits.new_zeros(logits.shape[:2]), idx, quality)
            onehot = torch.zeros(logits.shape[0], logits.shape[1], logits.shape[2] + 1, dtype=logits.dtype,
                                 device=logits.device)
            onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
            soft = onehot[:, :, :-1] * quality.unsqueeze(-1)
            loss_ce = quality_focal_loss(logits, soft, self.qfl_beta, valid) / num_boxes
        else:
            onehot = torch.zeros(logits.shape[0], logits.shape[1], logits.shape[2] + 1, dtype=logits.dtype,
                                 device=logits.device)
            onehot.scatter_(2, target_classes.unsqueeze(-1), 1)
            onehot = onehot[:, :, :-1]
            loss_ce = sigmoid_focal_loss(logits, onehot, num_boxes, self.focal_alpha, self.focal_gamma,
                                         valid) * logits.shape[1]
        losses = {"loss_ce": loss_ce}
        if log:
            matched = logits[idx]
            if matched.numel() == 0:
                acc = torch.zeros((), device=logits.device)
            else:
                acc = (matched.argmax(-1) == target_classes_o).float().mean() * 100
            losses["class_error"] = 100 - acc
        return losses

    def softmax_loss(self, logits: Tensor, target_classes: Tensor, valid: Tensor | None = None) -> Tensor:
        """DETR's classification loss: softmax cross-entropy over K = num_classes + 1 logits (the last one is
        "no object"), the no-object class weighted by ``eos_coef``, a weighted mean over queries (not / num_boxes).

        logits: [B, Q, K]; target_classes: [B, Q] (num_classes = no object); valid: [B, Q] or None.
        """
        if logits.shape[-1] != self.num_classes + 1:
            raise ValueError(f"softmax classification needs num_classes + 1 = {self.num_classes + 1} logits (the "
                             f"last is 'no object'), got {logits.shape[-1]}")
        weight = torch.ones(self.num_classes + 1, dtype=logits.dtype, device=logits.device)
        weight[-1] = self.eos_coef
        if valid is None:
            return F.cross_entropy(logits.transpose(1, 2), target_classes, weight)
        per_query = F.cross_entropy(logits.transpose(1, 2), target_classes, weight, reduction="none")
        w = weight[target_classes] * valid.to(logits.dtype)
        return (per_query * valid.to(logits.dtype)).sum() / w.sum().clamp(min=torch.finfo(logits.dtype).tiny)

    @torch.no_grad()
    def loss_cardinality(self, outputs: Mapping[str, Tensor], targets, indices: Indices,
                         num_boxes: Tensor) -> dict[str, Tensor]:
        """Predictions whose top logit is not the last one vs. the number of targets (logged only; DETR's: the last
        logit is "no object" with softmax; meaningless with sigmoid logits, kept for log compatibility)."""
        logits = outputs["pred_logits"]
        if isinstance(indices, Matched):
            tgt_lengths = indices.lengths
        else:  # built on the host, then a non-blocking copy (a blocking one syncs)
            tgt_lengths = torch.as_tensor([len(t["labels"]) for t in targets]).to(logits.device, non_blocking=True)
        card_pred = (logits.argmax(-1) != logits.shape[-1] - 1).sum(1)
        return {"cardinality_error": F.l1_loss(card_pred.float(), tgt_lengths.float())}

    def loss_boxes(self, outputs: Mapping[str, Tensor], targets, indices: Indices,
                   num_boxes: Tensor) -> dict[str, Tensor]:
        """L1 and GIoU of the matched boxes (cxcywh), normalised by num_boxes."""
        idx = _src_permutation_idx(indices)
        src_boxes = outputs["pred_boxes"][idx].float()
        target_boxes = _matched_targets(targets, indices, "boxes").float()
        loss_bbox = F.l1_loss(src_boxes, target_boxes, reduction="none")
        src_xyxy, target_xyxy = box_cxcywh_to_xyxy(src_boxes), box_cxcywh_to_xyxy(target_boxes)
        if self.giou_eps:
            giou = _giou_with_eps(src_xyxy, target_xyxy, self.giou_eps)
        else:
            giou = elementwise_generalized_box_iou(src_xyxy, target_xyxy)
        return {"loss_bbox": loss_bbox.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}

    # ---------------------------------------------------------------------------------- groups
    def main_groups(self, outputs: Mapping[str, Any], targets) -> list[LossGroup]:
        """The main queries (last + aux layers) and, in two-stage, the encoder proposals."""
        main = {k: outputs[k] for k in ("pred_logits", "pred_boxes", "aux_outputs") if k in outputs}
        groups = [LossGroup("", main, targets, log=True)]
        if self.two_stage and "enc_outputs" in outputs:
            enc_targets = targets
            if self.enc_class_agnostic:  # copies: the targets themselves are never modified
                enc_targets = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            groups.append(LossGroup("enc", outputs["enc_outputs"], enc_targets))
        return groups

    def _assign(self, group: LossGroup, ctx: StepContext) -> LossGroup:
        """The group with its assigner replaced by an add-on's ``assigner`` hook (at most one may)."""
        found = [(a.name, m) for a in self.addons if overrides(a, "assigner")
                 for m in [a.assigner(group, ctx)] if m is not None]
        if len(found) > 1:
            raise ValueError(f"more than one add-on replaces the assigner of group {group.suffix!r}: "
                             f"{[n for n, _ in found]}")
        if found:
            group.matcher = found[0][1]
        return group

    def _num_boxes(self, groups: Sequence[LossGroup], device: torch.device) -> list[Tensor]:
        counts = [float(sum(len(t["labels"]) for t in g.targets)) if g.num_boxes is None else float(g.num_boxes)
                  for g in groups]
        # built on the host, then a non-blocking copy (a blocking host-to-device copy syncs)
        counts = torch.as_tensor(counts, dtype=torch.float).to(device, non_blocking=True)
        if is_dist_avail_and_initialized():
            dist.all_reduce(counts)
        return list(torch.clamp(counts / get_world_size(), min=1).unbind(0))

    def match(self, groups: Sequence[LossGroup], device: torch.device) -> list[list[Matched]]:
        """Indices of every group and layer (layers as ``_layers``), as ``Matched`` on ``device``.

        Staged assigners (models/matcher.py: the Hungarian matcher, MS-DETR's) run in lock-step: one
        device-to-host copy per round for all of them (Hungarian: one round; MS-DETR: two). An assigner
        with ``layer_stages`` (the Hungarian matcher) matches all layers of a group in one generator (on a GPU,
        one cost computation for all of them). An assigner without stages is called in its place, after the
        staged ones before it have finished, so that random draws keep the order of the unbatched loop (group
        by group, layer by layer).
        """
        per_group: list[list[Any]] = [[None] * len(_layers(g)) for g in groups]
        pending: list[tuple[int, int | None, Any]] = []

        def flush() -> None:
            for (gi, li, _), indices in zip(pending, run_stages([st for _, _, st in pending])):
                if li is None:  # all layers of the group
                    per_group[gi][:] = indices
                else:
                    per_group[gi][li] = indices
            pending.clear()

        for gi, group in enumerate(groups):
            assigner = group.matcher or self.matcher
            stages = staged(assigner) if group.indices is None else None
            all_layers = layer_staged(assigner) if stages is not None and len(_layers(group)) > 1 else None
            if all_layers is not None:
                pending.append((gi, None, all_layers([out for _, out in _layers(group)], group.targets)))
                continue
            for li, (_, out) in enumerate(_layers(group)):
                if group.indices is not None:
                    per_group[gi][li] = group.indices
                elif stages is not None:
                    pending.append((gi, li, stages(out, group.targets)))
                else:
                    flush()
                    per_group[gi][li] = assigner(out, group.targets)
        flush()
        return upload([(g.targets, layers) for g, layers in zip(groups, per_group)], device)

    def group_losses(self, group: LossGroup, num_boxes: Tensor,
                     indices_per_layer: Sequence[Indices] | None = None) -> dict[str, Tensor]:
        """Losses of one group on its last layer and every aux layer, with generated keys.

        An assigner may also define the classification term of the pairs it assigns: a ``label_loss`` method
        with ``loss_labels``'s signature and keys replaces the focal loss of its group (OD-DETR's
        multi-target quality focal loss, models/addons/od_losses.py); fixed ``indices`` keep the focal loss.
        ``indices_per_layer``: the group's indices from ``match`` (None: matched here).
        """
        matcher = group.matcher or self.matcher
        label_loss = getattr(matcher, "label_loss", None) if group.indices is None else None
        if indices_per_layer is None:
            indices_per_layer = self.match([group], group.outputs["pred_logits"].device)[0]
        losses: dict[str, Tensor] = {}
        for (layer, out), indices in zip(_layers(group), indices_per_layer):
            terms = (label_loss or self.loss_labels)(out, group.targets, indices, num_boxes,
                                                     log=group.log and layer is None, valid=group.valid)
            terms.update(self.loss_cardinality(out, group.targets, indices, num_boxes))
            terms.update(self.loss_boxes(out, group.targets, indices, num_boxes))
            for name, value in terms.items():
                losses[loss_key(name, layer, group.suffix) if name != "class_error" else
                       loss_key(name, None, group.suffix)] = value
        return losses

    def forward(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]],
                ctx: StepContext | None = None) -> dict[str, Tensor]:
        """Loss dict of the main branch and every add-on group and term (see the class docstring).

        ``ctx``: the step context shared with the add-ons' hooks (None: one made from ``targets``).
        """
        ctx = ctx if ctx is not None else StepContext(targets=targets)
        groups = self.main_groups(outputs, targets)
        for addon in self.addons:
            groups.extend(addon.loss_groups(outputs, ctx))
        groups = [self._assign(g, ctx) for g in groups]
        device = outputs["pred_logits"].device
        losses: dict[str, Tensor] = {}
        matched = self.match(groups, device)
        for group, num_boxes, indices in zip(groups, self._num_boxes(groups, device), matched):
            losses.update(self.group_losses(group, num_boxes, indices))
        for addon in self.addons:
            if overrides(addon, "extra_losses"):
                losses.update(addon.extra_losses(outputs, ctx))
        undeclared = [k for k in losses if k.startswith("loss_") and k not in self.weight_dict]
        if undeclared:
            raise KeyError(f"loss keys without a declared weight (missing LossSpec): {undeclared}")
        return losses

    def total_loss(self, losses: Mapping[str, Tensor]) -> Tensor:
        """sum(loss[k] * weight_dict[k]) over the weighted keys present."""
        return sum(losses[k] * w for k, w in self.weight_dict.items() if k in losses)


def set_giou_eps(criterion: SetCriterion, eps: float) -> SetCriterion:
    """GIoU with ``eps`` added to the union and the enclosing area in the losses and the matching cost: the
    ``generalized_box_iou`` of IDEA-Research's DAB-DETR, DN-DETR and DINO (1e-6); returns ``criterion``."""
    criterion.giou_eps = eps
    criterion.matcher.giou_eps = eps
    return criterion


def main_coefs(args: Any) -> dict[str, float]:
    """Coefficients of the main queries from the official flags."""
    return {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}


