"""Co-DETR's RPN proposals: the device NMS (util/nms.py, no host read) against torchvision's NMS image by image,
side by side on the same candidates.

    python tools/benchmark_nms.py --device cuda --json OUT.json
    python tools/benchmark_nms.py --device cpu --cases small --repeats 3      # wiring check

Cases: ``coco`` (batch 2 of 800 x 1333: the memory pyramid's strides 8-128, 9 anchors a location, the top 4000
per level: 4000 + 4000 + 3150 + 819 + 231 candidates) and ``small`` (the benchmark model's batch 8 of 128 px). The
RPN is built with random weights and random maps: the candidates overlap as dense anchors do. Each timing is
the median over ``--repeats`` of one proposal computation for the batch, from the same ``AuxRPN.prepare``
output, ending with one synchronisation (what a step pays at the heads' host copy); the torchvision path also pays
its own host reads inside (one copy of the non-empty boxes, one per image NMS). Also reported: the fixed-point
rounds the device NMS needed on these candidates (against its default) and whether both give the same proposals
(on a GPU torchvision offsets the levels as the device NMS does below 25000 boxes; the CPU's torchvision runs the
levels apart above 1000, whose other rounding may keep a few other boxes).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.addons.co_detr import rcnn_rpn  # noqa: E402
from models.addons.co_detr.rcnn_rpn import AuxRPN  # noqa: E402
from util.nms import segmented_nms  # noqa: E402

STRIDES = (8, 16, 32, 64, 128)
CASES = {"coco": (2, 800, 1333), "small": (8, 128, 128)}


def candidates(case: str, device: torch.device, channels: int = 16) -> tuple[AuxRPN, rcnn_rpn.RPNPass]:
    batch, h, w = CASES[case]
    torch.manual_seed(0)
    rpn = AuxRPN(in_channels=channels, strides=STRIDES).to(device)
    with torch.no_grad():  # spread the objectness so that scores differ as a trained head's do
        rpn.head.cls_logits.weight.normal_(0, 1.0)
        feats = [torch.randn(batch, channels, math.ceil(h / s), math.ceil(w / s), device=device) for s in STRIDES]
        targets = [{"boxes": torch.tensor([[10.0, 10.0, 0.3 * w, 0.4 * h]], device=device)}] * batch
        rp = rpn.prepare(feats, [(h, w)] * batch, targets)
    return rpn, rp


def timed(fn, device: torch.device, repeats: int) -> float:
    times = []
    for _ in range(repeats + 1):  # the first call warms up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del out
    return statistics.median(times[1:])


def measure(case: str, device: torch.device, repeats: int) -> dict:
    rpn, rp = candidates(case, device)
    with torch.no_grad():
        valid = rcnn_rpn.nonempty(rp.boxes)
        needed = next((r for r in range(1, 65) if segmented_nms(rp.boxes, rp.scores, valid, rp.level_sizes,
                                                                 rpn.nms_iou, r)[1]), None)
        default = rpn.nms_rounds
        converged = bool(rpn.device_proposals(rp).converged)
        rpn.nms_rounds = 64
        device_rp, exact_rp = rpn.device_proposals(rp), rpn.exact_proposals(rp)
        same = torch.equal(device_rp.counts, exact_rp.counts) and torch.equal(device_rp.proposals, exact_rp.proposals)
        rpn.nms_rounds = default
        device_s = timed(lambda: rpn.device_proposals(rp), device, repeats)
        exact_s = timed(lambda: rpn.exact_proposals(rp), device, repeats)
    return {"case": case, "batch": CASES[case][0], "candidates": list(rp.level_sizes), "device_ms": device_s * 1e3,
            "torchvision_ms": exact_s * 1e3, "ratio": exact_s / device_s, "rounds_needed": needed,
            "default_rounds": default, "converged_in_default_rounds": converged, "same_proposals": same}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args()
    device = torch.device(args.device)
    rows = [measure(case, device, args.repeats) for case in args.cases]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"| case ({name}) | candidates per image | device NMS ms | torchvision ms | torchvision / device | rounds "
          "needed (default) | same proposals |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} (batch {r['batch']}) | {sum(r['candidates'])} | {r['device_ms']:.2f} | "
              f"{r['torchvision_ms']:.2f} | {r['ratio']:.2f} | {r['rounds_needed']} ({r['default_rounds']}) | "
              f"{r['same_proposals']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "results": rows}, indent=1))


if __name__ == "__main__":
    main()
