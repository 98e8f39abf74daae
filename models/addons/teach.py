"""Teach-DETR: teacher detectors' boxes as extra one-to-one targets of the main (one-to-one) queries.

specs/deformable_family.md §5 ([TD] LeonHLJ/Teach-DETR, built on H-DETR). Training targets carry the teachers'
boxes (``ext_boxes`` [T, 4] cxcywh normalised like ``boxes``, ``ext_labels`` [T] in the ground-truth label
space, ``ext_scores`` [T], ``ext_teacher`` [T] = index of the teacher in ``--ext-ann-files`` order, -1 for the
whole-image box; datasets/teacher_boxes.py).

Default (``--ensemble_mode merged``, the released code): per image the teachers' boxes form ONE set, merged by
the DATA PATH before the augmentation as released (datasets/teacher_merge.py: class-aware NMS at IoU 0.2 ranked
by score + teacher weight, the first floor(N / teachers) kept; an image no teacher has an entry for gets one
whole-image box, label 0, score 0), then augmented like the ground truth. Such targets carry
``ext_merged = True`` and are used as they are (T may be 0: a crop can remove every box). A target without that
flag (built by other code) is merged here, after the augmentation, the same way (teachers counted from
``ext_teacher``; the whole-image box when none is left). The set is Hungarian-matched (the
criterion's matcher and costs) to the one-to-one queries, separately on the last and every aux layer, and
supervised with score-weighted losses normalised by the all-reduced teacher-box count:
``loss_ce = Σ_{b,q,c} w_q·FL / N`` (w_q = the matched box's score, 0.5 for unmatched queries),
``loss_bbox = Σ_matched s·|box − t|₁ / N``, ``loss_giou = Σ_matched (1 − s·GIoU) / N`` (the released form;
its gradient equals that of s·(1 − GIoU)). Two-stage encoder proposals get the unweighted standard losses
against class-agnostic teacher targets. Keys ``loss_*[_i]_ensemble`` and ``loss_*_enc_ensemble``, weight =
main (encoder) coefficient × ``--lambda_ensemble``.

``--ensemble_mode parallel`` (the paper's description): each teacher's own boxes are a separate target set,
matched, normalised by its own count and weighted by its ``--ext-ann-weights`` weight; the losses are summed
under the same keys (no NMS, no whole-image box); the data path then gives the unmerged boxes.

Everything works from the outputs dict (``pred_logits``/``pred_boxes``/``aux_outputs``/``enc_outputs``, the
one-to-one queries whatever other groups run), so the add-on needs no host capability. On softmax hosts
(``--cls_loss softmax``: DETR, YOLOS) the classification term is their cross-entropy with the same query weights.
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from datasets.teacher_merge import DEFAULT_TEACHER_WEIGHT, MERGED_KEY, NMS_IOU, merge_teachers
from util.box_ops import box_cxcywh_to_xyxy, elementwise_generalized_box_iou
from util.misc import get_world_size, host_tensor_to, is_dist_avail_and_initialized

from ..matcher import Matched, build_matcher, layer_staged, lockstep, run_stages, staged, upload
from ..registry import register_addon
from .base import AddOn, Indices, LossSpec, StepContext, loss_key

SUFFIX, ENC_SUFFIX = "ensemble", "enc_ensemble"
UNMATCHED_WEIGHT = 0.5  # the released classification weight of the queries no teacher box is matched to
__all__ = ["DEFAULT_TEACHER_WEIGHT", "NMS_IOU", "TeachDETR", "merge_teachers", "merged_targets", "parse_named_values",
           "per_teacher_targets", "teacher_terms"]
TargetSet = list[dict[str, Tensor]]


class NamedValues(argparse.Action):
    """``NAME=VALUE`` pairs or one JSON object -> an ordered dict (later names override earlier ones)."""

    def __init__(self, *args: Any, value_type: type = str, **kwargs: Any) -> None:
        self.value_type = value_type
        super().__init__(*args, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        values = [values] if isinstance(values, str) else list(values)
        try:
            setattr(namespace, self.dest, parse_named_values(values, self.value_type))
        except ValueError as e:
            raise argparse.ArgumentError(self, str(e)) from None


def parse_named_values(values: Sequence[str], value_type: type = str) -> dict[str, Any]:
    """``["a=x.json", "b=y.json"]`` or ``['{"a": "x.json"}']`` -> ``{"a": "x.json", "b": "y.json"}``.

    Raises:
        ValueError: a malformed pair, JSON that is not an object, or a value ``value_type`` refuses.
    """
    pairs: list[tuple[str, Any]] = []
    if len(values) == 1 and values[0].lstrip().startswith("{"):
        try:
            obj = json.loads(values[0])
        except json.JSONDecodeError as e:
            raise ValueError(f"not a JSON object: {values[0]!r} ({e})") from None
        pairs = list(obj.items())
    else:
        for item in values:
            name, sep, value = item.partition("=")
            if not sep or not name.strip():
                raise ValueError(f"expected NAME=VALUE pairs or one JSON object, got {item!r}")
            pairs.append((name.strip(), value))
    out = {}
    for name, value in pairs:
        try:
            out[str(name)] = value_type(value)
        except (TypeError, ValueError):
            raise ValueError(f"{name}={value!r}: not a {value_type.__name__}") from None
    return out


def whole_image_target(device: torch.device) -> dict[str, Tensor]:
    """The released stand-in for an image without teacher boxes: the whole image, label 0, score 0."""
    return {"boxes": torch.tensor([[0.5, 0.5, 1.0, 1.0]], device=device),
            "labels": torch.zeros(1, dtype=torch.int64, device=device), "scores": torch.zeros(1, device=device)}


def _teacher_boxes(t: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An image's non-degenerate teacher boxes (cxcywh), labels, scores and teacher indices."""
    boxes = t["ext_boxes"].float().reshape(-1, 4)
    teacher = t.get("ext_teacher")
    teacher = torch.zeros_like(t["ext_labels"]) if teacher is None else teacher
    keep = (boxes[:, 2] > 0) & (boxes[:, 3] > 0)
    return boxes[keep], t["ext_labels"][keep], t["ext_scores"].float()[keep], teacher[keep]


def merged_targets(targets: Sequence[Mapping[str, Tensor]], weights: Tensor, dummy: bool = True) -> TargetSet:
    """Per image one merged teacher set (``boxes`` cxcywh, ``labels``, ``scores``).

    A target the data path already merged (``ext_merged`` True, the default data path) gives its boxes as they
    are, none added; any other is merged here with ``merge_teachers`` (on the augmented boxes; the whole-image
    box when none is left and ``dummy``).
    """
    out = []
    for t in targets:
        if t.get(MERGED_KEY, False):
            out.append({"boxes": t["ext_boxes"], "labels": t["ext_labels"], "scores": t["ext_scores"]})
            continue
        boxes, labels, scores, teacher = _teacher_boxes(t)
        keep = merge_teachers(box_cxcywh_to_xyxy(boxes), labels, scores, teacher, weights)
        if keep.numel() == 0 and dummy:
            out.append(whole_image_target(boxes.device))
        else:
            out.append({"boxes": boxes[keep], "labels": labels[keep], "scores": scores[keep]})
    return out


def per_teacher_targets(targets: Sequence[Mapping[str, Tensor]], num_teachers: int) -> list[TargetSet]:
    """One target set per teacher (its own boxes of every image, unmerged): the paper's parallel supervision."""
    sets: list[TargetSet] = [[] for _ in range(num_teachers)]
    for t in targets:
        boxes, labels, scores, teacher = _teacher_boxes(t)
        for i in range(num_teachers):
            mine = teacher == i
            sets[i].append({"boxes": boxes[mine], "labels": labels[mine], "scores": scores[mine]})
    return sets


def _focal(logits: Tensor, onehot: Tensor, alpha: float, gamma: float) -> Tensor:
    """Element-wise sigmoid focal loss [B, Q, K] (RetinaNet), as the criterion's."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    loss = ce * ((1 - p_t) ** gamma)
    if alpha >= 0:
        loss = (alpha * onehot + (1 - alpha) * (1 - onehot)) * loss
    return loss


def teacher_terms(out: Mapping[str, Tensor], targets: TargetSet, indices: Indices, num_boxes: Tensor,
                  alpha: float, gamma: float = 2.0, weighted: bool = True,
                  eos_coef: float | None = None) -> dict[str, Tensor]:
    """Focal, L1 and GIoU terms of one layer against teacher targets, score-weighted or plain.

    Args:
        out: ``pred_logits`` [B, Q, K], ``pred_boxes`` [B, Q, 4] cxcywh.
        targets: per image ``boxes`` [T, 4] cxcywh, ``labels`` [T] (< K), ``scores`` [T].
        indices: per image (query indices, target indices), one-to-one.
        num_boxes: the all-reduced teacher-box count (>= 1).
        weighted: the released ensemble terms (per-query weight w_q: matched score, else 0.5; box terms times
            the score, GIoU as 1 − s·GIoU); False: the standard terms (encoder proposals).
        eos_coef: softmax hosts (DETR, YOLOS: the last of the K logits is "no object"): the classification term
            is their cross-entropy (no-object class weighted ``eos_coef``, weighted mean over queries), each
            query's term times w_q; None: sigmoid focal loss.
    """
    logits = out["pred_logits"].float()
    b, q, k = logits.shape
    batch_idx, src_idx = _pair_rows(indices, logits.device)
    labels = _matched(targets, indices, "labels")
    scores = _matched(targets, indices, "scores").float()
    classes = torch.full((b, q), k - 1 if eos_coef is not None else k, dtype=torch.int64, device=logits.device)
    classes[batch_idx, src_idx] = labels
    w = torch.full((b, q), UNMATCHED_WEIGHT if weighted else 1.0, dtype=torch.float32, device=logits.device)
    if weighted:
        w[batch_idx, src_idx] = scores
    boxes = _box_terms(out, targets, indices, batch_idx, src_idx, scores, num_boxes, weighted)
    if eos_coef is not None:
        return {"loss_ce": _softmax_ce(logits, classes, w, eos_coef), **boxes}
    onehot = torch.zeros(b, q, k + 1, dtype=logits.dtype, device=logits.device)
    onehot = onehot.scatter_(2, classes.unsqueeze(-1), 1)[:, :, :-1]
    focal = _focal(logits, onehot, alpha, gamma)
    if not weighted:
        return {"loss_ce": focal.mean(1).sum() / num_boxes * q, **boxes}
    return {"loss_ce": ((focal / num_boxes) * w[..., None]).mean(1).sum() * q, **boxes}


def _box_terms(out: Mapping[str, Tensor], targets: TargetSet, indices: Indices, batch_idx: Tensor, src_idx: Tensor,
               scores: Tensor, num_boxes: Tensor, weighted: bool) -> dict[str, Tensor]:
    """L1 and GIoU of the matched pairs / num_boxes; weighted: s·L1 and the released 1 − s·GIoU."""
    src = out["pred_boxes"][batch_idx, src_idx].float()
    tgt = _matched(targets, indices, "boxes").float()
    l1 = F.l1_loss(src, tgt, reduction="none")
    giou = elementwise_generalized_box_iou(box_cxcywh_to_xyxy(src), box_cxcywh_to_xyxy(tgt))
    if not weighted:
        return {"loss_bbox": l1.sum() / num_boxes, "loss_giou": (1 - giou).sum() / num_boxes}
    return {"loss_bbox": (l1 * scores[:, None]).sum() / num_boxes, "loss_giou": (1 - giou * scores).sum() / num_boxes}


def _pair_rows(indices: Indices, device: torch.device) -> tuple[Tensor, Tensor]:
    """(image, query) of every pair, on ``device``: the flat device rows of ``Matched`` indices (no copy, no sync),
    else built from the per-image pairs."""
    if isinstance(indices, Matched):
        return indices.batch_idx, indices.src_idx
    batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)]).to(device)
    return batch_idx, torch.cat([src for src, _ in indices]).to(device)


def _matched(targets: TargetSet, indices: Indices, key: str) -> Tensor:
    """``targets[b][key][j]`` of every pair, in pair order (``Matched``: one gather on the device)."""
    if isinstance(indices, Matched):
        return indices.gather(targets, key)
    return torch.cat([t[key][j] for t, (_, j) in zip(targets, indices)])


def _softmax_ce(logits: Tensor, classes: Tensor, w: Tensor, eos_coef: float) -> Tensor:
    """DETR's cross-entropy over [B, Q, K] (class K-1 = no object, weighted ``eos_coef``), each query's term times
    w [B, Q], divided by the sum of the queries' class weights (DETR's weighted mean when w = 1)."""
    class_weight = torch.ones(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    class_weight[-1] = eos_coef
    per_query = F.cross_entropy(logits.transpose(1, 2), classes, class_weight, reduction="none")
    return (per_query * w).sum() / class_weight[classes].sum()


def _class_error(out: Mapping[str, Tensor], targets: TargetSet, indices: Indices) -> Tensor:
    """100 − top-1 accuracy of the matched queries (logged, as the criterion's class_error)."""
    logits = out["pred_logits"]
    matched = logits[_pair_rows(indices, logits.device)]
    if matched.numel() == 0:
        return torch.zeros((), device=logits.device)
    labels = _matched(targets, indices, "labels")
    return 100 - (matched.argmax(-1) == labels).float().mean() * 100


@register_addon("teach")
class TeachDETR(AddOn):
    """Teach-DETR's teacher-box supervision of the one-to-one queries (keys ``loss_*[_i]_ensemble``).

    Args:
        matcher: the Hungarian matcher, built from the criterion's flags (``--set_cost_*``).
        teachers: teacher names in index order (``ext_teacher`` indexes them).
        weights: per teacher: ranking bonus in the merge; loss weight in parallel mode.
        lambda_ensemble: multiplies every teacher loss's coefficient.
        enc_coefs: coefficients of the encoder-proposal terms (None: the main ones).
        parallel: the paper's per-teacher supervision instead of the released merged set.
        dummy: give an image without teacher boxes the whole-image box (released; merged mode, targets the data
            path has not merged only: the data path adds it itself).
        focal_alpha: focal-loss alpha (gamma 2).
        eos_coef: softmax hosts (``--cls_loss softmax``): their no-object weight; None: sigmoid focal hosts.
    """

    name = "teach"
    order = 60

    def __init__(self, matcher: nn.Module, teachers: Sequence[str], weights: Sequence[float],
                 lambda_ensemble: float = 1.0, enc_coefs: Mapping[str, float] | None = None, parallel: bool = False,
                 dummy: bool = True, focal_alpha: float = 0.25, eos_coef: float | None = None) -> None:
        self.matcher, self.teachers = matcher, list(teachers)
        self.weights = torch.tensor(list(weights), dtype=torch.float32)
        self.lambda_ensemble, self.enc_coefs = lambda_ensemble, dict(enc_coefs) if enc_coefs else None
        self.parallel, self.dummy, self.focal_alpha, self.eos_coef = parallel, dummy, focal_alpha, eos_coef

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("Teach-DETR teacher boxes (--addons teach)")
        g.add_argument("--ensemble", action="store_true", help="supervise the one-to-one queries with teacher boxes")
        g.add_argument("--lambda_ensemble", default=1.0, type=float, help="weight of the teacher losses")
        g.add_argument("--ext-ann-files", "--ext_ann_files", dest="ext_ann_files", nargs="+", default={},
                       action=NamedValues, metavar="NAME=FILE",
                       help="teacher detections on the training images, NAME=FILE pairs or one JSON object; "
                            "the order gives the teacher index")
        g.add_argument("--ext-ann-weights", "--ext_ann_weights", dest="ext_ann_weights", nargs="+", default={},
                       action=NamedValues, value_type=float, metavar="NAME=WEIGHT",
                       help=f"teacher weights (merge ranking bonus; loss weight in parallel mode), NAME=WEIGHT "
                            f"pairs or one JSON object; missing: {DEFAULT_TEACHER_WEIGHT}")
        g.add_argument("--ensemble_mode", default="merged", choices=("merged", "parallel"),
                       help="merged: one NMS-merged teacher set (released code); parallel: every teacher matched "
                            "and weighted separately (the paper)")
        g.add_argument("--ensemble_no_dummy", action="store_true",
                       help="an image without teacher boxes gets no whole-image label-0 box (released: it does)")

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return bool(getattr(args, "ensemble", False))

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> TeachDETR:
        teachers = list(getattr(args, "ext_ann_files", None) or {})
        given_weights = getattr(args, "ext_ann_weights", None) or {}
        weights = [float(given_weights.get(n, DEFAULT_TEACHER_WEIGHT)) for n in teachers]
        matcher = build_matcher(args)  # the criterion's matcher (softmax hosts: their class cost)
        main = {"loss_ce": args.cls_loss_coef, "loss_bbox": args.bbox_loss_coef, "loss_giou": args.giou_loss_coef}
        given = {"loss_ce": getattr(args, "enc_cls_loss_coef", None),
                 "loss_bbox": getattr(args, "enc_bbox_loss_coef", None),
                 "loss_giou": getattr(args, "enc_giou_loss_coef", None)}
        enc = {k: main[k] if v is None else v for k, v in given.items()}
        eos = args.eos_coef if getattr(args, "cls_loss", "focal") == "softmax" else None
        return cls(matcher, teachers, weights, args.lambda_ensemble, enc, args.ensemble_mode == "parallel",
                   not args.ensemble_no_dummy, args.focal_alpha, eos)

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        return [LossSpec(SUFFIX, main.num_aux_layers, dict(main.coefs), self.lambda_ensemble),
                LossSpec(ENC_SUFFIX, 0, dict(self.enc_coefs or main.coefs), self.lambda_ensemble)]

    def target_sets(self, targets: Sequence[Mapping[str, Tensor]]) -> list[tuple[TargetSet, float]]:
        """The teacher target sets of the batch with their loss weights (merged: one set, weight 1)."""
        if self.parallel:
            if any(t.get(MERGED_KEY, False) for t in targets):
                raise ValueError("--ensemble_mode parallel: the training targets carry the merged teacher set; "
                                 "build the training set with the same --ensemble_mode")
            return list(zip(per_teacher_targets(targets, len(self.teachers)), self.weights.tolist()))
        weights = self.weights.to(targets[0]["ext_scores"].device) if targets else self.weights
        return [(merged_targets(targets, weights, self.dummy), 1.0)]

    def extra_losses(self, outputs: Mapping[str, Any], ctx: StepContext) -> dict[str, Tensor]:
        """The teacher losses of the one-to-one queries (every layer) and of the encoder proposals."""
        targets = ctx.targets
        if not targets or "ext_boxes" not in targets[0]:
            if "encoder" in outputs:  # a training forward: the data must carry the teacher boxes
                raise ValueError("--ensemble: the training targets carry no teacher boxes (ext_boxes); build the "
                                 "training set with --ext-ann-files")
            return {}  # evaluation: validation targets carry no teacher boxes
        sets = self.target_sets(targets)
        device = outputs["pred_logits"].device
        counts = _all_reduced_counts([sum(len(t["labels"]) for t in s) for s, _ in sets], device)
        layers = [(None, outputs)] + list(enumerate(outputs.get("aux_outputs", [])))
        enc = "enc_outputs" in outputs
        agnostic = [[{**t, "labels": torch.zeros_like(t["labels"])} for t in tset] for tset, _ in sets]
        matched = self.match(sets, [out for _, out in layers], outputs.get("enc_outputs"), agnostic, device)
        losses: dict[str, Tensor] = {}
        for (tset, weight), num_boxes, agn, (per_layer, enc_indices) in zip(sets, counts, agnostic, matched):
            for (layer, out), indices in zip(layers, per_layer):
                terms = teacher_terms(out, tset, indices, num_boxes, self.focal_alpha, eos_coef=self.eos_coef)
                _accumulate(losses, terms, layer, SUFFIX, weight)
                if layer is None and not self.parallel:
                    losses[loss_key("class_error", None, SUFFIX)] = _class_error(out, tset, indices)
            if enc:
                terms = teacher_terms(outputs["enc_outputs"], agn, enc_indices, num_boxes, self.focal_alpha,
                                      weighted=False, eos_coef=self.eos_coef)
                _accumulate(losses, terms, None, ENC_SUFFIX, weight)
        return losses

    def match(self, sets: Sequence[tuple[TargetSet, float]], layers: Sequence[Mapping[str, Tensor]],
              enc_outputs: Mapping[str, Tensor] | None, agnostic: Sequence[TargetSet],
              device: torch.device) -> list[tuple[list[Indices], Indices | None]]:
        """Per target set the indices of every layer and of the encoder proposals (None without), as ``Matched``
        on ``device``: the matcher's staged form runs them all with one device-to-host copy, and one
        non-blocking upload brings them back (as the criterion's matching); the same pairs as matching each layer
        alone."""
        layer_stages = layer_staged(self.matcher)
        stage = staged(self.matcher)
        if stage is None:  # a matcher without stages: called layer by layer
            found = [([self.matcher(out, tset) for out in layers],
                      self.matcher(enc_outputs, agn) if enc_outputs is not None else None)
                     for (tset, _), agn in zip(sets, agnostic)]
        else:
            runs = []
            for (tset, _), agn in zip(sets, agnostic):
                runs.append(layer_stages(list(layers), tset) if layer_stages is not None
                            else lockstep([stage(out, tset) for out in layers]))
                if enc_outputs is not None:
                    runs.append(stage(enc_outputs, agn))
            results = iter(run_stages(runs))
            found = [(next(results), next(results) if enc_outputs is not None else None) for _ in sets]
        groups = []
        for ((tset, _), agn), (per_layer, enc_indices) in zip(zip(sets, agnostic), found):
            groups.append((tset, per_layer))
            if enc_indices is not None:
                groups.append((agn, [enc_indices]))
        uploaded = iter(upload(groups, device))
        return [(next(uploaded), next(uploaded)[0] if enc_indices is not None else None)
                for _, (_, enc_indices) in zip(sets, found)]


def _accumulate(losses: dict[str, Tensor], terms: Mapping[str, Tensor], layer: int | None, suffix: str,
                weight: float) -> None:
    """Add ``weight`` × each term to its key (parallel mode sums the teachers; weight 1 adds the term itself)."""
    for name, value in terms.items():
        key = loss_key(name, layer, suffix)
        value = value if weight == 1.0 else value * weight
        losses[key] = value if key not in losses else losses[key] + value


def _all_reduced_counts(counts: Sequence[int], device: torch.device) -> list[Tensor]:
    """Box counts averaged over processes (one collective), at least 1 each."""
    t = host_tensor_to([float(c) for c in counts], torch.float, device)
    if is_dist_avail_and_initialized():
        dist.all_reduce(t)
    return list(torch.clamp(t / get_world_size(), min=1).unbind(0))
