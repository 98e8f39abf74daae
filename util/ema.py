"""Exponential moving average (EMA) of the model weights: DINO's ``--use_ema`` and OD-DETR's teacher.

:class:`ModelEMA` holds a deep copy of the *unwrapped* model (``model_without_ddp``): never wrapped by DDP and
never a sub-module of the trained model (so DDP neither broadcasts nor checks it), fp32, ``requires_grad``
False, in eval mode. After every optimizer step that changed the weights, every rank calls
:meth:`ModelEMA.update`; the ranks hold identical weights after the all-reduce, so their EMAs stay identical
without any communication.

Update (per floating-point entry of the state dict: parameters and floating buffers, as DINO's ``ModelEma``)::

    θ' ← m_t·θ' + (1 − m_t)·θ        (computed as a lerp: an entry that does not change stays bitwise equal)
    m_t = m                            without warm-up (DINO, the default)
    m_t = m·(1 − exp(−t / T))          with --ema_warmup_steps T > 0, t = 1, 2, ... this update's number

Integer buffers are copied. The update counter ``updates`` is saved with the weights (checkpoint keys
``ema_model`` and ``ema_updates``) so that a resumed run continues bitwise as the uninterrupted one.
"""
from __future__ import annotations

import argparse
import copy
import logging
import math
from typing import Any, Mapping

import torch
from torch import nn

from util.checkpoint import CheckpointError

logger = logging.getLogger("detr")

DINO_EMA_DECAY = 0.9997  # IDEA-Research/DINO config/DINO/DINO_4scale.py ema_decay


def add_args(parser: argparse.ArgumentParser) -> None:
    """The EMA and matching-instability flags (a run group: they never shape the model)."""
    g = parser.add_argument_group("optimisation: weight EMA and matching instability")
    g.add_argument("--use_ema", action="store_true",
                   help="keep an EMA of the weights (DINO's flag), evaluated each epoch as test_ema_* in log.txt; "
                        "also on when an enabled add-on needs it (OD-DETR's teacher)")
    g.add_argument("--ema_decay", default=DINO_EMA_DECAY, type=float, help="EMA decay m (DINO: 0.9997)")
    g.add_argument("--ema_warmup_steps", default=0, type=int, metavar="T",
                   help="EMA warm-up: decay m*(1-exp(-t/T)) at the t-th update; 0 (default): the plain decay m")
    g.add_argument("--eval_ema", action="store_true",
                   help="with --eval: evaluate the checkpoint's EMA weights (ema_model) instead of its model")
    g.add_argument("--log_instability", default=0, type=int, metavar="N",
                   help="log DN-DETR's matching instability on N fixed training images at each epoch end "
                        "(instability, instability_ema in log.txt); 0: off")


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel (or DataParallel) wrapper, else ``model``."""
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def ema_enabled(args: Any) -> bool:
    """EMA is on with ``--use_ema`` or when an enabled add-on declares ``needs_ema`` (never for ``--eval``)."""
    if getattr(args, "eval", False):
        return False
    if getattr(args, "use_ema", False):
        return True
    from models.addons.builder import enabled_addons

    return any(cls.needs_ema for cls in enabled_addons(args))


class ModelEMA:
    """An fp32, gradient-free, eval-mode copy of a model whose weights follow an exponential moving average.

    Not an ``nn.Module`` on purpose: assigning it to a module attribute cannot make the copy a sub-module.
    The copy carries no add-on hooks (``train_addons`` is empty: its forward is the plain model, in eval mode
    it returns the main queries' predictions); parameters of add-ons kept under ``model.addons`` are copied
    and averaged like the others.

    Args:
        model: the model to follow (a DDP wrapper is unwrapped); its current weights start the EMA.
        decay: m in [0, 1).
        warmup_steps: T of the warm-up ramp (0: none).
    """

    def __init__(self, model: nn.Module, decay: float = DINO_EMA_DECAY, warmup_steps: int = 0) -> None:
        model = unwrap(model)
        addons = tuple(getattr(model, "train_addons", ()))
        memo: dict[int, Any] = {id(a): a for a in addons}  # the add-on objects are shared, not copied
        self.module = copy.deepcopy(model, memo)
        if addons:
            self.module.train_addons = ()
        self.module.float().eval().requires_grad_(False)
        self.decay = float(decay)
        self.warmup_steps = int(warmup_steps)
        self.updates = 0

    def next_decay(self) -> float:
        """m_t of the next update (t = ``updates + 1``)."""
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1.0 - math.exp(-(self.updates + 1) / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """θ' ← m_t θ' + (1 − m_t) θ for every floating entry; integer buffers are copied; ``updates`` += 1."""
        decay = self.next_decay()
        current = unwrap(model).state_dict()
        averaged, targets = [], []
        for name, ema_value in self.module.state_dict().items():
            value = current[name]
            if ema_value.is_floating_point():
                averaged.append(ema_value)
                targets.append(value.to(ema_value.dtype))
            else:
                ema_value.copy_(value)
        if averaged:
            torch._foreach_lerp_(averaged, targets, 1.0 - decay)
        self.updates += 1

    @torch.no_grad()
    def set(self, model: nn.Module) -> None:
        """Restart the EMA from ``model``'s current weights (counter 0)."""
        current = unwrap(model).state_dict()
        for name, ema_value in self.module.state_dict().items():
            ema_value.copy_(current[name])
        self.updates = 0

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entries: ``ema_model`` (the averaged weights, DINO's key) and ``ema_updates``."""
        return {"ema_model": self.module.state_dict(), "ema_updates": self.updates}

    def load_state_dict(self, state: Mapping[str, Any], source: str = "the checkpoint") -> None:
        """Load ``ema_model`` and ``ema_updates`` (a checkpoint of this model: every key, same shapes).

        Raises:
            CheckpointError: the EMA weights do not fit this model (naming ``source``).
        """
        try:
            self.module.load_state_dict(state["ema_model"])
        except RuntimeError as err:
            raise CheckpointError(f"checkpoint {source}: its EMA weights (ema_model) do not fit this model: "
                                  f"{str(err).splitlines()[0]}") from None
        self.updates = int(state.get("ema_updates", 0))


def start_ema(args: Any, model: nn.Module, start_ckpt: Mapping[str, Any] | None, source: str,
              restored: bool) -> ModelEMA | None:
    """The run's EMA (None when off), made after the model, its add-ons and the resumed weights.

    Args:
        args: the flags (``use_ema``, ``ema_decay``, ``ema_warmup_steps``, the add-ons).
        model: ``model_without_ddp``, holding the weights the run starts from.
        start_ckpt: the checkpoint the run starts from, or None.
        source: its path (for the log).
        restored: whether the checkpoint's training state was restored (an exact resume): only then its
            ``ema_model`` is loaded; otherwise (no EMA in it, ``--resume_weights_only``) the EMA starts from the
            model's weights with the counter at 0, and the log says so.
    """
    if not ema_enabled(args):
        if start_ckpt is not None and "ema_model" in start_ckpt and not args.eval:
            logger.info("%s holds EMA weights; EMA is off in this run (--use_ema keeps it)", source)
        return None
    ema = ModelEMA(model, args.ema_decay, args.ema_warmup_steps)
    warmup = f"warm-up T={args.ema_warmup_steps}" if args.ema_warmup_steps > 0 else "no warm-up"
    if start_ckpt is None:
        logger.info("EMA on (decay %g, %s): starts from the initial weights", args.ema_decay, warmup)
    elif restored and "ema_model" in start_ckpt:
        ema.load_state_dict(start_ckpt, source)
        logger.info("EMA on (decay %g, %s): resumed from %s (%d updates)", args.ema_decay, warmup, source,
                    ema.updates)
    else:
        why = "has no EMA weights" if "ema_model" not in start_ckpt else "is loaded as weights only"
        logger.info("EMA on (decay %g, %s): %s %s; the EMA starts from its model weights (update counter 0)",
                    args.ema_decay, warmup, source, why)
    return ema


def load_ema_weights(model: nn.Module, ckpt: Mapping[str, Any], source: str) -> int:
    """``--eval --eval_ema``: put the checkpoint's EMA weights into ``model``; returns the EMA's update count.

    Raises:
        CheckpointError: the checkpoint has no ``ema_model`` (trained without EMA), or it does not fit.
    """
    if "ema_model" not in ckpt:
        raise CheckpointError(f"--eval_ema: checkpoint {source} has no EMA weights (ema_model): it was trained "
                              "without --use_ema; leave --eval_ema out to evaluate its model")
    try:
        unwrap(model).load_state_dict(ckpt["ema_model"])
    except RuntimeError as err:
        raise CheckpointError(f"--eval_ema: the EMA weights of {source} do not fit this model: "
                              f"{str(err).splitlines()[0]}") from None
    updates = int(ckpt.get("ema_updates", 0))
    logger.info("--eval_ema: evaluating the EMA weights of %s (%d updates)", source, updates)
    return updates
