"""From flags to built add-ons: which are on, what they ask of the host, and attaching them to the model.

A model builder calls ``plan_addons`` before it builds anything (a host that lacks a capability an
add-on needs is refused there, with a message), builds the model with the merged ``HostRequest``, then
``build_addons``.
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from util.errors import FlagError

from ..registry import ADDONS
from .base import CAPABILITIES, AddOn, HostRequest, overrides

# The label table of denoising lives in the host where the official model has it (DINO, DN-DETR: top-level
# ``label_enc``) and in the add-on otherwise; checkpoints written with the other layout load either way.
LABEL_TABLE_NAMES = ("label_enc.weight", "addons.dn.label_enc.weight")


def enabled_addons(args: Any) -> list[type[AddOn]]:
    """Add-on classes switched on by ``--addons`` or by their seed flags, sorted by their fixed order."""
    requested = set(getattr(args, "addons", None) or [])
    unknown = requested - set(ADDONS.names())
    if unknown:
        raise FlagError(f"unknown add-ons {sorted(unknown)}; available: {ADDONS.names()}")
    classes = [cls for name, cls in ADDONS.items() if name in requested or cls.enabled(args)]
    return sorted(classes, key=lambda c: (c.order, c.name))


def plan_addons(args: Any, capabilities: frozenset[str]) -> tuple[list[type[AddOn]], HostRequest]:
    """The enabled add-ons and what the host must build for them; refuses a host that lacks a capability.

    Args:
        args: the flags.
        capabilities: what the host offers in this configuration (``Detector.capabilities``).
    """
    classes = enabled_addons(args)
    request = HostRequest()
    for cls in classes:
        missing = sorted(cls.requires - capabilities)
        if missing:
            needs = "; ".join(f"{c}: {CAPABILITIES[c]}" for c in missing)
            raise FlagError(f"add-on {cls.name!r} cannot run on -m {args.model} with these flags: it needs {needs}")
        request = request.merge(cls.request(args), cls.name)
    return classes, request


def _label_table_hook(own: str, other: str):
    def hook(state_dict, prefix, *_):
        if prefix + other in state_dict and prefix + own not in state_dict:
            state_dict[prefix + own] = state_dict.pop(prefix + other)
    return hook


def build_addons(args: Any, model: nn.Module, classes: Sequence[type[AddOn]]) -> list[AddOn]:
    """Build the planned add-ons; their parameters go under ``model.addons[name]`` (only if any).

    The model keeps them in ``train_addons`` and runs their query groups in training forwards.
    """
    addons = [cls.from_args(args, model) for cls in classes]
    modules = {a.name: a.module() for a in addons if a.module() is not None}
    if modules:
        model.addons = nn.ModuleDict(modules)
    # A plain tuple: neither state_dict nor DDP sees the add-on objects.
    model.train_addons = tuple(addons)
    names = model.state_dict().keys()
    for own, other in (LABEL_TABLE_NAMES, LABEL_TABLE_NAMES[::-1]):
        if own in names and other not in names:
            model._register_load_state_dict_pre_hook(_label_table_hook(own, other))
    return addons


def evaluation_model(model: nn.Module, addons: Sequence[AddOn]) -> nn.Module:
    """The model to evaluate: ``model``, or the one an add-on's ``eval_model`` hook returns (e.g. an EMA copy)."""
    swaps = [(a.name, a.eval_model(model)) for a in addons if overrides(a, "eval_model")]
    swaps = [(name, m) for name, m in swaps if m is not None]
    if len(swaps) > 1:
        raise ValueError(f"more than one add-on replaces the evaluation model: {[n for n, _ in swaps]}")
    return swaps[0][1] if swaps else model
