"""The host interface detectors offer add-ons, and what the multi-scale detectors share.

A host declares its ``capabilities`` (models/addons/base.py ``CAPABILITIES``) for its configuration; an
add-on that needs one the host lacks is refused at build time. Through this interface add-ons reach:
the encoder output and memory (``outputs["encoder"]`` and the query-group hook's ``enc``), a builder of
extra queries made exactly like the main ones (``group_queries``), the decoder-layer factory and reserved
content channels (``HostRequest``, honoured at construction), the label table (``label_table``) and the
heads (``class_embed``, ``bbox_embed``: one per decoder layer, possibly shared, two-stage: + encoder).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from util.misc import NestedTensor

from .addons.base import StepContext, query_providers
from .backbone import Joiner
from .query_groups import EncoderOutput, QueryProvider


class Detector(nn.Module):
    """Base of the multi-scale detectors: backbone + input projections, and the add-on host interface.

    Attributes:
        capabilities: what this host offers add-ons (keys of ``CAPABILITIES``; set per configuration).
        train_addons: the add-ons the model was built with; their query groups run in training forwards
            (the official calling convention: ``model(samples, targets)``).
        reserved_content_channels: trailing channels of the learned content queries reserved for an
            add-on (DN-DETR's indicator bit), 0 when none.
        num_extra_queries: rows of the learned query tables after the main ones (add-on groups).
    """

    capabilities: frozenset[str] = frozenset()
    train_addons: tuple = ()
    reserved_content_channels: int = 0
    num_extra_queries: int = 0
    backbone: Joiner
    input_proj: nn.ModuleList
    num_feature_levels: int
    aux_loss: bool

    @property
    def label_table(self) -> nn.Embedding | None:
        """The label embedding the official model owns (DINO, DN-DETR's ``label_enc``), or None."""
        return None

    def group_queries(self, enc: EncoderOutput, start: int, count: int) -> tuple[Tensor, Tensor, Tensor | None] | None:
        """Queries built exactly like the main ones from table rows / proposal ranks start .. start+count-1.

        Returns:
            (content [B, N, C], reference [B, N, 2|4] sigmoid space, query_pos [B, N, C] or None when the
            host derives it from the reference), or None when there are no such queries.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot build extra queries like its main ones")

    def addon_providers(self, samples: NestedTensor, targets: Sequence[dict] | None, ctx: StepContext | None,
                        providers: Sequence[QueryProvider] | None) -> Sequence[QueryProvider]:
        """The query-group providers of this forward: the given ones, else the add-ons' in training mode."""
        if providers is not None:
            return providers
        if not self.training or not self.train_addons:
            return ()
        return query_providers(self.train_addons, ctx or StepContext(images=samples, targets=targets))

    @staticmethod
    def input_projections(backbone: Joiner, hidden_dim: int, num_feature_levels: int) -> nn.ModuleList:
        """1x1 conv + GN per backbone level; 3x3 stride-2 conv + GN per extra level (Xavier weights, zero bias).

        GroupNorm has the official 32 groups; a tiny model (hidden_dim 32) gets 16, because one channel
        per group on a 1x1 map of one image has a single value per group, which GroupNorm rejects.
        """
        groups = 32 if hidden_dim >= 64 else hidden_dim // 2
        if num_feature_levels == 1:
            projs = [nn.Sequential(nn.Conv2d(backbone.num_channels[-1], hidden_dim, 1),
                                   nn.GroupNorm(groups, hidden_dim))]
        else:
            projs = [nn.Sequential(nn.Conv2d(c, hidden_dim, 1), nn.GroupNorm(groups, hidden_dim))
                     for c in backbone.num_channels]
            in_channels = backbone.num_channels[-1]
            for _ in range(num_feature_levels - len(backbone.num_channels)):
                projs.append(nn.Sequential(nn.Conv2d(in_channels, hidden_dim, 3, stride=2, padding=1),
                                           nn.GroupNorm(groups, hidden_dim)))
                in_channels = hidden_dim
        for proj in projs:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)
        return nn.ModuleList(projs)

    def pyramid(self, samples: NestedTensor) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Backbone -> projected multi-scale features [B, C, H_l, W_l], masks [B, H_l, W_l], positions."""
        features, pos = self.backbone(samples)
        srcs = [proj(f.tensors) for proj, f in zip(self.input_proj, features)]
        masks = [f.mask for f in features]
        for lvl in range(len(srcs), self.num_feature_levels):
            src = self.input_proj[lvl](features[-1].tensors if lvl == len(features) else srcs[-1])
            mask = F.interpolate(samples.mask[None].float(), size=src.shape[-2:]).to(torch.bool)[0]
            srcs.append(src)
            masks.append(mask)
            pos.append(self.backbone[1](NestedTensor(src, mask)).to(src.dtype))
        return srcs, masks, pos
