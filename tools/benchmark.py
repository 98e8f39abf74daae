"""Inference images/s and training-step time of a model config, side by side for several op implementations
and flag sets.

    python tools/benchmark.py --backbone resnet50 --with_box_refine --two_stage --device cuda \
        --bench_size 800 1333 --bench_batch 2 --impls pytorch auto
    python tools/benchmark.py --backbone resnet50 --device cpu --bench_size 320 512 --bench_batch 1 \
        --variant=--amp "--variant=--amp --amp_backbone_half --channels_last"

Inputs are random images of a fixed size with random boxes (no data set needed). Every row (an implementation of
``--impls``, with each ``--variant``'s flags added to the command's) is built and warmed up (``--bench_warmup``
iterations) first; then the rows are timed in turns, ``--bench_iters`` times, so that load from other processes
hits them alike. Timings are medians; ratios are against the first row. A training step is engine.py's: forward,
losses, backward, gradient clipping (``--clip_max_norm``), AdamW. On a GPU the peak memory is a row's own, as if it
ran alone: what it holds (weights, optimizer state, gradients) plus what a training step allocates on top.

``--profile FILE`` then runs ``--profile_steps`` more training steps of the first row under torch.profiler and
writes where the time goes (markdown): per phase (forward, loss, backward, optimizer) the host time and the device
time of the kernels it launched, the device's busy time against the wall time (a step whose device is mostly idle
is bound by the host), and the operators with the most device (on a GPU) or host time.
"""
from __future__ import annotations

import contextlib
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flags import FlagError, finalize_args, get_args_parser, validate_args  # noqa: E402
from models import build_model  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402
from util.optim import build_optimizer  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _inputs(args, device: torch.device):
    g = torch.Generator().manual_seed(0)
    h, w = args.bench_size
    images = [torch.randn(3, h, w, generator=g).to(device) for _ in range(args.bench_batch)]
    targets = []
    for _ in range(args.bench_batch):
        n = 7  # COCO average number of boxes per image
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        size = torch.rand(n, 2, generator=g) * 0.3 + 0.05
        targets.append({"labels": torch.randint(1, args.num_classes, (n,), generator=g).to(device),
                        "boxes": torch.cat([centre, size], 1).to(device)})
    return nested_tensor_from_tensor_list(images), targets


def _interleaved(fns: list, iters: int, device: torch.device) -> list[float]:
    """Median seconds of each of ``fns``, timed in turns (``fns[0]``, ``fns[1]``, ..., ``fns[0]``, ...): load from
    other processes hits every row alike."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(iters):
        for fn, t in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            t.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


class Row:
    """One row of the table: the model of the command's flags plus a variant's, an op implementation, its inputs,
    optimizer and steps. Building it runs the warm-up and measures its peak memory (on a GPU)."""

    def __init__(self, args, impl: str, variant: str | None, device: torch.device) -> None:
        self.impl, self.variant, self.args = impl, variant, args
        before = _allocated(device)
        args.msda_impl = impl
        torch.manual_seed(0)
        model, criterion, post = build_model(args)
        self.model = model.to(device)
        samples, targets = _inputs(args, device)
        trained = [p for p in model.parameters() if p.requires_grad]
        optimizer = build_optimizer(trained, SimpleNamespace(**{**vars(args), "lr": 1e-5}))  # as main.py, lr 1e-5
        amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16,
                             enabled=args.amp)
        sizes = torch.tensor([list(args.bench_size)] * args.bench_batch, device=device)

        @torch.no_grad()
        def infer():
            with amp:
                out = model(samples)
            post["bbox"](out, sizes)

        def train_step(phase=_no_phase):
            with phase("forward"), amp:
                out = model(samples)
            with phase("loss"):
                losses = criterion(out, targets)
                total = criterion.total_loss(losses)
            optimizer.zero_grad(set_to_none=True)
            with phase("backward"):
                total.backward()
            with phase("optimizer"):
                if args.clip_max_norm > 0:
                    torch.nn.utils.clip_grad_norm_(trained, args.clip_max_norm)
                optimizer.step()

        self.infer, self.train_step = infer, train_step
        model.eval()
        for _ in range(args.bench_warmup):
            infer()
        model.train()
        for _ in range(args.bench_warmup):
            train_step()
        # Peak memory of a training step as if this row were alone on the device: what it holds (weights, optimizer
        # state, gradients: everything allocated since it was built) plus what a step allocates on top of that.
        self.peak_mem_mib = float("nan")
        if device.type == "cuda":
            _sync(device)
            held = _allocated(device) - before
            torch.cuda.reset_peak_memory_stats(device)
            start = _allocated(device)
            train_step()
            _sync(device)
            self.peak_mem_mib = (held + torch.cuda.max_memory_allocated(device) - start) / 2 ** 20

    @property
    def label(self) -> str:
        if self.variant is None:
            return self.impl
        flags = self.variant or "base"
        return flags if len(self.args.impls) == 1 else f"{self.impl}: {flags}"


def bench(rows: list[Row], args, device: torch.device) -> dict[str, dict[str, float]]:
    """Inference and training-step times of every row, timed in turns; then the profile of the first row."""
    for row in rows:
        row.model.eval()
    t_inf = _interleaved([row.infer for row in rows], args.bench_iters, device)
    for row in rows:
        row.model.train()
    t_train = _interleaved([row.train_step for row in rows], args.bench_iters, device)
    results = {row.label: {"impl": row.impl, "variant": row.variant, "infer_img_s": args.bench_batch / ti,
                           "train_step_s": tt, "peak_mem_mib": row.peak_mem_mib}
               for row, ti, tt in zip(rows, t_inf, t_train)}
    if args.profile:
        first = rows[0]
        timer = PhaseTimer(device)
        for _ in range(args.profile_steps):  # the phases' host and device times, without the profiler's overhead
            first.train_step(timer)
        results[first.label]["profile"] = profile_steps(first.train_step, args.profile_steps, device,
                                                        Path(args.profile), timer,
                                                        f"{' '.join(sys.argv[1:])} ({first.label})")
    return results


PHASES = ("forward", "loss", "backward", "optimizer")


class PhaseTimer:
    """Context manager factory ``timer(phase)``: the host time of each phase (perf_counter) and, on a GPU, the
    device time between CUDA events recorded on the current stream where the phase starts and ends (what the
    device spent on the phase's work, idle gaps within it included; the autograd engine runs the backward's
    kernels on the forward's streams)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.host: dict[str, float] = dict.fromkeys(PHASES, 0.0)
        self.marks: list[tuple[str, object, object]] = []
        self.steps_wall = 0.0

    @contextlib.contextmanager
    def __call__(self, name: str):
        events = None
        if self.device.type == "cuda":
            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        start = time.perf_counter()
        try:
            yield
        finally:
            if events is not None:
                events[1].record()
                self.marks.append((name, *events))
            self.host[name] = self.host.get(name, 0.0) + time.perf_counter() - start

    def device_ms(self) -> dict[str, float]:
        """Device milliseconds per phase, summed over the steps (NaN on the CPU)."""
        if self.device.type != "cuda":
            return dict.fromkeys(self.host, float("nan"))
        torch.cuda.synchronize(self.device)
        out = dict.fromkeys(self.host, 0.0)
        for name, begin, end in self.marks:
            out[name] += begin.elapsed_time(end)
        return out


def _self_device_time(event) -> float:
    """Self device microseconds of a profiler average (torch < 2.4 calls it cuda)."""
    return getattr(event, "self_device_time_total", getattr(event, "self_cuda_time_total", 0.0))


def profile_steps(step, steps: int, device: torch.device, path: Path, timer: PhaseTimer,
                  title: str) -> dict[str, float]:
    """Profile ``steps`` training steps; write the summary (markdown) with ``timer``'s phases (measured over as many
    steps before) to ``path``; return the figures (ms per step)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    on_gpu = device.type == "cuda"
    if on_gpu:
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    _sync(device)
    start = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        _sync(device)
    wall = (time.perf_counter() - start) / steps * 1e3
    averages = prof.key_averages()
    # every device activity (kernel, copy, memset) has its own row; the CPU operators' rows have no self device time
    busy = sum(_self_device_time(e) for e in averages) / steps / 1e3 if on_gpu else float("nan")
    figures = {"profiled_wall_ms": wall, "device_busy_ms": busy}
    device = timer.device_ms()
    rows = []
    for name in PHASES:
        host, dev = timer.host[name] / steps * 1e3, device[name] / steps
        figures[f"{name}_host_ms"], figures[f"{name}_device_ms"] = host, dev
        rows.append(f"| {name} | {host:.1f} | {dev:.1f} |")
    sort = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    try:
        table = averages.table(sort_by=sort, row_limit=30)
    except (AttributeError, KeyError):  # torch < 2.4: cuda instead of device
        table = averages.table(sort_by=sort.replace("device", "cuda"), row_limit=30)
    lines = [f"# Training-step profile: {title}", "",
             f"Phases ({steps} steps without the profiler; host: wall time of the Python call, device: time between "
             f"CUDA events at the phase's start and end on the stream):", "",
             "| phase | host ms/step | device ms/step |", "|---|---|---|", *rows, "",
             f"Under torch.profiler ({steps} more steps; it slows the host): wall {wall:.1f} ms/step, the device busy "
             f"{busy:.1f} ms/step (kernels, copies and memsets; the rest of the wall time it waits for the host).", "",
             f"Operators by {'device' if on_gpu else 'host'} self time (all {steps} steps):", "", "```", table, "```"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return figures


def main() -> None:
    parser = get_args_parser()
    g = parser.add_argument_group("benchmark")
    g.add_argument("--bench_size", nargs=2, type=int, default=[800, 1333], metavar=("H", "W"))
    g.add_argument("--bench_batch", type=int, default=2)
    g.add_argument("--bench_iters", type=int, default=10)
    g.add_argument("--bench_warmup", type=int, default=2)
    g.add_argument("--impls", nargs="+", default=["auto"], help="MSDeformAttn implementations to compare")
    g.add_argument("--variant", action="append", metavar="FLAGS",
                   help="a flag set added to the command's flags: one more row after the command's own; repeat for "
                        "more rows, e.g. --variant=--amp \"--variant=--amp --channels_last\" ('=': the value starts "
                        "with --); with several --impls, every implementation with every variant")
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    g.add_argument("--json", help="also write the results here (one object per row)")
    g.add_argument("--profile", help="then profile training steps of the first row: summary here (.md)")
    g.add_argument("--profile_steps", type=int, default=3)
    argv = sys.argv[1:]
    args = finalize_args(parser.parse_args(argv))
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu")
    flags = " ".join(argv)
    variants = [""] + args.variant if args.variant else [None]
    if len(set(variants)) < len(variants) or len(set(args.impls)) < len(args.impls):
        parser.error("every --variant and every --impls entry names one row: one of them is given twice")
    configs = []
    for variant in variants:  # every variant's flags checked before any model is built
        v = finalize_args(parser.parse_args(argv + (variant or "").split()))
        v.num_classes = 91 if v.num_classes is None else v.num_classes
        try:
            validate_args(v)
        except FlagError as e:
            parser.error(f"{'--variant=' + variant + ': ' if variant else ''}{e}")
        configs.append((variant, v))
    print(f"config: {flags}\ndevice: {device}, threads {torch.get_num_threads()}, batch {args.bench_batch}, "
          f"image {args.bench_size[0]}x{args.bench_size[1]}, median of {args.bench_iters}, rows timed in turns")
    rows = [Row(copy.copy(v), impl, variant, device) for variant, v in configs for impl in args.impls]
    results = bench(rows, args, device)
    base = next(iter(results.values()))
    width = max(10, *(len(label) for label in results))
    print(f"{'row':<{width}} {'infer img/s':>12} {'train s/step':>13} {'peak MiB':>9} {'infer x':>8} {'train x':>8}")
    for label, r in results.items():
        print(f"{label:<{width}} {r['infer_img_s']:>12.2f} {r['train_step_s']:>13.4f} {r['peak_mem_mib']:>9.0f} "
              f"{r['infer_img_s'] / base['infer_img_s']:>8.2f} {base['train_step_s'] / r['train_step_s']:>8.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": flags, "device": str(device),
                                               "device_name": torch.cuda.get_device_name(device)
                                               if device.type == "cuda" else "cpu",
                                               "torch": torch.__version__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
