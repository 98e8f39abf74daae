"""Extra decoder query groups (denoising, one-to-many, ...) and the one block attention mask.

Add-ons hand the model extra groups of decoder queries; the decoder runs them together with the
main queries under ONE block-diagonal self-attention mask built here: main queries never see group
queries, groups never see each other, and each group may bring its own internal mask.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import Tensor


@dataclass
class QueryGroup:
    """A group of extra decoder queries, appended after the main queries.

    Attributes:
        name: group name; its outputs appear under ``outputs["groups"][name]``.
        tgt: [B, N, C] content queries.
        reference: [B, N, 4] sigmoid-space boxes (cx, cy, w, h), or [B, N, 2] points; same
            dimensionality as the host's main references.
        query_pos: [B, N, C] positional queries, or None to let the host derive them from
            ``reference`` (hosts whose positional query is a function of the anchor).
        attn_mask: [N, N] bool, True = attention blocked, inside the group (None: all visible).
        see_main: the group's queries may attend to the main queries (DN-DETR/DINO denoising queries
            do); the main queries never see a group either way.
        meta: anything the add-on needs back at loss time.
    """

    name: str
    tgt: Tensor
    reference: Tensor
    query_pos: Tensor | None = None
    attn_mask: Tensor | None = None
    see_main: bool = False
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.tgt.shape[1]


@dataclass
class EncoderOutput:
    """What a query-group provider may look at: the encoder's memory and, in two-stage, proposals.

    Attributes:
        memory: [B, S, C] encoder output.
        mask_flatten: [B, S] bool padding mask.
        spatial_shapes: [L, 2] int64 (H_l, W_l).
        valid_ratios: [B, L, 2] (w, h) valid fraction per level.
        enc_logits: [B, S, K] proposal logits (two-stage only).
        enc_coord_unact: [B, S, 4] proposal boxes before sigmoid (two-stage only).
        num_queries: number of main queries.
        shapes: (H_l, W_l) per level as Python ints, where the host has them (``spatial_shapes`` without a
            host-device synchronisation); None otherwise.
    """

    memory: Tensor
    mask_flatten: Tensor
    spatial_shapes: Tensor
    valid_ratios: Tensor
    num_queries: int
    enc_logits: Tensor | None = None
    enc_coord_unact: Tensor | None = None
    shapes: Sequence[tuple[int, int]] | None = None


# A provider returns the groups of one add-on for this step: a list, one group, or None.
QueryProvider = Callable[[EncoderOutput], "list[QueryGroup] | QueryGroup | None"]


def collect_groups(providers: Sequence[QueryProvider], enc: EncoderOutput) -> list[QueryGroup]:
    """Every provider's groups for this step, in provider order."""
    groups: list[QueryGroup] = []
    for provide in providers:
        made = provide(enc)
        if isinstance(made, QueryGroup):
            groups.append(made)
        elif made:
            groups.extend(made)
    return groups


def build_group_attn_mask(num_main: int, groups: Sequence[QueryGroup], device: torch.device) -> Tensor | None:
    """The block self-attention mask for main queries followed by ``groups``.

    Returns:
        [T, T] bool (True = blocked), T = num_main + sum of group sizes; None without groups, so a run
        without add-ons is exactly the baseline.
    """
    if not groups:
        return None
    total = num_main + sum(g.size for g in groups)
    mask = torch.ones(total, total, dtype=torch.bool, device=device)
    mask[:num_main, :num_main] = False
    start = num_main
    for g in groups:
        end = start + g.size
        if g.attn_mask is None:
            mask[start:end, start:end] = False
        else:
            if tuple(g.attn_mask.shape) != (g.size, g.size):
                raise ValueError(f"query group {g.name!r}: attn_mask must be [{g.size}, {g.size}], "
                                 f"got {tuple(g.attn_mask.shape)}")
            mask[start:end, start:end] = g.attn_mask
        if g.see_main:
            mask[start:end, :num_main] = False
        start = end
    return mask


def split_sizes(num_main: int, groups: Sequence[QueryGroup]) -> list[int]:
    """Sizes along the query axis: main first, then each group in order."""
    return [num_main] + [g.size for g in groups]
