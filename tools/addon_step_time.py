"""Side-by-side training-step time of a model with and without add-on flags (same weights, same batch).

    python tools/addon_step_time.py --flags="--with_box_refine --two_stage" --addon_flags="--use_dn" --steps 20

Both models are built from the synthetic benchmark's model size (tools/synthetic_benchmark.py COMMON),
steps alternate A, B, A, B ... so that load from other processes hits both alike, and the median
forward + loss + backward + clip + optimizer-step time of each is reported with the ratio B / A.

A step is engine.py's: the add-ons' ``before_forward``/``after_step`` hooks run, and a side that keeps an EMA
(``--use_ema`` or an add-on that needs one, e.g. ``--addons od``) updates it after the optimizer step. Each
target also carries teacher boxes (``ext_*`` fields, already merged as the data path delivers them: the GT
boxes jittered, plus as many random ones, scores in [0.3, 1]) for ``--ensemble``; a side without it ignores them.

    python tools/addon_step_time.py --addon_flags="--ensemble --ext_ann_files t=unused.json"
    python tools/addon_step_time.py --flags="--with_box_refine --two_stage --use_ema" --addon_flags="--addons od"
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flags import finalize_args, get_args_parser  # noqa: E402
from models import build_model  # noqa: E402
from models.addons.base import StepContext, overrides  # noqa: E402
from util.ema import ModelEMA, ema_enabled  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402
from util.optim import build_optimizer  # noqa: E402

MODEL = ("--backbone resnet18 --backbone_from_scratch --hidden_dim 64 --nheads 8 --enc_layers 2 --dec_layers 3 "
         "--dim_feedforward 256 --num_queries 30 --num_classes 6 --device cpu")


def batch(size: int, image: int, max_objects: int, seed: int = 0, width: int | None = None) -> tuple[list, list]:
    """Random images with 1..max_objects boxes each (the synthetic set holds 1-6 objects per image)."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(3, image, width or image, generator=g) for _ in range(size)]
    targets = []
    for _ in range(size):
        n = int(torch.randint(1, max_objects + 1, (1,), generator=g))
        centre = torch.rand(n, 2, generator=g) * 0.6 + 0.2
        wh = torch.rand(n, 2, generator=g) * 0.2 + 0.05
        boxes = torch.cat([centre, wh], 1)
        labels = torch.randint(0, 6, (n,), generator=g)
        jittered = (boxes + torch.randn(n, 4, generator=g) * 0.02).clamp(0.01, 0.99)
        extra = torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.2 + 0.05], 1)
        targets.append({"labels": labels, "boxes": boxes,
                        "ext_boxes": torch.cat([jittered, extra]),
                        "ext_labels": torch.cat([labels, torch.randint(0, 6, (n,), generator=g)]),
                        "ext_scores": torch.rand(2 * n, generator=g) * 0.7 + 0.3,
                        "ext_teacher": torch.zeros(2 * n, dtype=torch.long), "ext_merged": True})
    return images, targets


def make(flags: str, model: str = MODEL):
    torch.manual_seed(0)
    args = finalize_args(get_args_parser().parse_args((model + " " + flags).split()))
    model, criterion, _ = build_model(args)
    model.to(args.device).train()
    ema = ModelEMA(model, args.ema_decay, args.ema_warmup_steps) if ema_enabled(args) else None
    args.lr = 1e-4
    return model, criterion, build_optimizer(model.parameters(), args), ema, args.clip_max_norm


def step(model, criterion, optimizer, ema, max_norm, samples, targets, index: int) -> float:
    """One of engine.py's training steps (no logging, no AMP); seconds it took."""
    device = samples.tensors.device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    addons = criterion.addons
    ctx = StepContext(images=samples, targets=targets, epoch=0, step=index, ema=None if ema is None else ema.module)
    for addon in addons:
        if overrides(addon, "before_forward"):
            addon.before_forward(model, ctx)
    out = model(samples, targets, ctx=ctx)  # training mode: the add-ons' query groups run inside the model
    loss = criterion.total_loss(criterion(out, targets, ctx=ctx))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    optimizer.step()
    if ema is not None:
        ema.update(model)
    for addon in addons:
        addon.after_step(model, ctx)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flags", default="--with_box_refine --two_stage", help="flags of the baseline (A)")
    p.add_argument("--addon_flags", default="--use_dn", help="flags added for B")
    p.add_argument("--steps", default=20, type=int)
    p.add_argument("--warmup", default=2, type=int)
    p.add_argument("--batch_size", default=8, type=int)
    p.add_argument("--image_size", default=128, type=int)
    p.add_argument("--image_width", default=None, type=int, help="default: --image_size (square)")
    p.add_argument("--max_objects", default=6, type=int)
    p.add_argument("--threads", default=0, type=int, help="torch threads (0: leave as is)")
    p.add_argument("--model", default=MODEL, help="model size flags shared by A and B (default: the synthetic "
                                                  "benchmark's tiny model)")
    p.add_argument("--json", help="also write the result here")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(get_args_parser().parse_args(args.model.split()).device)
    images, targets = batch(args.batch_size, args.image_size, args.max_objects, width=args.image_width)
    samples = nested_tensor_from_tensor_list(images).to(device)
    targets = [{k: v.to(device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
    runs = {"A": make(args.flags, args.model), "B": make(args.flags + " " + args.addon_flags, args.model)}
    times: dict[str, list[float]] = {"A": [], "B": []}
    for i in range(args.warmup + args.steps):
        for name, parts in runs.items():
            t = step(*parts, samples, targets, i)
            if i >= args.warmup:
                times[name].append(t)
    a, b = statistics.median(times["A"]), statistics.median(times["B"])
    print(f"A: {args.flags!r}  median {a:.4f} s/step")
    print(f"B: A + {args.addon_flags!r}  median {b:.4f} s/step")
    print(f"ratio B/A: {b / a:.3f}  ({args.steps} alternating steps, batch {args.batch_size}, {args.image_size} px)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        result = {"model": args.model, "flags": args.flags, "addon_flags": args.addon_flags, "steps": args.steps,
                  "batch_size": args.batch_size, "image_size": args.image_size, "a_s": a, "b_s": b, "ratio": b / a}
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
