"""Training-step time of this code base against the official Deformable-DETR code, side by side in one run.

    python tools/compare_official_step.py --official ~/src/Deformable-DETR            # the spec's CPU case
    python tools/compare_official_step.py --official ~/src/Deformable-DETR --only r50_320x512 --threads 2
    PYTHONPATH=/tmp/official_op python tools/compare_official_step.py --official .official/Deformable-DETR --device cuda

``--official`` is a checkout of fundamentalvision/Deformable-DETR (nothing of it is copied here: it runs in its own
worker process, from its own directory). On a CPU its compiled CUDA op is replaced by the grid_sample core its
repository ships (``ms_deform_attn_core_pytorch``), its backbone is built without the ImageNet download its
``pretrained=True`` asks for, and its ``util/misc.py`` is shown a torchvision version it can parse; nothing else
of it is touched. On a GPU (``--device cuda``) its op must be built and importable (its ``models/ops/make.sh``, or on
torch 2 ``tools/build_official_op.py`` with the build folder on PYTHONPATH) and is used as is; each step ends with a
read of the loss, so the time is the device's. Configurations: the CPU's by default on a CPU, the GPU's
(R50 two-stage + refine, batch 2 of 800x1333, the official recipe's size) on a GPU.

Three workers per configuration (specs/performance.md §5.1 "model-step-tiny"): the official code, ours with the
pure-PyTorch op (the same grid_sample core: the rest of the step compared), ours with the default op (our C++ or
CUDA kernel). Ours loads the official worker's weights with a strict ``load_state_dict``, so both step the same
model; the batch and its targets are the same. Rounds alternate official, ours, ours, ... so that load from other
processes hits all alike; a round times ``--steps`` training steps (forward, criterion, weighted total, backward,
gradient clipping 0.1, AdamW) after one untimed step. Prints each worker's median seconds per step and the ratios.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tools.compare_step_time import start_worker, timed  # noqa: E402

# name: (flags of both code bases, flags only ours takes, batch, (h, w))
CONFIGS = {
    "r50_320x512": ("--backbone resnet50 --enc_layers 2 --dec_layers 2", "--num_classes 91", 1, (320, 512)),
    "r50_320x512_refine_two_stage": ("--backbone resnet50 --enc_layers 2 --dec_layers 2 --with_box_refine "
                                     "--two_stage", "--num_classes 91", 1, (320, 512)),
    "r50_800x1333_refine_two_stage": ("--backbone resnet50 --with_box_refine --two_stage", "--num_classes 91", 2,
                                      (800, 1333)),
}
DEFAULT_CONFIGS = {"cpu": ["r50_320x512", "r50_320x512_refine_two_stage"], "cuda": ["r50_800x1333_refine_two_stage"]}

# Run first in the official worker on a CPU (see the module docstring).
PRELUDE_CPU = r'''
import sys, types, torch, torchvision
torchvision.__version__ = "1.0"  # its util/misc.py reads float(version[:3]): "0.2" of 0.2x would take old paths
sys.modules.setdefault("MultiScaleDeformableAttention", types.ModuleType("MultiScaleDeformableAttention"))
for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):  # it asks for ImageNet weights: nothing downloads
    _fn = getattr(torchvision.models, _name)
    setattr(torchvision.models, _name, lambda *a, _fn=_fn, pretrained=False, **k: _fn(*a, weights=None, **k))
from models.ops.functions import ms_deform_attn_func as _f
_f.MSDeformAttnFunction.apply = staticmethod(
    lambda value, shapes, starts, locations, weights, step: _f.ms_deform_attn_core_pytorch(value, shapes, locations,
                                                                                           weights))
'''
# On a GPU only the version and the download need patching (its CUDA op is used as built).
PRELUDE_CUDA = r'''
import torchvision
torchvision.__version__ = "1.0"
for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    _fn = getattr(torchvision.models, _name)
    setattr(torchvision.models, _name, lambda *a, _fn=_fn, pretrained=False, **k: _fn(*a, weights=None, **k))
'''


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--official", required=True, type=Path, help="a checkout of fundamentalvision/Deformable-DETR")
    p.add_argument("--only", nargs="*", default=None, choices=list(CONFIGS))
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--rounds", default=5, type=int)
    p.add_argument("--steps", default=3, type=int, help="timed steps per round")
    p.add_argument("--threads", default=0, type=int, help="torch threads of each worker (0: torch's default)")
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args()
    official = args.official.expanduser().resolve()
    if not (official / "models" / "deformable_detr.py").is_file() or not (official / "main.py").is_file():
        print(f"{official}: not a checkout of fundamentalvision/Deformable-DETR (no main.py, "
              f"models/deformable_detr.py)")
        return 2
    prelude = PRELUDE_CPU if args.device == "cpu" else PRELUDE_CUDA
    print("| configuration | official s/step | ours, PyTorch op | ours, default op | official / ours (PyTorch op) | "
          "official / ours (default op) |")
    print("|---|---|---|---|---|---|")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (flags, ours_only, batch, size) in CONFIGS.items():
            if name not in (args.only or DEFAULT_CONFIGS[args.device]):
                continue
            flags = f"{flags} --device {args.device}"
            weights = str(Path(tmp) / f"{name}.pth")
            workers = {
                "official": start_worker(official, flags, batch, size, args.threads,
                                         {"STEP_WORKER_PRELUDE": prelude, "STEP_WORKER_SAVE": weights}),
                "pytorch": start_worker(ROOT, f"{flags} {ours_only} --msda_impl pytorch", batch, size, args.threads,
                                        {"STEP_WORKER_LOAD": weights}),
                "default": start_worker(ROOT, f"{flags} {ours_only}", batch, size, args.threads,
                                        {"STEP_WORKER_LOAD": weights}),
            }
            times: dict[str, list[float]] = {side: [] for side in workers}
            for _ in range(args.rounds):
                for side, proc in workers.items():
                    times[side].append(timed(proc, args.steps))
            for proc in workers.values():
                proc.stdin.close()
                proc.wait()
            t = {side: statistics.median(v) for side, v in times.items()}
            print(f"| {name} | {t['official']:.3f} | {t['pytorch']:.3f} | {t['default']:.3f} | "
                  f"{t['official'] / t['pytorch']:.2f} | {t['official'] / t['default']:.2f} |", flush=True)
            rows.append({"config": name, "flags": flags, "batch": batch, "size": list(size), "device": args.device,
                         "official_s": t["official"], "ours_pytorch_op_s": t["pytorch"], "ours_s": t["default"],
                         "rounds": args.rounds, "steps": args.steps})
    if args.json:
        args.json.write_text(json.dumps({"results": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
