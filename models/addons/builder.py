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


# The label table of denoising lives in the host where the official model has it (DINO, DN-DETR: top-level
# ``label_enc``) and in the add-on otherwise; checkpoints written with the other layout load either way.
LABEL_TABLE_NAMES = ("label_enc.weight", "addons.dn.label_enc.weight")


def _label_table_hook(own: str, other: str):
    def hook(state_dict, prefix, *_):
        if prefix + other in state_dict and prefix + own not in state_dict:
            state_dict[prefix + own] = state_dict.pop(prefix + other)
    return hook


def build_addons(args: Any, model: nn.Module) -> list[AddOn]:
    """Build the enabled add-ons; their parameters go under ``model.addons[name]`` (only if any)."""
    addons = [cls.from_args(args, model) for cls in enabled_addons(args)]
    modules = {a.name: a.module() for a in addons if a.module() is not None}
    if modules:
        model.addons = nn.ModuleDict(modules)
    # The model runs their query groups itself in training mode (the official calling convention);
    # a plain tuple, so neither state_dict nor DDP sees the add-on objects.
    model.train_addons = tuple(addons)
    names = model.state_dict().keys()
    for own, other in (LABEL_TABLE_NAMES, LABEL_TABLE_NAMES[::-1]):
        if own in names and other not in names:
            model._register_load_state_dict_pre_hook(_label_table_hook(own, other))
    return addons


def model_options(args: Any) -> ModelOptions:
    """What the enabled add-ons ask of the host model (extra query rows, decoder-layer variant)."""
    options = ModelOptions()
    for cls in enabled_addons(args):
        options = cls.model_options(args, options)
    return options
