"""Progress logging in the official style: smoothed meters, ETA, 'Averaged stats'."""
from __future__ import annotations

import datetime
import logging
import sys
import time
from collections import deque
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from .misc import is_dist_avail_and_initialized, is_main_process

logger = logging.getLogger("detr")


def setup_logging(output_dir: str | None = None, rank: int = 0) -> None:
    """Log to stdout on rank 0 (warnings only elsewhere), and to output_dir/train.log."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    root.addHandler(handler)
    if output_dir and rank == 0:
        fh = logging.FileHandler(f"{output_dir}/train.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
        root.addHandler(fh)


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
    """Named SmoothedValues and a progress iterator printing every ``print_freq`` iterations."""

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
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self) -> None:
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def log_every(self, iterable: Iterable, print_freq: int, header: str = "", total: int | None = None) -> Iterator:
        """Yield from ``iterable``; log progress with ETA, iteration and data time."""
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
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - i - 1)))
                mem = ""
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    mem = f"  max mem: {torch.cuda.max_memory_allocated() / 2 ** 20:.0f}"
                logger.info(f"{header} [{i:>{width}}/{total}]  eta: {eta}  {self}  time: {iter_time}  "
                            f"data: {data_time}{mem}")
            end = time.time()
        total_time = time.time() - start
        if is_main_process():
            logger.info(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
                        f"({total_time / max(total, 1):.4f} s / it)")
