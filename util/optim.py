"""The optimizer of a run: the seeds' AdamW (or SGD); torch's fused AdamW kernel on request.

The fused kernel (``--fused_optimizer``, opt-in) computes the seeds' AdamW update in one pass over each parameter
instead of about eight (the small benchmark model: 16 ms instead of 42 ms a step on one CPU thread), but rounds
the last bit differently from torch's default loop (3e-8 after three steps), so a run drifts from what the
official code computes: off by default, listed in the README's deliberate differences.
"""
from __future__ import annotations

import logging
from typing import Any, Iterable

import torch

logger = logging.getLogger(__name__)


def fused_supported(params: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW runs on these parameters (floating point, on CPU or CUDA, torch >= 2.4)."""
    devices = {p.device.type for p in params}
    return bool(params) and devices <= {"cpu", "cuda"} and len(devices) == 1 and all(
        p.is_floating_point() for p in params) and "fused" in torch.optim.AdamW.__init__.__code__.co_varnames


def build_optimizer(groups: Iterable[dict] | Iterable[torch.Tensor], args: Any) -> torch.optim.Optimizer:
    """``--sgd``: SGD with momentum 0.9; else AdamW (torch's default loop; fused with ``--fused_optimizer``)."""
    groups = list(groups)
    if args.sgd:
        return torch.optim.SGD(groups, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    optimizer = torch.optim.AdamW(groups, lr=args.lr, weight_decay=args.weight_decay)
    use_fused(optimizer, getattr(args, "fused_optimizer", False))
    return optimizer


def use_fused(optimizer: torch.optim.Optimizer, fused: bool) -> None:
    """Switch an AdamW between the fused kernel and torch's default loop, in place, also after a resume.

    ``load_state_dict`` takes the implementation from the checkpoint's groups (an official checkpoint: the
    default loop); this puts back the one asked for and moves the step counters where it keeps them (fused:
    a float32 tensor on the parameter's device; the default loop: on the CPU).
    """
    if not isinstance(optimizer, torch.optim.AdamW):
        return
    params = [p for g in optimizer.param_groups for p in g["params"]]
    fused = fused and fused_supported(params)
    for group in optimizer.param_groups:
        group["fused"] = True if fused else None
        group["foreach"] = False if fused else None
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            step = state.get("step")
            if torch.is_tensor(step):
                state["step"] = step.to(device=p.device if fused else "cpu", dtype=torch.float32)
