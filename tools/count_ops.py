"""Host work of a training step: the ATen operators it dispatches, by phase, as a GPU step would (runs on CPU).

    python tools/count_ops.py                                    # the default table of configurations
    python tools/count_ops.py --flags "--with_box_refine --two_stage --use_dn" --sites 15

On a GPU every operator is a launch (or at least a dispatch) paid on the host; a small model's step is bound by
them (README "Benchmarks"). The count is of the operators below autograd (a ``TorchDispatchMode``), for one
step after two warm-up ones of the synthetic benchmark's model (tools/addon_step_time.py, batch 8 of 128 px),
with what a GPU run does differently forced: the GPU's code paths (tools/gpu_paths.py: the Hungarian matcher's
batched costs, one computation per group) and AdamW's multi-tensor (``foreach``) implementation, torch's default
on a GPU. Phases:
forward (model and add-on query groups), loss (matching and losses), backward, optimizer (clipping and AdamW).
"""
from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.addons.base import StepContext, overrides  # noqa: E402
from tools.addon_step_time import batch, make  # noqa: E402
from tools.count_syncs import CONFIGS  # noqa: E402
from tools.gpu_paths import gpu_paths  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402

PHASES = ("forward", "loss", "backward", "optimizer")


class OpCounter(TorchDispatchMode):
    """Counts the ATen operators dispatched while active, per ``phase`` and (with ``sites``) per calling
    function of this repository."""

    def __init__(self, sites: bool = False) -> None:
        super().__init__()
        self.phase = "-"
        self.counts: Counter[str] = Counter()
        self.sites: Counter[tuple[str, str]] | None = Counter() if sites else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[self.phase] += 1
        if self.sites is not None:
            frame, site = sys._getframe(1), "(autograd engine or torch)"
            while frame is not None:
                name = frame.f_code.co_filename
                if name.startswith(str(ROOT)) and not name.endswith("count_ops.py"):
                    site = f"{Path(name).relative_to(ROOT)}:{frame.f_code.co_name}"
                    break
                frame = frame.f_back
            self.sites[(self.phase, site)] += 1
        return func(*args, **(kwargs or {}))


def step(model, criterion, optimizer, max_norm: float, samples, targets, counter: OpCounter | None,
         ema=None) -> None:
    """One step as tools/addon_step_time.py's (engine.py's without logging), its phases labelled; ``ema``: the
    model's EMA (the teacher of ``--addons od``), updated in the optimizer phase."""
    def phase(name: str) -> None:
        if counter is not None:
            counter.phase = name

    ctx = StepContext(images=samples, targets=targets, epoch=0, step=0, ema=None if ema is None else ema.module)
    phase("forward")
    for addon in criterion.addons:
        if overrides(addon, "before_forward"):
            addon.before_forward(model, ctx)
    out = model(samples, targets, ctx=ctx)
    phase("loss")
    loss = criterion.total_loss(criterion(out, targets, ctx=ctx))
    optimizer.zero_grad(set_to_none=True)
    phase("backward")
    loss.backward()
    phase("optimizer")
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"), foreach=True)
    optimizer.step()
    if ema is not None:
        ema.update(model)
    for addon in criterion.addons:
        addon.after_step(model, ctx)


def count(flags: str, batch_size: int = 8, image_size: int = 128, sites: bool = False) -> OpCounter:
    """Operators of one step (after two warm-up steps) of the model built from ``flags``."""
    images, targets = batch(batch_size, image_size, 6)
    samples = nested_tensor_from_tensor_list(images)
    model, criterion, optimizer, ema, max_norm = make(flags)
    for group in optimizer.param_groups:
        group["foreach"] = True
    with gpu_paths():
        for _ in range(2):
            step(model, criterion, optimizer, max_norm, samples, targets, None, ema)
        with OpCounter(sites) as counter:
            step(model, criterion, optimizer, max_norm, samples, targets, counter, ema)
    return counter


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flags", default=None, help="one configuration (default: tools/count_syncs.py's CONFIGS)")
    p.add_argument("--sites", type=int, default=0, help="list the N functions that dispatch the most operators")
    p.add_argument("--batch_size", default=8, type=int)
    p.add_argument("--image_size", default=128, type=int)
    args = p.parse_args()
    logging.disable(logging.INFO)
    configs = {"flags": args.flags} if args.flags is not None else CONFIGS
    print("| configuration | flags | " + " | ".join(PHASES) + " | step |\n|---|---|" + "---|" * (len(PHASES) + 1))
    for name, flags in configs.items():
        c = count(flags, args.batch_size, args.image_size, bool(args.sites))
        print(f"| {name} | `{flags}` | " + " | ".join(str(c.counts[ph]) for ph in PHASES) +
              f" | {sum(c.counts.values())} |", flush=True)
        if args.sites and c.sites is not None:
            for (ph, site), n in c.sites.most_common(args.sites):
                print(f"    {n:5d}  {ph:9s} {site}")


if __name__ == "__main__":
    main()
