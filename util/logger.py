"""Logging people read: a short progress line, a start-up summary, args.json and TensorBoard scalars.

The progress iterator and smoothed meters follow the official Deformable-DETR ``util/misc.py``
(``SmoothedValue``, ``MetricLogger.log_every``); the progress line itself is this project's (one short
line whatever the number of layers and add-ons; every term still goes to ``log.txt`` and TensorBoard).
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import re
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist

from .errors import FlagError
from .misc import is_dist_avail_and_initialized, is_main_process

logger = logging.getLogger("detr")

MAIN_TERMS = ("ce", "bbox", "giou")  # the official loss terms, shown separately for the last decoder layer
# Names of the 12 numbers of COCOeval.stats (pycocotools' summarize() order).
COCO_STAT_NAMES = ("AP", "AP50", "AP75", "AP_small", "AP_medium", "AP_large",
                   "AR_max1", "AR_max10", "AR_max100", "AR_small", "AR_medium", "AR_large")
_LOSS_KEY = re.compile(r"loss_(?P<term>[a-z]+(?:_[a-z]+)*?)(?:_(?P<layer>\d+))?(?:_(?P<group>[a-z][a-z0-9]*))?")


def setup_logging(output_dir: str | None = None, rank: int = 0) -> None:
    """Log to stdout on rank 0 (warnings only elsewhere), and to output_dir/train.log."""
    root = logging.getLogger()
    for h in list(root.handlers):  # replace only the handlers a previous call installed
        if getattr(h, "_detr_handler", False):
            root.removeHandler(h)
            h.close()
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    handlers: list[logging.Handler] = [handler]
    if output_dir and rank == 0:
        fh = logging.FileHandler(f"{output_dir}/train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        handlers.append(fh)
    for h in handlers:
        h._detr_handler = True  # type: ignore[attr-defined]
        root.addHandler(h)


# --------------------------------------------------------------------------------------------
# The progress line
# --------------------------------------------------------------------------------------------
def group_losses(weighted: Mapping[str, float]) -> dict[str, float]:
    """The figures of the progress line: weighted loss terms summed by where they come from.

    Keys follow ``loss_{term}[_{layer}][_{group}]`` (models/addons/base.py ``loss_key``). The result holds
    ``ce``, ``bbox``, ``giou`` (the main queries' last decoder layer), ``aux`` (the main queries' earlier
    layers, summed) and one sum per group suffix (``dn``, ``enc``, ``o2m``, ``one2many``, ...: every term and
    layer of that group), so the figures add up to the total loss. A term other than ce/bbox/giou without a
    suffix (an add-on's own loss) keeps its name.

    Args:
        weighted: loss key -> weighted value (``*_unscaled`` and non-loss keys are ignored).

    Returns:
        figure name -> value; main terms first, then ``aux``, then the groups in alphabetical order.
    """
    parsed = [(m, value) for key, value in weighted.items()
              if not key.endswith("_unscaled") and (m := _LOSS_KEY.fullmatch(key)) is not None]
    known_groups = {m["group"] for m, _ in parsed if m["group"] and (m["term"] in MAIN_TERMS or m["layer"])}
    main: dict[str, float] = {}
    groups: dict[str, float] = {}
    for m, value in parsed:
        term, layer, group = m["term"], m["layer"], m["group"]
        if group is not None and group not in known_groups:  # loss_rpn_cls: a two-word term, not a suffix
            term, group = f"{term}_{group}", None
        if group is not None:
            groups[group] = groups.get(group, 0.0) + value
        else:
            name = "aux" if layer is not None else term
            main[name] = main.get(name, 0.0) + value
    order = [t for t in MAIN_TERMS if t in main] + sorted(k for k in main if k not in MAIN_TERMS and k != "aux")
    out = {k: main[k] for k in order}
    if "aux" in main:
        out["aux"] = main["aux"]
    out.update((k, groups[k]) for k in sorted(groups))
    return out


def fmt_number(v: float) -> str:
    """About four significant digits in few characters: 52.00, 3.180, 0.123, 1.2e-03, 12345."""
    a = abs(v)
    if not math.isfinite(v) or a >= 1000:
        return f"{v:.0f}"
    if a == 0:
        return "0"
    if a < 0.01:
        return f"{v:.1e}"
    return f"{v:.{3 if a < 10 else 2 if a < 100 else 1}f}"


def fmt_duration(seconds: float) -> str:
    """``26:03:04`` (hours may pass 24; shorter than timedelta's ``1 day, 2:03:04``)."""
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02}:{s:02}"


def peak_memory() -> str:
    """``mem 1234M``: peak CUDA memory allocated when CUDA is in use, else ``rss 1234M``: the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return f"mem {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}M"
    try:
        import resource
    except ImportError:  # Windows
        return ""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return f"rss {peak / 2 ** (20 if sys.platform == 'darwin' else 10):.0f}M"  # bytes on macOS, KiB on Linux


class SmoothedValue:
    """A series of values with a windowed median/average and a global average."""

    def __init__(self, window_size: int = 20, fmt: str = "{median:.4f} ({global_avg:.4f})") -> None:
        self.deque: deque[float] = deque(maxlen=window_size)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value: float, n: int = 1) -> None:
        self.deque.append(value)
        self.count += n
        self.total += value * n

    def synchronize_between_processes(self) -> None:
        """All-reduce count and total (the window stays local)."""
        if not is_dist_avail_and_initialized():
            return
        t = torch.tensor([self.count, self.total], dtype=torch.float64)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t)
        self.count, self.total = int(t[0].item()), float(t[1].item())

    @property
    def median(self) -> float:
        return float(torch.tensor(list(self.deque)).median().item()) if self.deque else 0.0

    @property
    def avg(self) -> float:
        return sum(self.deque) / len(self.deque) if self.deque else 0.0

    @property
    def global_avg(self) -> float:
        return self.total / max(self.count, 1)

    @property
    def value(self) -> float:
        return self.deque[-1] if self.deque else 0.0

    def __str__(self) -> str:
        return self.fmt.format(median=self.median, avg=self.avg, global_avg=self.global_avg, value=self.value)


class MetricLogger:
    """Named SmoothedValues and a progress iterator logging one short line every ``print_freq`` iterations."""

    def __init__(self, delimiter: str = "  ") -> None:
        self.meters: dict[str, SmoothedValue] = {}
        self.delimiter = delimiter
        self.iter_time: SmoothedValue | None = None  # set by log_every at the end of the loop
        self.data_time: SmoothedValue | None = None

    def add_meter(self, name: str, meter: SmoothedValue) -> None:
        self.meters[name] = meter

    def update(self, **kwargs: float) -> None:
        for k, v in kwargs.items():
            if k not in self.meters:
                self.meters[k] = SmoothedValue()
            self.meters[k].update(float(v))

    def __str__(self) -> str:
        """Every meter (long with many layers and add-ons; the progress line uses ``summary``)."""
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def summary(self, averaged: bool = False) -> str:
        """``loss 52.00 (ce 1.234 bbox 3.180 giou 1.110 aux 6.52 dn 9.10 ...) lr 2.0e-04 grad 36.02``.

        Loss figures are weighted and grouped by ``group_losses`` (they add up to ``loss``); they are the mean
        of the meters' window (the last 20 iterations), or of the whole epoch when ``averaged``.
        """
        values = {k: m.global_avg if averaged else m.avg for k, m in self.meters.items() if m.count}
        parts = []
        if "loss" in values:
            parts.append(f"loss {fmt_number(values['loss'])}")
        figures = group_losses(values)
        if figures:
            parts.append("(" + " ".join(f"{k} {fmt_number(v)}" for k, v in figures.items()) + ")")
        if "lr" in values:
            parts.append(f"lr {self.meters['lr'].value:.1e}")
        if "grad_norm" in values:
            parts.append(f"grad {fmt_number(values['grad_norm'] if averaged else self.meters['grad_norm'].value)}")
        return " ".join(parts)

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "", total: int | None = None) -> Iterator:
        """Yield from ``iterable``; every ``print_freq`` iterations log one line: losses, lr, grad norm (from
        ``summary``), seconds per iteration and data time (window means), peak memory and the epoch's ETA."""
        total = len(iterable) if total is None else total
        start = end = time.time()
        iter_time, data_time = SmoothedValue(fmt="{avg:.4f}"), SmoothedValue(fmt="{avg:.4f}")
        # Set now, not after the loop: a caller that stops early (--max_iters_per_epoch) never resumes us.
        self.iter_time, self.data_time = iter_time, data_time
        width = len(str(total))
        for i, obj in enumerate(iterable):
            data_time.update(time.time() - end)
            yield obj
            iter_time.update(time.time() - end)
            if i % print_freq == 0 or i == total - 1:
                eta = fmt_duration(iter_time.global_avg * (total - i - 1))
                speed = f"{iter_time.avg:.3f} s/it (data {data_time.avg:.3f})"
                line = " | ".join(p for p in (self.summary(), speed, peak_memory(), f"eta {eta}") if p)
                logger.info(f"{header} [{i:>{width}}/{total}] {line}")
            end = time.time()
        total_time = time.time() - start
        if is_main_process():
            logger.info(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
                        f"({total_time / max(total, 1):.4f} s / it)")


# --------------------------------------------------------------------------------------------
# Start-up: args.json and a short summary
# --------------------------------------------------------------------------------------------
def save_args(args: Any, output_dir: str | None) -> Path | None:
    """Write every flag to ``output_dir/args.json`` (pretty-printed, sorted); without an output dir, log them
    as indented JSON instead. Returns the file written (None when nothing was written)."""
    text = json.dumps(vars(args), indent=2, sort_keys=True, default=str)
    if not output_dir:
        logger.info("flags (no --output_dir, so no args.json):\n%s", text)
        return None
    path = Path(output_dir) / "args.json"
    path.write_text(text + "\n")
    return path


def describe_run(args: Any, addon_names: Iterable[str], num_train: int | None, num_val: int) -> list[str]:
    """A few readable lines about the run (model, backbone, add-ons, data, device, output) for the log."""
    if args.pretrained_backbone_path:
        weights = f"weights {args.pretrained_backbone_path}"
    else:
        weights = "from scratch" if args.backbone_from_scratch else "random weights"
    options = [name for name, on in (("box refine", args.with_box_refine), ("two-stage", args.two_stage)) if on]
    addons = ", ".join(addon_names) or "none"
    model = (f"model {args.model}: backbone {args.backbone} ({weights}), {args.enc_layers} enc + {args.dec_layers} "
             f"dec layers, hidden {args.hidden_dim}, {args.num_queries} queries"
             f"{''.join(', ' + o for o in options)}; add-ons: {addons}")
    train = f"{num_train} train / " if num_train is not None else ""
    world = getattr(args, "world_size", 1)
    data = (f"data: {args.dataset_file} at {args.coco_path} ({train}{num_val} val images, {args.num_classes} "
            f"classes); batch {args.batch_size} x {world} process{'es' if world > 1 else ''}, epochs {args.epochs}, "
            f"lr {args.lr:g} (backbone {args.lr_backbone:g}), {'SGD' if args.sgd else 'AdamW'}")
    amp = f"AMP {args.amp_dtype}" if args.amp else "AMP off"
    out = f"output {args.output_dir} (every flag in args.json)" if args.output_dir else "no --output_dir: nothing saved"
    return [model, data, f"device {args.device} ({amp}); {out}"]


# --------------------------------------------------------------------------------------------
# TensorBoard (optional dependency)
# --------------------------------------------------------------------------------------------
def check_tensorboard(enabled: bool, output_dir: str | None) -> None:
    """Refuse ``--tensorboard`` at start when it cannot work (no output dir, tensorboard not installed)."""
    if not enabled:
        return
    if not output_dir:
        raise FlagError("--tensorboard writes under --output_dir/tensorboard; pass --output_dir")
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise FlagError(f"--tensorboard needs the tensorboard package ({e}): pip install tensorboard") from None


def open_tensorboard(output_dir: str) -> Any:
    """A SummaryWriter writing under ``output_dir/tensorboard`` (call on rank 0 only)."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=str(Path(output_dir) / "tensorboard"))


def write_scalars(writer: Any, prefix: str, values: Mapping[str, Any], step: int) -> None:
    """``prefix/name`` for every finite number in ``values`` (lists and strings are skipped)."""
    for name, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            writer.add_scalar(f"{prefix}/{name}", value, step)


def write_epoch(writer: Any, log_stats: Mapping[str, Any], epoch: int) -> None:
    """One epoch's ``log.txt`` entry as ``train/*``, ``test/*`` and the 12 COCO numbers (``coco/AP``, ``coco/AP50``,
    ... ``COCO_STAT_NAMES``; the EMA model's as ``coco_ema/*``), and ``stability/instability[_ema]``, at step
    ``epoch``."""
    for prefix in ("train", "test"):
        write_scalars(writer, prefix, {k[len(prefix) + 1:]: v for k, v in log_stats.items()
                                       if k.startswith(prefix + "_")}, epoch)
    for prefix, key in (("coco", "test_coco_eval_bbox"), ("coco_ema", "test_ema_coco_eval_bbox")):  # EMA: --use_ema
        if log_stats.get(key):
            write_scalars(writer, prefix, dict(zip(COCO_STAT_NAMES, log_stats[key])), epoch)
    write_scalars(writer, "stability", {k: v for k, v in log_stats.items() if k.startswith("instability")}, epoch)
    writer.flush()  # an epoch's numbers survive a crash of the next epoch
