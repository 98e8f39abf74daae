"""Inference images/s and training-step time of a model config, side by side for several op implementations.

    python tools/benchmark.py --backbone resnet50 --with_box_refine --two_stage --device cuda \
        --bench_size 800 1333 --bench_batch 2 --impls pytorch auto

Inputs are random images of a fixed size with random boxes (no data set needed). Timings are medians
over ``--bench_iters`` iterations after ``--bench_warmup``; ratios are against the first implementation.
"""
from __future__ import annotations

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

    def train_step():
        with amp:
            out = model(samples)
        losses = criterion(out, targets)
        total = criterion.total_loss(losses)
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()

    model.eval()
    t_inf = _time(infer, args.bench_iters, args.bench_warmup, device)
    model.train()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t_train = _time(train_step, args.bench_iters, args.bench_warmup, device)
    mem = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")
    return {"infer_img_s": args.bench_batch / t_inf, "train_step_s": t_train, "peak_mem_mib": mem}


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
