"""Query denoising as a training add-on: DN-DETR's denoising and DINO's contrastive denoising (CDN).

specs/dn_dab_dino.md §3 (DN-DETR), §4.3 and §4.7 (DINO), §5 (plug-in design). Written from the spec;
no code of IDEA-Research/DN-DETR or IDEA-Research/DINO is reproduced.

Every step (training only) the add-on turns the batch's ground truth into an extra decoder query group:
noised labels through a label embedding (the content) and noised boxes (the anchors), G groups of
``S = max GT per image`` slots (CDN: a positive and a negative copy per group), padded per image. The
host runs the group behind the one block attention mask (models/query_groups.py): the main queries
never see it, denoising groups never see each other, denoising queries see the main queries (as in
both originals). Each decoder layer's outputs of the group are supervised with fixed indices (slot
``k * S + j`` <-> GT ``j``) by the ordinary SetCriterion terms, normalised by ``G * num_boxes`` (in one
process both originals' count; across processes the criterion averages ``G * n`` over ranks, where DINO
averages ``n`` then multiplies by its local G and DN-DETR keeps its local count). A batch without GT gets
no denoising slots and zero terms under the same keys (the originals' P = 0).

Official by default: the noise takes the same draws from torch's global generator as the originals'
``prepare_for_dn`` / ``prepare_for_cdn`` (same calls, shapes and order: label noise first, one uniform
per entry and new labels for the flipped entries only, then box noise), DINO's group rule (P9), the
same padding (content 0, anchor logit 0) and the same anchor clamp. Opt-in departures:
``--dn_always_budget`` (CDN groups = dn_number // S also below 50) and ``--dn_max_queries`` (a cap).

Supervision of the non-positive slots:
* ``dn`` (DN-DETR): padding slots get no loss at all (a valid-slot mask).
* ``cdn`` (DINO): negatives and padding slots are supervised as "no object".
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from util.misc import inverse_sigmoid

from ..query_groups import EncoderOutput, QueryGroup
from ..registry import register_addon
from .base import AddOn, HostRequest, LossGroup, LossSpec, StepContext

ANCHOR_EPS = 1e-3  # the originals' clamp of the anchor logit (about +-6.9)


@dataclass(frozen=True)
class DenoisingConfig:
    """How denoising queries are made.

    Attributes:
        mode: "dn" (DN-DETR) or "cdn" (DINO contrastive denoising).
        num_groups: dn: the fixed number of groups G (DN-DETR ``--scalar``).
        budget: cdn: DINO's ``--dn_number``: G = budget // S when 2 * budget >= 100, else a fixed
            2 * budget groups (DINO's rule, P9); at least 1.
        always_budget: cdn: G = max(1, budget // S) for every budget (opt-in; not DINO's rule below 50).
        label_noise_prob: probability that a label is replaced by a uniformly drawn class.
        box_noise_scale: lambda of the box noise.
        max_queries: cap on denoising queries per image; fewer groups first, then a random subset of
            the GT of crowded images (0: no cap, as the originals).
    """

    mode: str = "dn"
    num_groups: int = 5
    budget: int = 100
    always_budget: bool = False
    label_noise_prob: float = 0.2
    box_noise_scale: float = 0.4
    max_queries: int = 0

    @property
    def copies(self) -> int:
        return 2 if self.mode == "cdn" else 1

    def layout(self, max_gt: int) -> tuple[int, int]:
        """(groups G, slots per copy S) for a batch whose most crowded image has ``max_gt`` boxes."""
        c = self.copies
        slots = max_gt
        if self.max_queries > 0:
            slots = min(slots, max(1, self.max_queries // c))
        if self.mode == "dn":
            groups = self.num_groups
        elif slots == 0:
            groups = 1
        elif self.always_budget or 2 * self.budget >= 100:
            groups = self.budget // slots
        else:  # DINO: a small dn_number is a fixed number of (doubled) groups, not a budget
            groups = 2 * self.budget
        groups = max(1, groups)
        if self.max_queries > 0:
            groups = max(1, min(groups, self.max_queries // (c * max(slots, 1))))
        return groups, slots


def label_noise(labels: Tensor, prob: float, num_classes: int) -> Tensor:
    """Each label is replaced, with probability ``prob``, by a class drawn uniformly from [0, num_classes).

    Draws (as both originals): one uniform per entry, then one class per replaced entry; none if prob <= 0.
    """
    if prob <= 0:
        return labels
    flipped = (torch.rand_like(labels, dtype=torch.float) < prob).nonzero().view(-1)
    return labels.scatter(0, flipped, torch.randint_like(flipped, 0, num_classes))


def dn_box_noise(boxes: Tensor, scale: float) -> Tensor:
    """DN-DETR: centre moved within lambda * half the size, size scaled by [1 - lambda, 1 + lambda]; cxcywh.

    Draws one uniform per coordinate (none if scale <= 0).
    """
    if scale <= 0:
        return boxes
    spread = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1)
    return (boxes + (torch.rand_like(boxes) * 2 - 1.0) * spread * scale).clamp(0.0, 1.0)


def cdn_box_noise(boxes: Tensor, scale: float, negative: Tensor) -> Tensor:
    """DINO: each corner moves by r * lambda half-sizes, r ~ U(0, 1) (positive) or U(1, 2) (negative).

    Draws a sign per coordinate, then a magnitude per coordinate (none if scale <= 0). Negatives may
    invert (x1 > x2); their anchors are clamped like the original's (harmless, P10).
    """
    if scale <= 0:
        return boxes
    corners = box_cxcywh_to_xyxy(boxes)
    half = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:] / 2], 1)
    sign = torch.randint_like(boxes, 0, 2, dtype=torch.float32) * 2.0 - 1.0
    magnitude = torch.rand_like(boxes) + negative.to(boxes.dtype).unsqueeze(1)
    corners = (corners + magnitude * sign * half * scale).clamp(0.0, 1.0)
    return box_xyxy_to_cxcywh(corners)


class DenoisingQueries(nn.Module):
    """Builds the denoising query group from the ground truth.

    Args:
        num_classes: K; noised labels are drawn from [0, K). An own table has K + 1 rows (DN-DETR's and
            DINO's shape: 92 for COCO).
        hidden_dim: D, the decoder content size.
        config: DenoisingConfig.
        indicator: DN-DETR's indicator bit: the label table is D - 1 wide and every denoising query's
            content is [label_enc(label), 1] (padding slots: all zeros); the host's own content queries
            end in 0. Without it (DINO) the content is label_enc(label), D wide.
        label_enc: the host's label table (the official models own ``label_enc``); used, not registered
            here, so its state-dict key stays the host's. None: this module owns ``label_enc``.
    """

    def __init__(self, num_classes: int, hidden_dim: int, config: DenoisingConfig, indicator: bool = False,
                 label_enc: nn.Embedding | None = None) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.config = config
        self.indicator = indicator
        width = hidden_dim - 1 if indicator else hidden_dim
        self._host_table: tuple[nn.Embedding, ...] = ()
        if label_enc is None:
            self.label_enc = nn.Embedding(num_classes + 1, width)
            return
        if label_enc.embedding_dim != width:
            raise ValueError(f"the host's label_enc is {label_enc.embedding_dim} wide; denoising needs {width} "
                             f"(hidden_dim {hidden_dim}{' - 1 for the indicator bit' if indicator else ''})")
        if label_enc.num_embeddings < num_classes:
            raise ValueError(f"the host's label_enc has {label_enc.num_embeddings} rows, fewer than the "
                             f"{num_classes} classes")
        self._host_table = (label_enc,)  # a tuple: not a submodule, no duplicate state-dict key

    @property
    def owns_table(self) -> bool:
        """Whether the label table is this module's own (else the host's)."""
        return not self._host_table

    @property
    def table(self) -> nn.Embedding:
        """The label embedding in use (the host's, else this module's own)."""
        return self._host_table[0] if self._host_table else self.label_enc

    def _content(self, labels: Tensor) -> Tensor:
        """Content vectors of denoising queries with these (noised) labels: [M, D]."""
        emb = self.table(labels)
        return torch.cat([emb, emb.new_ones(emb.shape[0], 1)], 1) if self.indicator else emb

    def forward(self, targets: Sequence[Mapping[str, Tensor]], batch_size: int, device: torch.device,
                name: str = "dn") -> QueryGroup:
        """The denoising group of one step.

        Returns:
            QueryGroup with ``tgt`` [B, P, D], ``reference`` [B, P, 4] sigmoid-space anchors, the
            within-group mask [P, P], and meta ``indices`` (per image (slot, gt) of the positives),
            ``num_boxes`` (G * positives per group), ``valid`` ([B, P] or None), ``num_groups``, ``pad``.
            Without any GT in the batch P = 0 (as the originals); the empty content stays connected
            to the label table (DDP).
        """
        cfg = self.config
        counts = [len(t["labels"]) for t in targets]
        groups, slots = cfg.layout(max(counts, default=0))
        sel = [self._select(n, slots, device) for n in counts]
        kept = [len(s) for s in sel]
        c = cfg.copies
        stride, copies = c * slots, groups * c  # copy k: group k // c, negative when k % c == 1
        labels = torch.cat([t["labels"][s] for t, s in zip(targets, sel)])  # [M], image order
        boxes = torch.cat([t["boxes"][s] for t, s in zip(targets, sel)]).float()
        copy_idx = torch.arange(copies, device=device).repeat_interleave(len(labels))
        labels, boxes = labels.repeat(copies), boxes.repeat(copies, 1)  # copy-major

        # the only random draws, in the originals' order: labels, then boxes
        labels = label_noise(labels, cfg.label_noise_prob, self.num_classes)
        if cfg.mode == "cdn":
            boxes = cdn_box_noise(boxes, cfg.box_noise_scale, copy_idx % c == 1)
        else:
            boxes = dn_box_noise(boxes, cfg.box_noise_scale)
        if sum(kept) == 0:
            return self._empty_group(batch_size, device, name, groups)

        pad = groups * stride
        batch_idx = torch.cat([torch.full((k,), b, dtype=torch.long, device=device) for b, k in enumerate(kept)])
        local_idx = torch.cat([torch.arange(k, device=device) for k in kept])
        slot_idx = copy_idx * slots + local_idx.repeat(copies)
        batch_idx = batch_idx.repeat(copies)
        dim = self.table.embedding_dim + int(self.indicator)
        tgt = self.table.weight.new_zeros(batch_size, pad, dim)  # padding: content 0 (indicator 0)
        tgt[batch_idx, slot_idx] = self._content(labels)
        reference = boxes.new_full((batch_size, pad, 4), 0.5)  # padding: anchor logit 0
        reference[batch_idx, slot_idx] = inverse_sigmoid(boxes, ANCHOR_EPS).sigmoid()
        block = torch.arange(pad, device=device) // stride
        attn_mask = block[:, None] != block[None, :]  # groups never see each other

        indices = []
        offsets = torch.arange(groups, device=device) * stride
        for s, k in zip(sel, kept):
            q = (offsets[:, None] + torch.arange(k, device=device)[None]).flatten()
            indices.append((q, s.repeat(groups)))
        valid = None
        if cfg.mode == "dn":  # DN-DETR: only real slots are supervised, padding gets no loss
            valid = torch.zeros(batch_size, pad, dtype=torch.bool, device=device)
            valid[batch_idx, slot_idx] = True
        meta = {"indices": indices, "num_boxes": float(groups * sum(kept)), "valid": valid,
                "num_groups": groups, "pad": slots}
        return QueryGroup(name, tgt, reference, None, attn_mask, see_main=True, meta=meta)

    @staticmethod
    def _select(n: int, slots: int, device: torch.device) -> Tensor:
        """Indices of the GT an image denoises: all of them, or a random subset beyond the cap."""
        if n <= slots:
            return torch.arange(n, device=device)
        return torch.randperm(n, device=device)[:slots].sort().values

    def _empty_group(self, batch_size: int, device: torch.device, name: str, groups: int) -> QueryGroup:
        """No GT in the batch: zero denoising slots (the originals' P = 0)."""
        empty = torch.zeros(0, dtype=torch.long, device=device)
        dim = self.table.embedding_dim + int(self.indicator)
        tgt = (self.table.weight[0, 0] * 0.0).expand(batch_size, 0, dim)  # keeps the table in the graph (DDP)
        reference = torch.zeros(batch_size, 0, 4, device=device)
        meta = {"indices": [(empty, empty)] * batch_size, "num_boxes": 0.0, "valid": None,
                "num_groups": groups, "pad": 0}
        return QueryGroup(name, tgt, reference, None, None, see_main=True, meta=meta)


def _zero_loss_outputs(outputs: Mapping[str, Any]) -> dict[str, Any]:
    """Stand-in one-slot predictions for a group without slots: every term 0 (the originals' zero tensors).

    Keeps the loss keys and the list of all-reduced normalisers the same on every process.
    """
    def one(out: Mapping[str, Tensor]) -> dict[str, Tensor]:
        logits = out["pred_logits"].new_zeros(out["pred_logits"].shape[0], 1, out["pred_logits"].shape[-1])
        logits[..., -1] = 1.0  # argmax = last class: cardinality error 0
        return {"pred_logits": logits, "pred_boxes": out["pred_boxes"].new_full((logits.shape[0], 1, 4), 0.5)}

    stand_in = one(outputs)
    if "aux_outputs" in outputs:
        stand_in["aux_outputs"] = [one(aux) for aux in outputs["aux_outputs"]]
    return stand_in


@register_addon("dn")
class Denoising(AddOn):
    """Query denoising (DN-DETR ``--use_dn``; DINO contrastive denoising with ``--contrastive``)."""

    name = "dn"
    order = 10
    requires = frozenset({"anchor_groups"})

    def __init__(self, queries: DenoisingQueries) -> None:
        self.queries = queries

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("denoising add-on (DN-DETR / DINO flags)")
        g.add_argument("--use_dn", action="store_true", help="query denoising (DN-DETR; DINO with --contrastive)")
        g.add_argument("--contrastive", action="store_true",
                       help="DINO contrastive denoising: positive + negative queries, budget --dn_number")
        g.add_argument("--scalar", default=5, type=int, help="DN-DETR: number of denoising groups")
        g.add_argument("--label_noise_scale", default=0.2, type=float, help="DN-DETR: label flip probability")
        g.add_argument("--box_noise_scale", default=0.4, type=float, help="DN-DETR: box noise lambda")
        g.add_argument("--dn_number", default=100, type=int,
                       help="DINO: groups = dn_number // max GT when dn_number >= 50, else 2 * dn_number fixed groups")
        g.add_argument("--dn_box_noise_scale", default=0.4, type=float,
                       help="DINO: box noise lambda (the published runs use 1.0)")
        g.add_argument("--dn_label_noise_ratio", default=0.5, type=float,
                       help="DINO: label noise ratio; the flip probability is half of it (as in DINO)")
        g.add_argument("--dn_always_budget", action="store_true",
                       help="DINO: dn_number is a per-image budget for every value: groups = max(1, dn_number // "
                            "max GT) also below 50 (official: 2 * dn_number fixed groups there)")
        g.add_argument("--dn_max_queries", default=0, type=int,
                       help="cap on denoising queries per image (fewer groups, then a random GT subset); "
                            "0: none (official)")

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        # --use_dn switches denoising on; --contrastive only chooses DINO's variant (so `-m dino --no-use_dn`
        # trains without denoising although DINO's defaults keep --contrastive on).
        return bool(getattr(args, "use_dn", False))

    @classmethod
    def request(cls, args: argparse.Namespace) -> HostRequest:
        # DN-DETR's indicator bit (DINO's contrastive denoising has none); hosts without a learned content
        # table (two-stage deformable_detr: content from the proposals) run denoising without it.
        return HostRequest(reserved_content_channels=0 if args.contrastive else 1)

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> Denoising:
        if args.contrastive:
            config = DenoisingConfig("cdn", budget=args.dn_number, always_budget=args.dn_always_budget,
                                     label_noise_prob=args.dn_label_noise_ratio * 0.5,
                                     box_noise_scale=args.dn_box_noise_scale, max_queries=args.dn_max_queries)
        else:
            config = DenoisingConfig("dn", num_groups=args.scalar, label_noise_prob=args.label_noise_scale,
                                     box_noise_scale=args.box_noise_scale, max_queries=args.dn_max_queries)
        # The official DINO and DN-DETR models own ``label_enc``; a host that does keeps it (and its key).
        return cls(DenoisingQueries(args.num_classes, args.hidden_dim, config,
                                    indicator=model.reserved_content_channels > 0, label_enc=model.label_table))

    def module(self) -> nn.Module | None:
        """The add-on's own label table; None when the host owns it."""
        return self.queries if self.queries.owns_table else None

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        return [LossSpec(self.name, main.num_aux_layers, dict(main.coefs))]

    def query_groups(self, enc: EncoderOutput, ctx: StepContext) -> list[QueryGroup]:
        """The denoising group; none without targets (a training forward ``model(samples)``: no denoising)."""
        if ctx.targets is None:
            return []
        return [self.queries(ctx.targets, enc.memory.shape[0], enc.memory.device, self.name)]

    def loss_groups(self, outputs: Mapping[str, Any], ctx: StepContext) -> list[LossGroup]:
        if self.name not in outputs.get("groups", {}):
            return []  # evaluation, or a forward without providers
        meta = outputs["group_meta"][self.name]
        group_outputs, valid = outputs["groups"][self.name], meta["valid"]
        if group_outputs["pred_logits"].shape[1] == 0:  # no GT in the batch: zero terms, stable keys
            group_outputs = _zero_loss_outputs(group_outputs)
            valid = torch.zeros(group_outputs["pred_logits"].shape[:2], dtype=torch.bool,
                                device=group_outputs["pred_logits"].device)
        return [LossGroup(self.name, group_outputs, ctx.targets, indices=meta["indices"],
                          num_boxes=meta["num_boxes"], valid=valid)]
