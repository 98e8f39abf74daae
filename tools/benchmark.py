"""Inference images/s and training-step time of a model config, side by side for several op implementations.

    python tools/benchmark.py --backbone resnet50 --with_box_refine --two_stage --device cuda \
        --bench_size 800 1333 --bench_batch 2 --impls pytorch auto

Inputs are random images of a fixed size with random boxes (no data set needed). Timings are medians
over ``--bench_iters`` iterations after ``--bench_warmup``; ratios are against the first implementation. A training
step is engine.py's: forward, losses, backward, gradient clipping (``--clip_max_norm``), AdamW.

``--profile FILE`` then runs ``--profile_steps`` more training steps of the first implementation under
torch.profiler and writes where the time goes (markdown): per phase (forward, loss, backward, optimizer) the host
time and the device time of the kernels it launched, the device's busy time against the wall time (a step whose
device is mostly idle is bound by the host), and the operators with the most device (on a GPU) or host time.
"""
from __future__ import annotations

import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flags import finalize_args, get_args_parser  # noqa: E402
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


def _time(fn, iters: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench(args, impl: str, device: torch.device) -> dict[str, float]:
    args.msda_impl = impl
    torch.manual_seed(0)
    model, criterion, post = build_model(args)
    model.to(device)
    samples, targets = _inputs(args, device)
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(trained, SimpleNamespace(**{**vars(args), "lr": 1e-5}))  # as main.py, lr 1e-5
    amp = torch.autocast(device.type, dtype=torch.bfloat16 if args.amp_dtype == "bf16" else torch.float16,
                         enabled=args.amp)

    @torch.no_grad()
    def infer():
        with amp:
            out = model(samples)
        post["bbox"](out, torch.tensor([list(args.bench_size)] * args.bench_batch, device=device))

    phase = _no_phase

    def train_step():
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

    model.eval()
    t_inf = _time(infer, args.bench_iters, args.bench_warmup, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_train = _time(train_step, args.bench_iters, args.bench_warmup, device)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")
    result = {"infer_img_s": args.bench_batch / t_inf, "train_step_s": t_train, "peak_mem_mib": mem}
    if args.profile and impl == args.impls[0]:
        timer = PhaseTimer(device)
        phase = timer
        for _ in range(args.profile_steps):  # the phases' host and device times, without the profiler's overhead
            train_step()
        phase = _no_phase
        result["profile"] = profile_steps(train_step, args.profile_steps, device, Path(args.profile), timer,
                                          f"{' '.join(sys.argv[1:])} (impl {impl})")
    return result


def _no_phase(name: str) -> contextlib.AbstractContextManager:
    return contextlib.nullcontext()


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
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    g.add_argument("--json", help="also write the results here (one object per implementation)")
    g.add_argument("--profile", help="then profile training steps of the first implementation: summary here (.md)")
    g.add_argument("--profile_steps", type=int, default=3)
    args = finalize_args(parser.parse_args())
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.num_classes is None:
        args.num_classes = 91
    device = torch.device(args.device if args.device == "cpu" or torch.cuda.is_available() else "cpu")
    flags = " ".join(sys.argv[1:])
    print(f"config: {flags}\ndevice: {device}, threads {torch.get_num_threads()}, batch {args.bench_batch}, "
          f"image {args.bench_size[0]}x{args.bench_size[1]}, median of {args.bench_iters}")
    rows = [(impl, bench(args, impl, device)) for impl in args.impls]
    base = rows[0][1]
    print(f"{'impl':<10} {'infer img/s':>12} {'train s/step':>13} {'peak MiB':>9} {'infer x':>8} {'train x':>8}")
    for impl, r in rows:
        print(f"{impl:<10} {r['infer_img_s']:>12.2f} {r['train_step_s']:>13.4f} {r['peak_mem_mib']:>9.0f} "
              f"{r['infer_img_s'] / base['infer_img_s']:>8.2f} {base['train_step_s'] / r['train_step_s']:>8.2f}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"config": flags, "device": str(device),
                                               "device_name": torch.cuda.get_device_name(device)
                                               if device.type == "cuda" else "cpu",
                                               "torch": torch.__version__, "results": dict(rows)}, indent=1))


if __name__ == "__main__":
    main()
