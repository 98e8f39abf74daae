"""Train a list of configurations for the same budget on the synthetic set; print a COCO AP table.

    bash scripts/synthetic_benchmark.sh                 # every row of scripts/synthetic_benchmark.txt
    bash scripts/synthetic_benchmark.sh --only deformable_detr +dn

Every row shares the same data, seed, model size and schedule (``COMMON``); a row only adds its own
flags. Step time is the mean training iteration time minus data waiting; ratios are against the first
row that ran. Results go to <out>/<name>/log.txt and a markdown table to <out>/results.md (and every row's
figures to <out>/results.json). A row that keeps an EMA (``--use_ema`` or an add-on that needs one) also reports
the EMA model's AP; a row with ``--log_instability N`` reports the matching instability of each epoch (model and
EMA) in results.json and its mean over the run in the table.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COMMON = ("--dataset_file synthetic --coco_path data/synthetic --synthetic_image_size 128 "
          "--synthetic_train_size 2000 --synthetic_val_size 200 "
          "--backbone resnet18 --backbone_from_scratch --hidden_dim 64 --nheads 8 --enc_layers 2 --dec_layers 3 "
          "--dim_feedforward 256 --num_queries 30 --lr 4e-4 --lr_backbone 4e-4 --batch_size 8 "
          "--device cpu --num_workers 1 --seed 42 --print_freq 100")


def read_rows(path: Path) -> list[tuple[str, str]]:
    rows = []
    for line in path.read_text().splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, flags = line.partition("|")
        rows.append((name.strip(), flags.strip()))
    return rows


def run_row(name: str, flags: str, out: Path, budget: str, extra: str) -> dict:
    row_dir = out / name
    cmd = [sys.executable, str(ROOT / "main.py"), *COMMON.split(), *budget.split(), *flags.split(), *extra.split(),
           "--output_dir", str(row_dir), "--overwrite"]  # a fresh run, not a resumed one
    start = time.time()
    with (out / f"{name}.out").open("w") as log:
        subprocess.run(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, check=True)
    entries = [json.loads(line) for line in (row_dir / "log.txt").read_text().splitlines()]
    last = entries[-1]
    step = sum(e["train_iter_time"] - e["train_data_time"] for e in entries) / len(entries)
    ap = last["test_coco_eval_bbox"]
    row = {"name": name, "flags": flags, "AP": ap[0], "AP50": ap[1], "AP75": ap[2], "step_s": step,
           "minutes": (time.time() - start) / 60}
    if "test_ema_coco_eval_bbox" in last:
        ema = last["test_ema_coco_eval_bbox"]
        row.update(EMA_AP=ema[0], EMA_AP50=ema[1], EMA_AP75=ema[2])
    for key in ("instability", "instability_ema"):  # absent in the first epoch (nothing to compare with)
        curve = [e[key] for e in entries if key in e]
        if curve:
            row[key] = curve
    return row


def mean_text(row: dict, key: str) -> str:
    curve = row.get(key)
    return "" if not curve else f"{sum(curve) / len(curve):.3f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=str(ROOT / "scripts" / "synthetic_benchmark.txt"))
    p.add_argument("--only", nargs="*", default=None, help="row names to run (default: all)")
    p.add_argument("--budget", default="--epochs 6 --lr_drop 5", help="schedule shared by every row")
    p.add_argument("--extra", default="", help="flags added to every row (e.g. --msda_impl pytorch)")
    p.add_argument("--out", default=str(ROOT / "outputs" / "synthetic_benchmark"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [r for r in read_rows(Path(args.configs)) if args.only is None or r[0] in args.only]
    results = []
    for name, flags in rows:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {flags or '(baseline)'}", flush=True)
        results.append(run_row(name, flags, out, args.budget, args.extra))
    base = results[0]["step_s"] if results else 1.0
    lines = [f"Budget: {args.budget}; common flags: {COMMON} {args.extra}".rstrip(), "",
             "| config | flags | AP | AP50 | AP75 | s/step | step ratio | EMA AP / AP50 / AP75 | instability "
             "(mean; EMA) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ema = "" if "EMA_AP" not in r else f"{r['EMA_AP']:.3f} / {r['EMA_AP50']:.3f} / {r['EMA_AP75']:.3f}"
        inst = "; ".join(t for t in (mean_text(r, "instability"), mean_text(r, "instability_ema")) if t)
        lines.append(f"| {r['name']} | `{r['flags']}` | {r['AP']:.3f} | {r['AP50']:.3f} | {r['AP75']:.3f} | "
                     f"{r['step_s']:.3f} | {r['step_s'] / base:.2f} | {ema} | {inst} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table)


if __name__ == "__main__":
    main()
