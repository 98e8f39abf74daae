"""The model outputs: one typed structure in DETR's vocabulary (plain dicts at run time).

Users' scripts and the official engines index ``outputs["pred_logits"]``, so the structure is a set of
TypedDicts (checked by type checkers, plain ``dict`` for users, ``torch.save`` and DDP) built in one
place, ``assemble_outputs``, for every detector.
"""
from __future__ import annotations

from typing import Any, Sequence, TypedDict

import torch
from torch import Tensor

from .query_groups import EncoderOutput, QueryGroup


class Predictions(TypedDict):
    """One decoder layer's predictions: ``pred_logits`` [B, N, K] unnormalised, ``pred_boxes`` [B, N, 4] cxcywh."""

    pred_logits: Tensor
    pred_boxes: Tensor


class LayerPredictions(Predictions, total=False):
    """The last layer's predictions and, with aux loss, ``aux_outputs``: layers 0..L-2, same keys."""

    aux_outputs: list[Predictions]


class EncoderPredictions(TypedDict, total=False):
    """Two-stage proposals: ``pred_logits`` [B, S', K], ``pred_boxes`` [B, S', 4]; Deformable-DETR also gives
    every token's fixed ``anchors`` [B, S, 4] (sigmoid space) and ``anchor_valid`` [B, S] bool."""

    pred_logits: Tensor
    pred_boxes: Tensor
    anchors: Tensor
    anchor_valid: Tensor


class DetrOutputs(LayerPredictions, total=False):
    """Everything a forward returns.

    Keys: ``pred_logits``, ``pred_boxes``, ``aux_outputs`` (main queries); ``enc_outputs`` (two-stage);
    in training only: ``groups`` {group name: LayerPredictions} and ``group_meta`` {group name: the add-on's
    meta} for the add-ons' query groups, ``o2m_outputs`` (LayerPredictions of layers with a one-to-many
    output, MS-DETR), and ``encoder`` (the EncoderOutput: memory [B, S, C], its padding mask, shapes, valid
    ratios, proposals) for add-ons that work on the memory.
    """

    enc_outputs: EncoderPredictions
    groups: dict[str, LayerPredictions]
    group_meta: dict[str, dict[str, Any]]
    o2m_outputs: LayerPredictions
    encoder: EncoderOutput


def layer_predictions(logits: Sequence[Tensor], boxes: Sequence[Tensor], aux_loss: bool) -> LayerPredictions:
    """Per-layer [B, N, K] logits and [B, N, 4] boxes -> the last layer's and, with aux loss, the others'."""
    out: LayerPredictions = {"pred_logits": logits[-1], "pred_boxes": boxes[-1]}
    if aux_loss:
        out["aux_outputs"] = [{"pred_logits": a, "pred_boxes": b} for a, b in zip(logits[:-1], boxes[:-1])]
    return out


def assemble_outputs(logits: Sequence[Tensor], boxes: Sequence[Tensor], num_queries: int,
                     groups: Sequence[QueryGroup], aux_loss: bool,
                     o2m: tuple[Sequence[Tensor], Sequence[Tensor]] | None = None,
                     enc_outputs: EncoderPredictions | None = None,
                     encoder: EncoderOutput | None = None) -> DetrOutputs:
    """Split per-layer predictions of main queries + groups [B, Q + groups, ...] into the output structure.

    Args:
        logits, boxes: per decoder layer, over the main queries followed by every group.
        num_queries: Q, the main queries.
        groups: the query groups in decoder order.
        o2m: per-layer logits and boxes of the main queries' one-to-many features (MS-DETR), or None.
        enc_outputs: the two-stage proposals, or None.
        encoder: the encoder's output, added for add-ons (training), or None.
    """
    sizes = [num_queries] + [g.size for g in groups]
    split_logits = [torch.split(x, sizes, dim=1) for x in logits]
    split_boxes = [torch.split(x, sizes, dim=1) for x in boxes]
    result: DetrOutputs = layer_predictions([x[0] for x in split_logits], [x[0] for x in split_boxes], aux_loss)
    for gi, group in enumerate(groups, start=1):
        part = layer_predictions([x[gi] for x in split_logits], [x[gi] for x in split_boxes], aux_loss)
        result.setdefault("groups", {})[group.name] = part
    if o2m is not None:
        result["o2m_outputs"] = layer_predictions(o2m[0], o2m[1], aux_loss)
    if enc_outputs is not None:
        result["enc_outputs"] = enc_outputs
    if groups:
        result["group_meta"] = {g.name: g.meta for g in groups}
    if encoder is not None:
        result["encoder"] = encoder
    return result
