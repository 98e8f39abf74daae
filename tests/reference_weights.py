"""Deterministic weights keyed by parameter name (the generator of the reference computations).

The files under tests/data/reference/ hold what the official implementations computed after every
weight was replaced by ``filled_from_spec(spec)``: each tensor is a function of its (official) name
and shape only, so two implementations that share parameter names get identical weights without a
checkpoint to carry around.
"""
from __future__ import annotations

import zlib

import torch


def _tensor_for(name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """The value of parameter/buffer ``name`` (None for integer or scalar entries: zeros)."""
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    if len(shape) == 0 or dtype in (torch.int64, torch.int32, torch.bool):
        return None
    if name.endswith("running_var"):
        return torch.rand(shape, generator=gen) + 0.5
    if name.endswith("running_mean"):
        return torch.randn(shape, generator=gen) * 0.1
    if name.endswith(".weight") and len(shape) == 1:  # norm scales
        return 1.0 + torch.randn(shape, generator=gen) * 0.1
    if len(shape) == 1:  # biases
        return torch.randn(shape, generator=gen) * 0.02
    fan_in = 1
    for s in shape[1:]:
        fan_in *= s
    return torch.randn(shape, generator=gen) / max(fan_in, 1) ** 0.5


def filled_from_spec(spec: dict) -> dict[str, torch.Tensor]:
    """``spec``: {'shapes': {name: (shape, dtype name)}, 'aliases': [[names sharing one tensor]]} -> state dict.

    Aliased names (heads the official models list twice) get the value of the group's first name.
    """
    canon = {}
    for group in spec.get("aliases", []):
        for name in group:
            canon[name] = group[0]
    out = {}
    for name, (shape, dtype) in spec["shapes"].items():
        dt = getattr(torch, dtype)
        value = _tensor_for(canon.get(name, name), tuple(shape), dt)
        out[name] = torch.zeros(shape, dtype=dt) if value is None else value.to(dt)
    return out
