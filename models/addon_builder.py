"""Instantiate the enabled add-ons in their fixed order and attach their parameters to the model."""
from __future__ import annotations

from typing import Any

from torch import nn

from .criterion.base import AddOn, ModelOptions
from .registry import ADDONS


def enabled_addons(args: Any) -> list[type[AddOn]]:
    """Add-on classes switched on by ``--addons`` or by their seed flags, sorted by their fixed order."""
    requested = set(getattr(args, "addons", None) or [])
    unknown = requested - set(ADDONS.names())
    if unknown:
        raise ValueError(f"unknown add-ons {sorted(unknown)}; available: {ADDONS.names()}")
    classes = [cls for name, cls in ADDONS.items() if name in requested or cls.enabled(args)]
    return sorted(classes, key=lambda c: (c.order, c.name))


def build_addons(args: Any, model: nn.Module) -> list[AddOn]:
    """Build the enabled add-ons; their parameters go under ``model.addons[name]`` (only if any)."""
    addons = [cls.from_args(args, model) for cls in enabled_addons(args)]
    modules = {a.name: a.module() for a in addons if a.module() is not None}
    if modules:
        model.addons = nn.ModuleDict(modules)
    return addons


def model_options(args: Any) -> ModelOptions:
    """What the enabled add-ons ask of the host model (extra query rows, decoder-layer variant)."""
    options = ModelOptions()
    for cls in enabled_addons(args):
        options = cls.model_options(args, options)
    return options
