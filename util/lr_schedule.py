"""Learning-rate schedules, stepped once per epoch: ``--sched step`` (every DETR's StepLR at ``--lr_drop``) and
``--sched warmupcos`` (YOLOS's default, hustvl/YOLOS util/scheduler.py: timm's cosine, one cycle over ``--epochs``).

The warm-up cosine's learning rate of group g for epoch e (e = 0, 1, ...) is f(e - 1) with f(-1) the start value:

    start   = warmup_lr                                        if warmup_epochs > 0 else base_g
    f(t)    = warmup_lr + t * (base_g - warmup_lr) / warmup_epochs           for t < warmup_epochs
    f(t)    = min_lr + (base_g - min_lr) * (1 + cos(pi * t / epochs)) / 2    for warmup_epochs <= t < epochs
    f(t)    = min_lr                                                          for t >= epochs

The official loop calls ``scheduler.step(epoch)`` after training epoch ``epoch``: the next epoch runs at f(epoch),
so epochs 0 and 1 both run at the base rate when there is no warm-up (kept: it is what the official numbers were
trained with). ``decay_rate`` only scales later cycles, which one cycle never reaches; it is accepted for the
command line's sake.
"""
from __future__ import annotations

import argparse
import math
from typing import Any

import torch

SCHEDULES = ("step", "warmupcos")


def add_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("learning-rate schedule")
    g.add_argument("--sched", default="step", choices=SCHEDULES,
                   help="step: StepLR at --lr_drop (x0.1); warmupcos: YOLOS's warm-up cosine over --epochs (-m yolos)")
    g.add_argument("--warmup_lr", "--warmup-lr", dest="warmup_lr", default=1e-6, type=float,
                   help="warmupcos: learning rate of the first warm-up epoch (YOLOS: 1e-6)")
    g.add_argument("--min_lr", "--min-lr", dest="min_lr", default=1e-7, type=float,
                   help="warmupcos: the cosine's floor (YOLOS: 1e-7)")
    g.add_argument("--warmup_epochs", "--warmup-epochs", dest="warmup_epochs", default=0, type=int,
                   help="warmupcos: linear warm-up epochs from --warmup_lr (YOLOS: 0)")
    g.add_argument("--decay_rate", "--decay-rate", "--dr", dest="decay_rate", default=0.1, type=float,
                   help="warmupcos: scale of later cycles (YOLOS's flag; one cycle never uses it)")


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """YOLOS's per-epoch warm-up cosine (module docstring); ``step()`` once after each training epoch."""

    def __init__(self, optimizer: torch.optim.Optimizer, epochs: int, min_lr: float = 1e-7, warmup_epochs: int = 0,
                 warmup_lr: float = 1e-6, decay_rate: float = 0.1, last_epoch: int = -1) -> None:
        if epochs <= 0:
            raise ValueError(f"--sched warmupcos needs --epochs > 0, got {epochs}")
        self.epochs, self.min_lr, self.warmup_epochs = epochs, min_lr, warmup_epochs
        self.warmup_lr, self.decay_rate = warmup_lr, decay_rate
        super().__init__(optimizer, last_epoch)

    def lr_at(self, base: float, t: int) -> float:
        """f(t) of the module docstring for a group whose base rate is ``base``."""
        if t < 0:
            return self.warmup_lr if self.warmup_epochs > 0 else base
        if t < self.warmup_epochs:
            return self.warmup_lr + t * (base - self.warmup_lr) / self.warmup_epochs
        if t >= self.epochs:
            return self.min_lr
        return self.min_lr + 0.5 * (base - self.min_lr) * (1 + math.cos(math.pi * t / self.epochs))

    def get_lr(self) -> list[float]:
        return [self.lr_at(base, self.last_epoch - 1) for base in self.base_lrs]


def build_lr_scheduler(args: Any, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    if getattr(args, "sched", "step") == "warmupcos":
        return WarmupCosineLR(optimizer, args.epochs, args.min_lr, args.warmup_epochs, args.warmup_lr, args.decay_rate)
    return torch.optim.lr_scheduler.StepLR(optimizer, args.lr_drop)


def load_schedule_state(lr_scheduler: Any, optimizer: torch.optim.Optimizer, state: dict, epoch: int) -> None:
    """Restore the schedule of a checkpoint saved after epoch ``epoch``.

    hustvl/YOLOS saves timm's scheduler (no ``last_epoch``: its loop passes the epoch to every ``step``); for
    such a state the warm-up cosine is placed after epoch ``epoch`` and each group's rate set for the next one,
    the rate the official loop's ``step(epoch)`` set. Any other state is loaded as it is.
    """
    if isinstance(lr_scheduler, WarmupCosineLR) and "last_epoch" not in state:
        lr_scheduler.last_epoch = int(epoch) + 1
        for group, rate in zip(optimizer.param_groups, lr_scheduler.get_lr()):
            group["lr"] = rate
        lr_scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
        return
    lr_scheduler.load_state_dict(state)


def restart_schedule(args: Any, optimizer: torch.optim.Optimizer, lr_scheduler: Any, base_lrs: list[float]) -> None:
    """Resume with the command line's schedule (the official ``--resume``): new base rates, drop epoch or cosine
    length, and each group's rate for the epoch the scheduler has reached."""
    lr_scheduler.base_lrs = base_lrs
    if isinstance(lr_scheduler, WarmupCosineLR):
        lr_scheduler.epochs = args.epochs
        rates = [lr_scheduler.lr_at(base, lr_scheduler.last_epoch - 1) for base in base_lrs]
    else:
        lr_scheduler.step_size = args.lr_drop
        rates = [base * lr_scheduler.gamma ** (lr_scheduler.last_epoch // args.lr_drop) for base in base_lrs]
    for group, base, rate in zip(optimizer.param_groups, base_lrs, rates):
        group["initial_lr"] = base
        group["lr"] = rate
