"""Customized positive queries: an auxiliary head's assignment as a decoder query group (spec §1.6, §4 items 1-2).

Per head and batch: the group size is N = max(9, min(max_pos_coords, max_b P_b)); an image with more positives
keeps a random subset, one with fewer is padded with random negatives of the same head (label background, label
weight 1, box weight 0; the official alternative ``use_zero_padding``, unused by its configs, is not offered). Random
draws as the official ``get_aux_targets``: ``torch.randperm`` on the CPU generator, per image the positives' subset
(if needed) then the negatives (if needed). Boxes are normalised by the unpadded image size, cxcywh.

Embeddings (PE = the 2C-d sine embedding of the box, ``proposal_sine_embed``):
* Co-Deformable-DETR: [p_pos | q] = LN_k(W_k PE + c_k) (2C); q += LN'_k(W'_k f + c'_k) (``with_coord_feat``, f the
  entry's content feature); p_pos += head_pos_embed[k], which the official code (kept by default, spec §4 item 1)
  builds as ``Embedding(num_co_heads, 1)``: one learned scalar per head broadcast over C; ``fix_head_pos_embed``
  makes it a C-d vector.
* Co-DINO: q = LN_k(W_k PE + c_k) (C), no feature term by default, no head embedding; the host derives p_pos
  from the reference box (query_pos None).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from util.box_ops import box_xyxy_to_cxcywh
from util.misc import host_tensor_to, inverse_sigmoid

from ...matcher import to_host
from .common import AuxHeadOutput

MIN_POS_COORDS = 9


def proposal_sine_embed(coords_unact: Tensor, num_pos_feats: int, temperature: float = 10000.0) -> Tensor:
    """[B, N, 4] boxes before sigmoid -> [B, N, 4 * num_pos_feats] sine embedding of (cx, cy, w, h) after sigmoid.

    Per coordinate u and k < num_pos_feats: angle 2 pi u / T^(2 floor(k / 2) / num_pos_feats), sin on even k, cos on
    odd k (interleaved), blocks in the order cx, cy, w, h (Deformable-DETR's two-stage proposal embedding).
    """
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=coords_unact.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    pos = coords_unact.sigmoid()[..., None] * (2 * math.pi) / dim_t
    return torch.stack((pos[..., 0::2].sin(), pos[..., 1::2].cos()), dim=-1).flatten(2)


@dataclass
class PositiveSet:
    """One head's group for a batch (N entries per image, positives first).

    Attributes:
        boxes: [B, N, 4] entry boxes, normalised cxcywh (not clamped: an anchor may exceed the image).
        feats: [B, N, C] content features, or None.
        targets: per image ``labels`` [P_b] and ``boxes`` [P_b, 4] (normalised cxcywh) of the positives.
        num_pos: [B] positives per image (entries 0 .. P_b - 1).
    """

    boxes: Tensor
    feats: Tensor | None
    targets: list[dict[str, Tensor]]
    num_pos: list[int]


def group_size(num_pos: Sequence[int], max_pos_coords: int) -> int:
    """N = max(9, min(max_pos_coords, max positives per image))."""
    return max(MIN_POS_COORDS, min(max_pos_coords, max(num_pos, default=0)))


def _draw(n: int, k: int) -> np.ndarray:
    """k of n indices at random (the official CPU ``randperm``)."""
    return torch.randperm(n)[:k].numpy()


def select_positives(out: AuxHeadOutput, sizes: Sequence[tuple[int, int]], num_classes: int,
                     feats: Sequence[Tensor] | None, max_pos_coords: int = 300,
                     host_labels: Sequence[Tensor] | None = None) -> PositiveSet:
    """Draw the group of one head.

    Args:
        out: the head's result (per image entries, labels with background = ``num_classes``, xyxy pixel boxes).
        sizes: unpadded (h, w) per image.
        feats: per image [N_b, C] content feature of every entry (ATSS: the pyramid at the anchor), or None.
        host_labels: host copies of ``out.labels`` (the caller's one copy for every head); None: copied here.
            Neither is read when the head gives ``host_positive``.

    The positives and negatives are found on the host (numpy, from one copy of the labels), the draws are the
    official CPU ``randperm`` in its order (per image the positives' subset, then the padding negatives), and the
    chosen entries go back to the device in one non-blocking upload: no other host-device sync.
    """
    labels = out.labels
    if out.host_positive is not None:  # the head knows its positives on the host (labels: a class or background)
        positives = [np.flatnonzero(h) for h in out.host_positive]
        negatives = [np.flatnonzero(~h) for h in out.host_positive]
    else:
        host = [h.numpy() for h in (host_labels if host_labels is not None else to_host(list(labels)))]
        positives = [np.flatnonzero(h < num_classes) for h in host]
        negatives = [np.flatnonzero(h == num_classes) for h in host]
    n = group_size([len(p) for p in positives], max_pos_coords)
    chosen = []  # per image (positives kept, entries taken)
    for pos, neg in zip(positives, negatives):
        if len(pos) > n:
            pos = pos[_draw(len(pos), n)]
        pad = n - len(pos)
        take = np.concatenate([pos, neg[_draw(len(neg), pad)]]) if pad > 0 else pos
        chosen.append((pos, take))
    device = labels[0].device if len(labels) else torch.device("cpu")
    flat = host_tensor_to(np.concatenate([np.zeros(0, np.int64)] + [a.astype(np.int64) for pair in chosen
                                                                     for a in pair]), torch.long, device)
    parts = iter(flat.split([len(a) for pair in chosen for a in pair]))
    # every image's (w, h, w, h) in one non-blocking upload (``new_tensor`` per image: a blocking copy on a GPU)
    factors = host_tensor_to([[w, h, w, h] for h, w in sizes], out.coords[0].dtype, device) if sizes else []
    boxes, contents, targets, kept = [], [], [], []
    for b, (coords, lab, tgt, factor) in enumerate(zip(out.coords, labels, out.box_targets, factors)):
        pos, take = next(parts), next(parts)
        box = box_xyxy_to_cxcywh(coords[take] / factor)
        feat = feats[b][take] if feats is not None else None
        short = n - take.numel()  # too few negatives: zero boxes (the official code crashes)
        if short > 0:
            box = torch.cat([box, box.new_zeros(short, 4)])
            if feat is not None:
                feat = torch.cat([feat, feat.new_zeros(short, feat.shape[1])])
        boxes.append(box)
        contents.append(feat)
        targets.append({"labels": lab[pos], "boxes": box_xyxy_to_cxcywh(tgt[pos] / factor)})
        kept.append(pos.numel())
    stacked = torch.stack(contents) if feats is not None else None
    return PositiveSet(torch.stack(boxes), stacked, targets, kept)


class PositiveQueries(nn.Module):
    """Per-head projections of the positive boxes (and features) into decoder queries.

    Args:
        d_model: C.
        num_heads: K auxiliary heads (the group index k selects the projections).
        style: "deformable" (Co-Deformable-DETR: content and positional query from a 2C projection) or "dino"
            (Co-DINO: content only, the host derives the positional query).
        with_coord_feat: add the projected content feature of each entry to the content query.
        fix_head_pos_embed: deformable: a C-d head embedding (the official code has one scalar per head).
    """

    def __init__(self, d_model: int, num_heads: int, style: str = "deformable", with_coord_feat: bool = True,
                 fix_head_pos_embed: bool = False) -> None:
        super().__init__()
        if style not in ("deformable", "dino"):
            raise ValueError(f"style must be 'deformable' or 'dino', got {style!r}")
        self.d_model, self.style, self.with_coord_feat = d_model, style, with_coord_feat
        out = 2 * d_model if style == "deformable" else d_model
        self.aux_pos_trans = nn.ModuleList(nn.Linear(2 * d_model, out) for _ in range(num_heads))
        self.aux_pos_trans_norm = nn.ModuleList(nn.LayerNorm(out) for _ in range(num_heads))
        if with_coord_feat:
            self.pos_feats_trans = nn.ModuleList(nn.Linear(d_model, d_model) for _ in range(num_heads))
            self.pos_feats_norm = nn.ModuleList(nn.LayerNorm(d_model) for _ in range(num_heads))
        # Official (Co-Deformable, with the feature term): nn.Embedding(num_co_heads, 1, ...), a scalar per head.
        self.head_pos_embed = (nn.Embedding(num_heads, d_model if fix_head_pos_embed else 1)
                               if style == "deformable" and with_coord_feat else None)
        for p in self.parameters():  # the official transformer's init_weights: Xavier for every matrix
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, k: int, boxes: Tensor, feats: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Head k's queries for [B, N, 4] normalised cxcywh boxes and [B, N, C] features.

        Returns:
            content [B, N, C] and positional query [B, N, C] (deformable) or None (dino).
        """
        pe = proposal_sine_embed(inverse_sigmoid(boxes), self.d_model // 2)
        proj = self.aux_pos_trans_norm[k](self.aux_pos_trans[k](pe))
        if self.style == "deformable":
            query_pos, tgt = torch.split(proj, self.d_model, dim=-1)
        else:
            query_pos, tgt = None, proj
        if self.with_coord_feat:
            if feats is None:
                raise ValueError("with_coord_feat needs the entries' content features")
            tgt = tgt + self.pos_feats_norm[k](self.pos_feats_trans[k](feats))
            if self.head_pos_embed is not None:
                query_pos = query_pos + self.head_pos_embed.weight[k]
        return tgt, query_pos
