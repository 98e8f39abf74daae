"""Model zoo: ``build_model(args) -> (model, criterion, postprocessors)`` via the registry."""
from __future__ import annotations

from typing import Any

from torch import nn

from . import dab_deformable_detr, deformable_detr, dino  # noqa: F401  (register the models)
from .registry import ADDONS, MODELS, register_addon, register_model  # noqa: F401


def build_model(args: Any) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
    """Build ``MODELS[args.model]`` with its criterion and post-processors."""
    return MODELS.get(args.model)(args)
