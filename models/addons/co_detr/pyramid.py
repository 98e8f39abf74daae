"""The encoder memory as a feature pyramid for Co-DETR's auxiliary heads (specs/co_detr_od_detr.md §1.3-1.4).

The flattened memory [B, S, C] is split back into its levels [B, C, H_l, W_l] and one extra level is added by a
3x3 stride-2 convolution + GroupNorm on the coarsest map. The auxiliary heads see only this pyramid (never the
backbone/neck features). Computed in training only (inside the add-on's hooks), spec §4 item 15.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor, nn

from util.misc import NestedTensor, host_tensor_to


def gn_groups(channels: int) -> int:
    """GroupNorm groups: the official 32; a tiny model (< 64 channels) gets channels // 2 (as the host's input
    projections, models/detector.py)."""
    return 32 if channels >= 64 else channels // 2


def level_strides(backbone_strides: Sequence[int], num_feature_levels: int) -> list[int]:
    """Strides of the memory levels: the backbone levels used, then x2 per extra stride-2 level.

    Args:
        backbone_strides: strides of the backbone levels the host uses (e.g. [8, 16, 32] or [4, 8, 16, 32]).
        num_feature_levels: L, the memory's levels.
    """
    strides = list(backbone_strides)[:num_feature_levels]
    while len(strides) < num_feature_levels:
        strides.append(strides[-1] * 2)
    return strides


class MemoryPyramid(nn.Module):
    """Memory -> per-level maps plus the extra stride-2 level (conv 3x3/s2 + GN; PyTorch's default init, as the
    official ``downsample``).

    Args:
        channels: C, the memory width.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.downsample = nn.Sequential(nn.Conv2d(channels, channels, 3, stride=2, padding=1),
                                        nn.GroupNorm(gn_groups(channels), channels))

    def forward(self, memory: Tensor, spatial_shapes: Tensor,
                shapes: Sequence[tuple[int, int]] | None = None) -> list[Tensor]:
        """memory [B, S, C], spatial_shapes [L, 2] (H_l, W_l) -> L + 1 maps [B, C, H_l, W_l] (the last one extra).
        ``shapes``: the same as Python ints, where the caller has them (else read from the tensor: a sync)."""
        b, _, c = memory.shape
        shapes = [(int(h), int(w)) for h, w in (spatial_shapes.tolist() if shapes is None else shapes)]
        chunks = torch.split(memory, [h * w for h, w in shapes], dim=1)
        maps = [x.transpose(1, 2).reshape(b, c, h, w) for x, (h, w) in zip(chunks, shapes)]
        maps.append(self.downsample(maps[-1]))
        return maps


def image_sizes(images: Any, targets: Sequence[dict] | None) -> list[tuple[int, int]]:
    """Unpadded (h, w) in pixels of every image: the batch's host ``sizes``, else its padding mask (a sync), else
    the targets' ``size``.

    Raises:
        ValueError: neither is available (a hand-made step context without images).
    """
    if isinstance(images, NestedTensor) and images.sizes is not None:
        return [(int(h), int(w)) for h, w in images.sizes]
    if isinstance(images, NestedTensor) and images.mask is not None:
        valid = ~images.mask
        hs = valid[:, :, 0].sum(1).tolist()
        ws = valid[:, 0, :].sum(1).tolist()
        return [(int(h), int(w)) for h, w in zip(hs, ws)]
    if targets is not None and all("size" in t for t in targets):
        return [(int(t["size"][0]), int(t["size"][1])) for t in targets]
    raise ValueError("co_detr needs the image sizes: give the step context the batch (StepContext(images=...)) "
                     "or targets with a 'size' entry (h, w)")


def pixel_targets(targets: Sequence[dict], sizes: Sequence[tuple[int, int]]) -> list[dict[str, Tensor]]:
    """Targets with normalised cxcywh boxes -> ``boxes`` xyxy in pixels of the unpadded image, ``labels`` as given."""
    if not targets:
        return []
    # every image's (w, h, w, h) in one non-blocking upload (``new_tensor`` per image: a blocking copy on a GPU)
    scales = host_tensor_to([[w, h, w, h] for h, w in sizes], torch.float32, targets[0]["boxes"].device)
    out = []
    for t, scale in zip(targets, scales):
        boxes = t["boxes"].float()
        cx, cy, bw, bh = boxes.unbind(-1)
        xyxy = torch.stack([cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2], -1)
        out.append({"boxes": xyxy * scale, "labels": t["labels"]})
    return out
