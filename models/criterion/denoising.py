"""Query denoising as a training add-on: DN-DETR's denoising and DINO's contrastive denoising (CDN).

specs/dn_dab_dino.md §3 (DN-DETR), §4.3 and §4.7 (DINO), §5 (plug-in design). Written from the spec;
no code of IDEA-Research/DN-DETR or IDEA-Research/DINO is reproduced.

Every step (training only) the add-on turns the batch's ground truth into an extra decoder query group:
noised labels through a label embedding (the content) and noised boxes (the anchors), G groups of
``S = max GT per image`` slots (CDN: a positive and a negative copy per group), padded per image. The
host runs the group behind the one block attention mask (models/query_groups.py): the main queries
never see it, denoising groups never see each other, denoising queries see the main queries (as in
both originals). Each decoder layer's outputs of the group are supervised with fixed indices (slot
``k * S + j`` <-> GT ``j``) by the ordinary SetCriterion terms, normalised by ``G * num_boxes``
(all-reduced).

Supervision of the non-positive slots:
* ``dn`` (DN-DETR): padding slots get no loss at all (a valid-slot mask).
* ``cdn`` (DINO): negatives and padding slots are supervised as "no object".
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor, nn

from util.box_ops import box_cxcywh_to_xyxy, box_xyxy_to_cxcywh
from util.misc import inverse_sigmoid

from ..query_groups import EncoderOutput, QueryGroup
from ..registry import register_addon
from .base import AddOn, LossGroup, LossSpec, ModelOptions, StepContext

ANCHOR_EPS = 1e-3  # the originals' clamp of the anchor logit (about +-6.9)


@dataclass(frozen=True)
class DenoisingConfig:
    """How denoising queries are made.

    Attributes:
        mode: "dn" (DN-DETR) or "cdn" (DINO contrastive denoising).
        num_groups: dn: the fixed number of groups G (DN-DETR ``--scalar``).
        budget: cdn: positive queries per image; G = max(1, budget // S) (DINO ``--dn_number``).
        label_noise_prob: probability that a label is replaced by a uniformly drawn class.
        box_noise_scale: lambda of the box noise.
        max_queries: cap on denoising queries per image; fewer groups first, then a random subset of
            the GT of crowded images (0: no cap).
    """

    mode: str = "dn"
    num_groups: int = 5
    budget: int = 100
    label_noise_prob: float = 0.2
    box_noise_scale: float = 0.4
    max_queries: int = 1000

    @property
    def copies(self) -> int:
        return 2 if self.mode == "cdn" else 1

    def layout(self, max_gt: int) -> tuple[int, int]:
        """(groups G, slots per copy S) for a batch whose most crowded image has ``max_gt`` boxes."""
        c = self.copies
        slots = max_gt
        if self.max_queries > 0:
            slots = min(slots, max(1, self.max_queries // c))
        groups = self.num_groups if self.mode == "dn" else max(1, self.budget // max(slots, 1))
        if self.max_queries > 0:
            groups = max(1, min(groups, self.max_queries // (c * max(slots, 1))))
        return groups, slots


def dn_box_noise(boxes: Tensor, scale: float) -> Tensor:
    """DN-DETR: centre moved within lambda * half the size, size scaled by [1 - lambda, 1 + lambda]; cxcywh."""
    u = torch.rand_like(boxes) * 2 - 1
    shift = torch.cat([boxes[:, 2:] / 2, boxes[:, 2:]], 1) * scale
    return (boxes + u * shift).clamp(0.0, 1.0)


def cdn_box_noise(boxes: Tensor, scale: float, negative: Tensor) -> Tensor:
    """DINO: each corner moves by r * lambda half-sizes, r ~ U(0, 1) (positive) or U(1, 2) (negative).

    Negatives may invert (x1 > x2); their anchors are clamped like the original's (harmless, P10).
    """
    corners = box_cxcywh_to_xyxy(boxes)
    half = torch.cat([boxes[:, 2:], boxes[:, 2:]], 1) / 2
    sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
    r = torch.rand_like(boxes) + negative.to(boxes.dtype).unsqueeze(1)
    corners = (corners + sign * r * half * scale).clamp(0.0, 1.0)
    return box_xyxy_to_cxcywh(corners)


class DenoisingQueries(nn.Module):
    """Builds the denoising query group from the ground truth; owns the label embedding.

    Args:
        num_classes: K; the table has K + 1 rows (DN-DETR's and DINO's shape: 92 for COCO).
        hidden_dim: D, the decoder content size.
        config: DenoisingConfig.
        indicator: DN-DETR's indicator bit: the label table is D - 1 wide and every denoising query's
            content is [label_enc(label), 1] (padding slots: all zeros); the host's own content queries
            end in 0. Without it (DINO) the content is label_enc(label), D wide.
    """

    def __init__(self, num_classes: int, hidden_dim: int, config: DenoisingConfig, indicator: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.config = config
        self.indicator = indicator
        self.label_enc = nn.Embedding(num_classes + 1, hidden_dim - 1 if indicator else hidden_dim)

    def _content(self, labels: Tensor) -> Tensor:
        """Content vectors of denoising queries with these (noised) labels: [M, D]."""
        emb = self.label_enc(labels)
        return torch.cat([emb, emb.new_ones(emb.shape[0], 1)], 1) if self.indicator else emb

    def forward(self, targets: Sequence[Mapping[str, Tensor]], batch_size: int, device: torch.device,
                name: str = "dn") -> QueryGroup:
        """The denoising group of one step.

        Returns:
            QueryGroup with ``tgt`` [B, P, D], ``reference`` [B, P, 4] sigmoid-space anchors, the
            within-group mask [P, P], and meta ``indices`` (per image (slot, gt) of the positives),
            ``num_boxes`` (G * positives per group), ``valid`` ([B, P] or None), ``num_groups``, ``pad``.
            Without any GT in the batch: one unsupervised slot (keeps the embedding in the graph for DDP
            and the loss keys stable).
        """
        cfg = self.config
        counts = [len(t["labels"]) for t in targets]
        groups, slots = cfg.layout(max(counts, default=0))
        sel = [self._select(n, slots, device) for n in counts]
        kept = [len(s) for s in sel]
        if sum(kept) == 0:
            return self._empty_group(batch_size, device, name)
        c, dim = cfg.copies, self.label_enc.embedding_dim + int(self.indicator)
        stride = c * slots
        pad = groups * stride
        labels = torch.cat([t["labels"][s] for t, s in zip(targets, sel)])  # [M]
        boxes = torch.cat([t["boxes"][s] for t, s in zip(targets, sel)]).float()
        batch_idx = torch.cat([torch.full((k,), b, dtype=torch.long, device=device) for b, k in enumerate(kept)])
        local_idx = torch.cat([torch.arange(k, device=device) for k in kept])
        copies = groups * c  # copy k: group k // c, negative when k % c == 1
        copy_idx = torch.arange(copies, device=device).repeat_interleave(len(labels))
        labels, boxes = labels.repeat(copies), boxes.repeat(copies, 1)
        batch_idx, local_idx = batch_idx.repeat(copies), local_idx.repeat(copies)

        flip = torch.rand(labels.shape, device=device) < cfg.label_noise_prob
        labels = torch.where(flip, torch.randint_like(labels, 0, self.num_classes), labels)
        if cfg.mode == "cdn":
            boxes = cdn_box_noise(boxes, cfg.box_noise_scale, copy_idx % c == 1)
        else:
            boxes = dn_box_noise(boxes, cfg.box_noise_scale)

        slot_idx = copy_idx * slots + local_idx
        tgt = self.label_enc.weight.new_zeros(batch_size, pad, dim)
        tgt[batch_idx, slot_idx] = self._content(labels)
        reference = boxes.new_full((batch_size, pad, 4), 0.5)
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

    def _empty_group(self, batch_size: int, device: torch.device, name: str) -> QueryGroup:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        no_object = torch.full((1,), self.num_classes, dtype=torch.long, device=device)
        tgt = (self._content(no_object) * 0.0).expand(batch_size, 1, -1)  # keeps label_enc in the graph (DDP)
        reference = torch.full((batch_size, 1, 4), 0.5, device=device)
        meta = {"indices": [(empty, empty)] * batch_size, "num_boxes": 0.0,
                "valid": torch.zeros(batch_size, 1, dtype=torch.bool, device=device), "num_groups": 1, "pad": 0}
        return QueryGroup(name, tgt, reference, None, None, see_main=True, meta=meta)


@register_addon("dn")
class Denoising(AddOn):
    """Query denoising (DN-DETR ``--use_dn``; DINO contrastive denoising with ``--contrastive``)."""

    name = "dn"
    order = 10

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
                       help="DINO: positive denoising queries per image; groups = max(1, dn_number // max GT)")
        g.add_argument("--dn_box_noise_scale", default=0.4, type=float,
                       help="DINO: box noise lambda (the published runs use 1.0)")
        g.add_argument("--dn_label_noise_ratio", default=0.5, type=float,
                       help="DINO: label noise ratio; the flip probability is half of it (as in DINO)")
        g.add_argument("--dn_max_queries", default=1000, type=int,
                       help="cap on denoising queries per image (fewer groups, then a GT subset); 0: none")

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        return bool(getattr(args, "use_dn", False) or getattr(args, "contrastive", False))

    @classmethod
    def model_options(cls, args: argparse.Namespace, options: ModelOptions) -> ModelOptions:
        # DN-DETR's indicator bit (DINO's contrastive denoising has none); hosts without a learned content
        # table (two-stage deformable_detr: content from the proposals) run denoising without it.
        return replace(options, content_indicator=not args.contrastive)

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> Denoising:
        if not getattr(model, "supports_anchor_groups", getattr(model, "two_stage", False)):
            raise ValueError("denoising needs 4-d anchor queries: use deformable_detr with --two_stage "
                             "(and --with_box_refine), dab_deformable_detr or dino")
        if args.contrastive:
            config = DenoisingConfig("cdn", budget=args.dn_number, label_noise_prob=args.dn_label_noise_ratio * 0.5,
                                     box_noise_scale=args.dn_box_noise_scale, max_queries=args.dn_max_queries)
        else:
            config = DenoisingConfig("dn", num_groups=args.scalar, label_noise_prob=args.label_noise_scale,
                                     box_noise_scale=args.box_noise_scale, max_queries=args.dn_max_queries)
        return cls(DenoisingQueries(args.num_classes, args.hidden_dim, config,
                                    indicator=getattr(model, "content_indicator", False)))

    def module(self) -> nn.Module:
        return self.queries

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        return [LossSpec(self.name, main.num_aux_layers, dict(main.coefs))]

    def query_group(self, enc: EncoderOutput, ctx: StepContext) -> QueryGroup:
        return self.queries(ctx.targets, enc.memory.shape[0], enc.memory.device, self.name)

    def loss_groups(self, outputs: Mapping[str, Any], targets: Sequence[Mapping[str, Tensor]]) -> list[LossGroup]:
        if self.name not in outputs.get("groups", {}):
            return []  # evaluation, or a forward without providers
        meta = outputs["group_meta"][self.name]
        return [LossGroup(self.name, outputs["groups"][self.name], targets, indices=meta["indices"],
                          num_boxes=meta["num_boxes"], valid=meta["valid"])]

