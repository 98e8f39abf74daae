"""OD-DETR: online distillation from the EMA of the model (Wu, Sun, Li, IJCAI 2024), as a training add-on.

specs/co_detr_od_detr.md §2 (read it for what is the paper's and what is this project's reading) and §3.3.
No official code was published and the full text could not be read: the three mechanisms are the paper's
(abstract); their formulas, weights and details are the spec's [INFERRED] choices, each a flag default here.

The teacher is the EMA copy of the model (``StepContext.ema``, kept by util/ema.py; ``needs_ema`` switches it
on). Each training step, before the student's forward, the teacher runs once in evaluation mode without
gradient on the same augmented batch (``before_forward``; it draws nothing from the global generator, so the
student's random draws are those of the EMA baseline). Three parts, each switchable:

(a) matching distillation (``--od_md``): each query is matched by the student's own Hungarian assignment and by
    the teacher's assignment of the corresponding teacher query (every layer); classification becomes the
    multi-target quality focal loss over both targets (replacing the group's focal ``loss_ce``), boxes keep the
    student's pairs and get extra terms toward the teacher's where they differ (``_od_md``, ``_od_init_md``).
    Query identity exists on learned-query hosts (main queries, ``--od_md_main auto``) and always on the
    teacher-initial group (``--od_md_init``).
(b) teacher-initial queries (``--od_init_queries``): the teacher's initial queries (content, reference and, on
    Deformable-DETR hosts, positional queries, built exactly as the teacher built its own) form an extra group
    behind the one block mask; its predictions are pulled toward the teacher's, layer by layer (``_od_pd``).
(c) auxiliary group (``--od_aux_group``): per GT the k = 2 lowest-cost teacher queries of any decoder stage
    (content: the stage's decoder output, reference: the stage's predicted box), supervised with that fixed
    one-to-k assignment on every layer (``_od_aux``).
Evaluation never runs any of it (groups exist in training forwards only; the teacher runs only here).
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from util.errors import FlagError
from util.misc import host_tensor_to

from ..matcher import HungarianMatcher, build_matcher, to_host
from ..query_groups import EncoderOutput, QueryGroup
from ..registry import register_addon
from .base import AddOn, LossGroup, LossSpec, StepContext, loss_key
from .od_losses import (
    Layer,
    TeacherGuidedMatcher,
    finish_stage_queries,
    prediction_distillation,
    stage_costs,
    stage_query_parts,
    zero_loss_outputs,
)

logger = logging.getLogger("detr")

STASH = "od"  # ctx.stash key: the teacher's state of this step
MATCHERS = "od_matchers"  # ctx.stash key: group suffix -> TeacherGuidedMatcher of this step
INIT, AUX = "od_init", "od_aux"  # group names (also the loss suffixes)


@dataclass(frozen=True)
class ODConfig:
    """OD-DETR's switches and weights (flags in ``OnlineDistillation.add_args``)."""

    md: bool = True
    md_main: str = "auto"
    md_init: bool = True
    md_box: str = "both"
    md_teacher_box_coef: float = 1.0
    md_teacher_layer: str = "same"
    mqf_beta: float = 2.0
    init_queries: bool = True
    pd_coefs: tuple[float, float, float] = (1.0, 1.0, 1.0)
    pd_threshold: float = 0.3
    aux_group: bool = True
    aux_per_gt: int = 2
    aux_coef: float = 1.0
    aux_shared: bool = False
    aux_attn: str = "group"


@dataclass
class TeacherState:
    """The teacher's view of one step.

    Attributes:
        layers: per decoder layer (aux layers first, the last one last) ``pred_logits`` [B, Q, K], ``pred_boxes``.
        init: its initial queries (content [B, Q, C], reference [B, Q, 2|4], query_pos [B, Q, C] or None).
        aux: the auxiliary group (a QueryGroup) or None.
    """

    layers: list[Layer]
    init: tuple[Tensor, Tensor, Tensor | None] | None
    aux: QueryGroup | None = None


def teacher_forward(teacher: nn.Module, images: Any) -> tuple[list[Layer], EncoderOutput, Tensor]:
    """The teacher's predictions per layer, its encoder output and its decoder states hs [L, B, Q, C].

    Runs in evaluation mode (no dropout: no draw from the global generator) without gradient, and restores the
    teacher's mode. The encoder output comes from a query-group provider that adds no group; the decoder
    states from a forward hook on ``transformer.decoder`` (its output's ``hs``).
    """
    captured: dict[str, Any] = {}

    def capture(enc: EncoderOutput) -> None:
        captured["enc"] = enc

    hook = teacher.transformer.decoder.register_forward_hook(lambda m, a, out: captured.__setitem__("hs", out.hs))
    mode = teacher.training
    teacher.eval()
    try:
        with torch.no_grad():
            out = teacher(images, providers=[capture])
    finally:
        hook.remove()
        teacher.train(mode)
    layers = [{"pred_logits": o["pred_logits"], "pred_boxes": o["pred_boxes"]}
              for o in [*out.get("aux_outputs", []), out]]
    return layers, captured["enc"], captured["hs"]


@register_addon("od")
class OnlineDistillation(AddOn):
    """OD-DETR's three distillation parts from the EMA teacher (module docstring); ``--addons od``.

    Args:
        config: ODConfig.
        hungarian: the criterion's matcher (same costs) for the teacher's and the student's assignments.
        md_main: matching distillation on the main queries (resolved from ``--od_md_main``).
        derive_pos: the host derives positional queries from 4-d boxes (else groups carry the teacher's).
        ref_dim: dimension of the host's initial references (2: one-stage Deformable-DETR points, 4: boxes).
    """

    name = "od"
    order = 50
    requires = frozenset({"group_queries", "decoder_states"})
    needs_ema = True

    def __init__(self, config: ODConfig, hungarian: HungarianMatcher, md_main: bool, derive_pos: bool,
                 ref_dim: int) -> None:
        self.config, self.hungarian = config, hungarian
        self.md_main = config.md and md_main
        self.md_init = config.md and config.md_init and config.init_queries
        self.derive_pos, self.ref_dim = derive_pos, ref_dim
        self.active = self.md_main or config.init_queries or config.aux_group
        self._warned = False

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("OD-DETR online distillation (--addons od; EMA teacher: --ema_decay)")
        on = argparse.BooleanOptionalAction
        g.add_argument("--od_md", default=True, action=on, help="(a) matching distillation (MQF + teacher matching)")
        g.add_argument("--od_md_main", default="auto", choices=("auto", "on", "off"),
                       help="(a) on the main queries; auto: only where query i of student and teacher correspond "
                            "(learned queries: one-stage deformable_detr, dab_deformable_detr)")
        g.add_argument("--od_md_init", default=True, action=on, help="(a) on the teacher-initial group (needs (b))")
        g.add_argument("--od_md_box", default="both", choices=("both", "student", "teacher"),
                       help="(a) box targets: own match + teacher's where it differs / own only / teacher's only")
        g.add_argument("--od_md_teacher_box_coef", default=1.0, type=float,
                       help="(a) weight of the box terms toward the teacher's match (times the main box coefs)")
        g.add_argument("--od_md_teacher_layer", default="same", choices=("same", "last"),
                       help="(a) teacher matching of each student layer: same layer, or the teacher's last")
        g.add_argument("--od_mqf_beta", default=2.0, type=float, help="(a) multi-target QFL exponent beta")
        g.add_argument("--od_init_queries", default=True, action=on,
                       help="(b) the teacher's initial queries as an extra masked group + prediction distillation")
        g.add_argument("--od_pd_cls_coef", default=1.0, type=float, help="(b) weight of the class distillation")
        g.add_argument("--od_pd_bbox_coef", default=1.0, type=float, help="(b) weight of the L1 box distillation")
        g.add_argument("--od_pd_giou_coef", default=1.0, type=float, help="(b) weight of the GIoU distillation")
        g.add_argument("--od_pd_score_threshold", default=0.3, type=float,
                       help="(b) boxes are distilled where the teacher's best score exceeds this")
        g.add_argument("--od_aux_group", default=True, action=on,
                       help="(c) auxiliary group of the lowest-cost teacher stage queries per GT")
        g.add_argument("--od_aux_per_gt", default=2, type=int, help="(c) teacher stage queries per GT (paper: 2)")
        g.add_argument("--od_aux_loss_coef", default=1.0, type=float, help="(c) lambda_aux (times the main coefs)")
        g.add_argument("--od_aux_shared", action="store_true",
                       help="(c) a stage query may serve several GTs (default: only when there are too few)")
        g.add_argument("--od_aux_attn", default="group", choices=("group", "gt"),
                       help="(c) self-attention inside the group: all its queries (padding included, as DN-DETR's "
                            "padding) / only the queries of the same GT (padding hidden)")

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> OnlineDistillation:
        decoder = getattr(getattr(model, "transformer", None), "decoder", None)
        if decoder is None or not hasattr(model, "num_queries"):
            raise FlagError(f"OD-DETR (--addons od) needs a deformable-family host with transformer.decoder; "
                            f"-m {args.model} has none")
        config = ODConfig(
            md=args.od_md, md_main=args.od_md_main, md_init=args.od_md_init, md_box=args.od_md_box,
            md_teacher_box_coef=args.od_md_teacher_box_coef, md_teacher_layer=args.od_md_teacher_layer,
            mqf_beta=args.od_mqf_beta, init_queries=args.od_init_queries,
            pd_coefs=(args.od_pd_cls_coef, args.od_pd_bbox_coef, args.od_pd_giou_coef),
            pd_threshold=args.od_pd_score_threshold, aux_group=args.od_aux_group, aux_per_gt=args.od_aux_per_gt,
            aux_coef=args.od_aux_loss_coef, aux_shared=args.od_aux_shared, aux_attn=args.od_aux_attn)
        # learned queries correspond one to one between student and teacher; selected proposals do not
        md_main = config.md_main == "on" or (config.md_main == "auto" and not getattr(model, "two_stage", False))
        derive_pos = "anchor_groups" in model.capabilities
        ref_dim = 4 if derive_pos or getattr(model, "two_stage", False) else 2
        return cls(config, build_matcher(args), md_main, derive_pos, ref_dim)

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        c, n = self.config, main.num_aux_layers
        boxes = {k: v for k, v in main.coefs.items() if k != "loss_ce"}
        teacher_boxes = c.md_box == "both" and c.md_teacher_box_coef != 0
        specs = []
        if self.md_main and teacher_boxes:
            specs.append(LossSpec("od_md", n, boxes, c.md_teacher_box_coef))
        if self.md_init:
            specs.append(LossSpec(INIT, n, dict(main.coefs)))
            if teacher_boxes:
                specs.append(LossSpec(f"{INIT}_md", n, boxes, c.md_teacher_box_coef))
        if c.init_queries:
            specs.append(LossSpec("od_pd", n, dict(zip(("loss_ce", "loss_bbox", "loss_giou"), c.pd_coefs))))
        if c.aux_group:
            specs.append(LossSpec(AUX, n, dict(main.coefs), c.aux_coef))
        return specs

    # ------------------------------------------------------------------------------------------ teacher
    def before_forward(self, model: nn.Module, ctx: StepContext) -> None:
        """The teacher's forward on this step's batch (nothing without a teacher, targets or an active part)."""
        if not self.active or ctx.targets is None or ctx.images is None:
            return
        if ctx.ema is None:
            if not self._warned:
                logger.warning("OD-DETR: no EMA teacher in this step's context; the add-on does nothing")
                self._warned = True
            return
        layers, enc, hs = teacher_forward(ctx.ema, ctx.images)
        init = None
        if self.config.init_queries or (self.config.aux_group and not self.derive_pos):
            with torch.no_grad():
                init = ctx.ema.group_queries(enc, 0, ctx.ema.num_queries)
        state = TeacherState(layers, init)
        if self.config.aux_group:
            with torch.no_grad():
                state.aux = self.aux_group(layers, hs[-len(layers):], None if init is None else init[2], ctx.targets)
        ctx.stash[STASH] = state
        ctx.stash[MATCHERS] = {}

    def aux_group(self, layers: Sequence[Layer], hs: Tensor, init_pos: Tensor | None,
                  targets: Sequence[Mapping[str, Tensor]]) -> QueryGroup:
        """Part (c): per GT the k lowest-cost teacher stage queries, GT-major (slots k*j .. k*j+k-1: GT j).

        Args:
            layers: the teacher's per-layer predictions (L' layers); hs: [L', B, Q, C] their decoder states.
            init_pos: [B, Q, C] the teacher's initial positional queries (hosts that cannot derive them), or None.

        Returns:
            QueryGroup ``od_aux``: content [B, N, C] (padding 0), reference [B, N, ref_dim] (padding 0.5),
            meta ``indices`` (per image (slot, GT)), ``num_boxes`` (pairs), ``valid`` [B, N].
        """
        k = self.config.aux_per_gt
        logits = torch.stack([lay["pred_logits"] for lay in layers])  # [L', B, Q, K]
        boxes = torch.stack([lay["pred_boxes"] for lay in layers])  # [L', B, Q, 4]
        num_layers, batch, q = boxes.shape[:3]
        device = hs.device
        parts = [stage_query_parts(stage_costs(self.hungarian, logits[:, b].flatten(0, 1), boxes[:, b].flatten(0, 1),
                                               t["labels"], t["boxes"]),  # candidates layer-major: layer * Q + query
                                   k, self.config.aux_shared) for b, t in enumerate(targets)]
        if self.config.aux_shared:  # the device's answer as is
            picks = [p[0].flatten() if p else torch.zeros(0, dtype=torch.long, device=device) for p in parts]
        else:  # every image's greedy choice on the host, from one copy; the picks back in one upload
            host, start, chosen = to_host([x for p in parts for x in p]), 0, []
            for p, t in zip(parts, targets):
                g = len(t["labels"])
                chosen.append(finish_stage_queries(host[start:start + len(p)], g, min(k, num_layers * q)).ravel()
                              if p else np.zeros(0, np.int64))
                start += len(p)
            flat = host_tensor_to(np.concatenate([np.zeros(0, np.int64), *chosen]), torch.long, device)
            picks = list(flat.split([len(c) for c in chosen]))
        size = max((p.numel() for p in picks), default=0)
        tgt = hs.new_zeros(batch, size, hs.shape[-1])
        reference = boxes.new_full((batch, size, self.ref_dim), 0.5)
        query_pos = None if init_pos is None or self.derive_pos else init_pos.new_zeros(batch, size, init_pos.shape[-1])
        valid = torch.zeros(batch, size, dtype=torch.bool, device=device)
        indices = []
        for b, cand in enumerate(picks):
            n, layer, query = cand.numel(), cand // q, cand % q
            tgt[b, :n] = hs[layer, b, query]
            reference[b, :n] = boxes[layer, b, query][:, : self.ref_dim]
            if query_pos is not None:
                query_pos[b, :n] = init_pos[b, query]
            valid[b, :n] = True
            per_gt = n // max(len(targets[b]["labels"]), 1)
            indices.append((torch.arange(n, device=device),
                            torch.arange(len(targets[b]["labels"]), device=device).repeat_interleave(per_gt)))
        attn_mask = None
        if self.config.aux_attn == "gt":
            block = torch.arange(size, device=device) // max(min(k, num_layers * q), 1)
            attn_mask = block[:, None] != block[None, :]
        meta = {"indices": indices, "num_boxes": float(sum(p.numel() for p in picks)), "valid": valid}
        return QueryGroup(AUX, tgt, reference, query_pos, attn_mask, meta=meta)

    # ------------------------------------------------------------------------------------------ student
    def query_groups(self, enc: EncoderOutput, ctx: StepContext) -> list[QueryGroup]:
        """(b) the teacher-initial group and (c) the auxiliary group; none without the teacher's state."""
        state: TeacherState | None = ctx.stash.get(STASH)
        if state is None:
            return []
        groups = []
        if self.config.init_queries and state.init is not None:
            tgt, reference, query_pos = state.init
            groups.append(QueryGroup(INIT, tgt, reference, query_pos))  # as the teacher built them
        if state.aux is not None:
            groups.append(state.aux)
        return groups

    def _matcher(self, outputs: Mapping[str, Any], state: TeacherState) -> TeacherGuidedMatcher:
        """The teacher-guided assigner of a group whose query i is the teacher's main query i."""
        student = [outputs, *outputs.get("aux_outputs", [])]  # the criterion's order: last, then aux 0..
        names = [None, *range(len(student) - 1)]
        teacher = [state.layers[-1], *state.layers[:-1]]
        if self.config.md_teacher_layer == "last" or len(teacher) != len(student):
            teacher = [state.layers[-1]] * len(student)
        layers = [(s["pred_logits"], t) for s, t in zip(student, teacher)]
        return TeacherGuidedMatcher(self.hungarian, layers, names, self.config.md_box, self.config.mqf_beta)

    def assigner(self, group: LossGroup, ctx: StepContext) -> TeacherGuidedMatcher | None:
        """(a) on the main queries: the teacher-guided assigner (learned-query hosts by default)."""
        state = ctx.stash.get(STASH)
        if group.suffix != "" or not self.md_main or state is None:
            return None
        matcher = self._matcher(group.outputs, state)
        ctx.stash[MATCHERS]["od_md"] = matcher
        return matcher

    def loss_groups(self, outputs: Mapping[str, Any], ctx: StepContext) -> list[LossGroup]:
        """(a) on the teacher-initial group (its GT loss) and (c) the auxiliary group's fixed assignment."""
        state, groups = ctx.stash.get(STASH), outputs.get("groups", {})
        if state is None:
            return []
        result = []
        if self.md_init and INIT in groups:
            matcher = self._matcher(groups[INIT], state)
            ctx.stash[MATCHERS][f"{INIT}_md"] = matcher
            result.append(LossGroup(INIT, groups[INIT], ctx.targets, matcher=matcher))
        if AUX in groups:
            meta, out = outputs["group_meta"][AUX], groups[AUX]
            valid = meta["valid"]
            if out["pred_logits"].shape[1] == 0:  # no GT in the batch: zero terms under the same keys
                out = zero_loss_outputs(out)
                valid = torch.zeros(out["pred_logits"].shape[:2], dtype=torch.bool, device=valid.device)
            result.append(LossGroup(AUX, out, ctx.targets, indices=meta["indices"], num_boxes=meta["num_boxes"],
                                    valid=valid))
        return result

    def extra_losses(self, outputs: Mapping[str, Any], ctx: StepContext) -> dict[str, Tensor]:
        """(a) box terms toward the teacher's match where it differs; (b) prediction distillation, every layer."""
        state = ctx.stash.get(STASH)
        if state is None:
            return {}
        losses: dict[str, Tensor] = {}
        if self.config.md_box == "both" and self.config.md_teacher_box_coef != 0:
            for suffix, matcher in ctx.stash.get(MATCHERS, {}).items():
                losses.update(matcher.teacher_box_losses(ctx.targets, suffix))
        group = outputs.get("groups", {}).get(INIT)
        if self.config.init_queries and group is not None:
            student = [*group.get("aux_outputs", []), group]
            teacher = state.layers if len(state.layers) == len(student) else [state.layers[-1]] * len(student)
            names = [*range(len(student) - 1), None]
            for name, s, t in zip(names, student, teacher):
                for term, value in prediction_distillation(s, t, self.config.pd_threshold).items():
                    losses[loss_key(term, name, "od_pd")] = value
        return losses
