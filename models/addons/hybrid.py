"""H-DETR's hybrid branch: an extra group of one-to-many queries matched to ground truth repeated k times.

specs/deformable_family.md §3.1 ([HD] HDETR/H-Deformable-DETR). The one-to-many queries are a query group
behind the shared block mask (models/query_groups.py): they see each other but never the one-to-one
queries, and the one-to-one queries never see them. The host builds them exactly like its main queries
(``group_queries``): in two-stage the proposals ranked Q1+1 .. Q1+Qm (the one-to-one queries take the
first Q1), in one-stage / with mixed selection the rows Q1 .. Q1+Qm-1 of the model's own query table
(Deformable-DETR: ``query_embed``, official names and shapes, so H-DETR's released checkpoints load;
DAB: ``tgt_embed``/``refpoint_embed``; DINO: ``transformer.tgt_embed``, the rows its selected proposals
take their content from). Evaluation never builds the group: only the Q1 one-to-one queries exist.
"""
from __future__ import annotations

import argparse
from typing import Any, Mapping, Sequence

from torch import Tensor, nn

from util.errors import FlagError

from ..query_groups import EncoderOutput, QueryGroup
from ..registry import register_addon
from .base import AddOn, HostRequest, LossGroup, LossSpec, StepContext

GROUP = "one2many"


def repeat_targets(targets: Sequence[Mapping[str, Tensor]], k: int) -> list[dict[str, Tensor]]:
    """Every image's ground truth tiled k times (labels [k*G], boxes [k*G, 4])."""
    return [{**t, "labels": t["labels"].repeat(k), "boxes": t["boxes"].repeat(k, 1)} for t in targets]


@register_addon("hybrid")
class HybridBranch(AddOn):
    """H-DETR's hybrid matching branch (losses under the official suffix ``_one2many``).

    Args:
        model: the host detector (``group_queries``), built with ``num_extra_queries >= num_one2many``.
        num_one2many: Qm, the one-to-many queries.
        k: times each ground-truth box is repeated.
        lambda_one2many: weight of every one-to-many loss (multiplies its coefficient in weight_dict).
    """

    name = "hybrid"
    order = 20
    requires = frozenset({"group_queries"})

    def __init__(self, model: nn.Module, num_one2many: int, k: int, lambda_one2many: float) -> None:
        self.model = model  # not a submodule: the queries and heads are the model's own parameters
        self.num_one2many, self.k, self.lambda_one2many = num_one2many, k, lambda_one2many

    @classmethod
    def add_args(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("H-DETR hybrid branch (--num_queries_one2one is --num_queries)")
        g.add_argument("--num_queries_one2many", default=0, type=int,
                       help="one-to-many queries Qm; > 0 switches the hybrid branch on (H-DETR configs: 1500)")
        g.add_argument("--k_one2many", default=5, type=int, help="ground-truth repetitions (H-DETR configs: 6)")
        g.add_argument("--lambda_one2many", default=1.0, type=float, help="weight of the one-to-many losses")

    @classmethod
    def enabled(cls, args: argparse.Namespace) -> bool:
        # Qm = 0 is the baseline (the official code then runs a NaN loss unless --k_one2many 0 is passed).
        return args.num_queries_one2many > 0

    @classmethod
    def request(cls, args: argparse.Namespace) -> HostRequest:
        if args.num_queries_one2many <= 0:
            raise FlagError("the hybrid branch (--addons hybrid) needs --num_queries_one2many > 0")
        return HostRequest(extra_queries=args.num_queries_one2many)

    @classmethod
    def from_args(cls, args: argparse.Namespace, model: nn.Module) -> HybridBranch:
        return cls(model, args.num_queries_one2many, args.k_one2many, args.lambda_one2many)

    def loss_specs(self, main: LossSpec) -> list[LossSpec]:
        return [LossSpec(GROUP, main.num_aux_layers, dict(main.coefs), self.lambda_one2many)]

    def query_groups(self, enc: EncoderOutput, ctx: StepContext) -> list[QueryGroup]:
        """The Qm one-to-many queries for this training step (same construction as the main queries)."""
        queries = self.model.group_queries(enc, enc.num_queries, self.num_one2many)
        if queries is None:
            return []
        tgt, reference, query_pos = queries
        return [QueryGroup(GROUP, tgt, reference, query_pos)]

    def loss_groups(self, outputs: Mapping[str, Any], ctx: StepContext) -> list[LossGroup]:
        """Hungarian matching of the one-to-many outputs (all layers) to the k-times repeated targets."""
        out = outputs.get("groups", {}).get(GROUP)
        if out is None:  # evaluation: no one-to-many queries
            return []
        return [LossGroup(GROUP, out, repeat_targets(ctx.targets, self.k))]
