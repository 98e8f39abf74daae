"""DN-DETR's matching instability (Li et al. 2022; OD-DETR's Fig. 1): how often the query matched to a GT changes.

``--log_instability N`` draws N training images once (a private generator seeded with ``--seed``: the same set
in every run, on every rank and after a resume). At each epoch end :class:`InstabilityProbe` runs the model
(and the EMA model when EMA is on) in eval mode on them, with the evaluation transforms and without add-on
query groups, matches the final decoder layer's predictions (``pred_logits``, ``pred_boxes``) to the GT with
the criterion's Hungarian matcher and records the index of the query matched to every GT (-1: unmatched, when
an image has more GTs than queries). Then

    instability(e) = #{GTs whose matched query at epoch e differs from epoch e-1} / #GTs

logged as ``instability`` (the model) and ``instability_ema`` (the EMA) in log.txt. An epoch without a
previous assignment (the first epoch of a run, the first after the EMA was restarted) has no value: the key is
absent from that epoch's line. The previous assignments are kept in the checkpoint (``instability``), so a
resumed run logs what the uninterrupted one does. The probe draws no random numbers from the training RNGs.
"""
from __future__ import annotations

import contextlib
import copy
import logging
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import Tensor, nn

from util.misc import collate_fn

logger = logging.getLogger("detr")

Indices = list[tuple[Tensor, Tensor]]
KEYS = ("instability", "instability_ema")  # log.txt keys: the model's, the EMA model's


def select_images(num_images: int, count: int, seed: int) -> list[int]:
    """``count`` distinct indexes of ``range(num_images)`` (all when fewer), sorted; a function of ``seed`` only."""
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    return sorted(order[:count].tolist())


def matched_queries(indices: Indices, num_gts: Sequence[int]) -> Tensor:
    """The query matched to every GT, images concatenated in order.

    Args:
        indices: per image (query indexes, GT indexes), as the matcher returns them.
        num_gts: GTs per image.

    Returns:
        int64 [sum(num_gts)]: matched query index per GT, -1 for a GT without a query.
    """
    parts = []
    for (query, gt), n in zip(indices, num_gts):
        assigned = torch.full((n,), -1, dtype=torch.int64)
        assigned[gt.cpu()] = query.cpu().to(torch.int64)
        parts.append(assigned)
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def instability(previous: Tensor, current: Tensor) -> float:
    """Fraction of GTs whose matched query differs between two assignments (NaN when there is no GT).

    Raises:
        ValueError: the assignments do not cover the same GTs.
    """
    if previous.shape != current.shape:
        raise ValueError(f"assignments of {previous.numel()} and {current.numel()} GTs cannot be compared")
    if current.numel() == 0:
        return float("nan")
    return float((previous != current).to(torch.float64).mean())


class InstabilityProbe:
    """Matched query per GT on a fixed image set, and its change from one epoch to the next.

    Args:
        dataset: items ``(image [3, H, W], target)`` with deterministic (evaluation) transforms.
        indices: the images of ``dataset`` to use.
        matcher: ``(outputs, targets) -> indices`` (the criterion's Hungarian matcher).
        batch_size: images per forward.
        device: where the model runs.
        amp: run under autocast (``amp_dtype`` "bf16" or "fp16"), as the evaluation does.
    """

    def __init__(self, dataset: Any, indices: Sequence[int], matcher: Callable[..., Indices], batch_size: int,
                 device: torch.device, amp: bool = False, amp_dtype: str = "bf16") -> None:
        self.dataset = dataset
        self.indices = list(indices)
        self.matcher = matcher
        self.batch_size = max(1, batch_size)
        self.device = device
        self.amp, self.amp_dtype = amp, amp_dtype
        self.previous: dict[str, Tensor] = {}
        self.last_stats: dict[str, float] = {}

    @classmethod
    def from_args(cls, args: Any, dataset_train: Any, matcher: Callable[..., Indices],
                  device: torch.device) -> InstabilityProbe | None:
        """The probe of ``--log_instability N`` (None when 0): N training images with the evaluation transforms."""
        count = getattr(args, "log_instability", 0)
        if not count or dataset_train is None:
            return None
        from datasets import input_sizes
        from datasets.seeded import SeededDataset
        from datasets.transforms import make_coco_transforms

        base = dataset_train
        while not hasattr(base, "_transforms") and hasattr(base, "dataset"):
            base = base.dataset
        probe = copy.copy(base)  # shares the index and the images; only the transforms differ
        probe._transforms = make_coco_transforms("val", sizes=input_sizes(args))
        probe.extra_box_sets = None
        if count > len(probe):
            logger.warning("--log_instability %d: the training set has %d images; all are used", count, len(probe))
        indices = select_images(len(probe), count, args.seed)
        # SeededDataset restores python's and torch's RNG states around each item: the probe draws nothing.
        return cls(SeededDataset(probe, args.seed), indices, matcher, args.batch_size, device, args.amp,
                   args.amp_dtype)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if not self.amp:
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.amp_dtype == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    @torch.no_grad()
    def assignments(self, model: nn.Module) -> Tensor:
        """Matched query per GT of the image set (int64 [total GTs], -1: unmatched); ``model`` unwrapped."""
        was_training = model.training
        model.eval()
        parts = []
        try:
            for start in range(0, len(self.indices), self.batch_size):
                samples, targets = collate_fn([self.dataset[i] for i in self.indices[start:start + self.batch_size]])
                samples = samples.to(self.device)
                targets = [{k: v.to(self.device) for k, v in t.items() if k in ("labels", "boxes")} for t in targets]
                with self._autocast():
                    outputs = model(samples)
                final = {"pred_logits": outputs["pred_logits"], "pred_boxes": outputs["pred_boxes"]}
                parts.append(matched_queries(self.matcher(final, targets), [len(t["labels"]) for t in targets]))
        finally:
            model.train(was_training)
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)

    def step(self, models: Mapping[str, nn.Module | None]) -> dict[str, float]:
        """Record this epoch's assignments of each model (keys of ``KEYS``; None: skipped and forgotten) and
        return the instability of those that have a previous assignment."""
        stats = {}
        for key, model in models.items():
            if model is None:
                self.previous.pop(key, None)
                continue
            current = self.assignments(model)
            if key in self.previous:
                stats[key] = instability(self.previous[key], current)
            self.previous[key] = current
        self.last_stats = stats
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Checkpoint entry: the image set, the last assignments and the last epoch's values."""
        return {"indices": torch.tensor(self.indices, dtype=torch.int64), "previous": dict(self.previous),
                "stats": dict(self.last_stats)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the last assignments (ignored, with a warning, when the checkpoint used another image set)."""
        if state["indices"].tolist() != self.indices:
            logger.warning("--log_instability: the checkpoint's image set differs from this run's (another "
                           "--log_instability, --seed or training set); instability restarts at the next epoch")
            return
        self.previous = {k: v.clone() for k, v in state.get("previous", {}).items()}
        self.last_stats = dict(state.get("stats", {}))
