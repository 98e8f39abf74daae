"""Make a teacher-box file for Teach-DETR (``--ensemble --ext_ann_files NAME=FILE``) with any detector checkpoint.

    # run a checkpoint (ours or an official one) over the training split: Teach-DETR's "NMS 0.3, top 50" files
    python tools/generate_teacher_boxes.py --coco_path data/coco --with_box_refine --two_stage \
        --resume exps/r50/checkpoint.pth --output teachers/r50.json
    # several GPUs: each rank writes shards, rank 0 merges them; a killed run continues where it stopped
    GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 python -u tools/generate_teacher_boxes.py ... --output FILE
    # convert a COCO results file of another toolbox (MMDetection --format-only, Detectron2) and back
    python tools/generate_teacher_boxes.py --convert coco_instances_results.json --output teacher.json
    python tools/generate_teacher_boxes.py --convert teacher.json --format coco --output results.json

Takes main.py's model and data flags (the checkpoint's model flags must be given, as for ``--eval``). The split
is read with the evaluation transforms; per image the model's top ``--topk`` detections (main.py's
post-processing, boxes in the pixels of the stored image) go through ``--score_threshold``, class-aware NMS
(``--nms_iou``, 0.3) and the ``--top_n`` (50) best. Shards of ``--shard_size`` images are written atomically to
``OUTPUT.shards/`` (complete shards are skipped when the command is run again, whatever the number of
processes); after all of them, rank 0 writes OUTPUT (format ``released`` by default, or ``coco``) and removes
the shards. Formats: datasets/teacher_boxes.py.
"""
from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torchvision
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
from datasets.coco_eval import labels_to_category_ids  # noqa: E402
from datasets.teacher_boxes import (  # noqa: E402
    FORMATS,
    Detections,
    check_detections,
    describe_dropped,
    read_teacher_file,
    write_teacher_file,
)
from engine import autocast  # noqa: E402
from flags import FlagError, finalize_args, get_args_parser, validate_args  # noqa: E402
from util.misc import collate_fn, get_rank, get_world_size, init_distributed_mode, is_dist_avail_and_initialized  # noqa: E402,E501

logger = logging.getLogger("generate_teacher_boxes")
MANIFEST = "manifest.json"


def build_parser() -> argparse.ArgumentParser:
    """main.py's parser plus this tool's group."""
    parser = get_args_parser()
    g = parser.add_argument_group("teacher boxes (tools/generate_teacher_boxes.py)")
    g.add_argument("--output", required=True, help="teacher file to write")
    g.add_argument("--split", default="train", choices=("train", "val"), help="images to run the model on")
    g.add_argument("--format", default="released", choices=FORMATS,
                   help="released: {image id: [{bbox, category_id, score}]} (Teach-DETR); coco: a COCO results list")
    g.add_argument("--score_threshold", default=0.0, type=float, help="drop detections scoring below this")
    g.add_argument("--nms_iou", default=0.3, type=float, help="class-aware NMS IoU threshold (>= 1: no NMS)")
    g.add_argument("--top_n", default=50, type=int, help="detections kept per image after NMS (0: all)")
    g.add_argument("--shard_size", default=1000, type=int, help="images per shard (restart granularity)")
    g.add_argument("--keep_shards", action="store_true", help="keep OUTPUT.shards/ after the merge")
    g.add_argument("--convert", default=None, metavar="FILE",
                   help="no model: convert FILE (either format) to --output in --format")
    return parser


def select_detections(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, score_threshold: float,
                      nms_iou: float, top_n: int) -> torch.Tensor:
    """Indexes of one image's kept detections, best first: score >= threshold, class-aware NMS, the top N.

    Args:
        boxes: [K, 4] xyxy pixels; scores: [K]; labels: [K] (NMS is done per label).
    """
    keep = torch.nonzero(scores >= score_threshold).flatten()
    if nms_iou < 1.0:
        keep = keep[torchvision.ops.batched_nms(boxes[keep].float(), scores[keep].float(), labels[keep], nms_iou)]
    else:
        keep = keep[torch.argsort(scores[keep], descending=True, stable=True)]
    return keep[:top_n] if top_n > 0 else keep


def _manifest(args: Any, num_images: int) -> dict[str, Any]:
    data = {k: getattr(args, k, None) for k in ("dataset_file", "coco_path", "train_ann_file", "val_ann_file")}
    return {"checkpoint": str(Path(args.resume).resolve()), "split": args.split, "num_images": num_images,
            "shard_size": args.shard_size, "score_threshold": args.score_threshold, "nms_iou": args.nms_iou,
            "top_n": args.top_n, "topk": args.topk, "data": data}


def _check_manifest(shard_dir: Path, manifest: dict[str, Any]) -> None:
    """Shards of another run (other checkpoint, split, thresholds) are never mixed in."""
    path = shard_dir / MANIFEST
    if path.is_file():
        old = json.loads(path.read_text())
        if old != manifest:
            differ = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in manifest.items() if old.get(k) != v]
            raise FlagError(f"{shard_dir} holds shards of another run ({'; '.join(differ)}); delete it or choose "
                            "another --output")
    elif get_rank() == 0:
        shard_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        tmp.replace(path)


def shard_file(shard_dir: Path, k: int) -> Path:
    return shard_dir / f"shard_{k:06d}.npz"


def save_shard(path: Path, parts: list[Detections], image_ids: list[int]) -> None:
    """One shard (its detections and the ids of every image it covers), written atomically."""
    dets = Detections.concat(parts)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, image_ids=dets.image_ids, boxes=dets.boxes, category_ids=dets.category_ids, scores=dets.scores,
                 covered=np.asarray(image_ids, dtype=np.int64))
    tmp.replace(path)


def load_shard(path: Path) -> tuple[Detections, np.ndarray]:
    with np.load(path) as z:
        return Detections(z["image_ids"], z["boxes"], z["category_ids"], z["scores"]), z["covered"]


def _image_detections(result: dict[str, torch.Tensor], image_id: int, args: Any) -> Detections:
    keep = select_detections(result["boxes"], result["scores"], result["labels"], args.score_threshold,
                             args.nms_iou, args.top_n)
    xyxy = result["boxes"][keep].float().cpu()
    xywh = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], dim=1)
    return Detections(np.full(len(keep), image_id, np.int64), xywh.numpy().astype(np.float32),
                      result["labels"][keep].cpu().numpy().astype(np.int64),
                      result["scores"][keep].float().cpu().numpy())


def build_detector(args: Any, dataset: Any, device: torch.device) -> tuple[torch.nn.Module, Any]:
    """The model of the flags with the checkpoint's weights (another model is refused, as main.py --eval does)."""
    from main import load_model_weights
    from models import build_model
    from models.addons import evaluation_model
    from util.checkpoint import load_checkpoint

    ckpt = load_checkpoint(args.resume)
    saved = ckpt.get("args") or {}
    if args.num_classes is None:
        args.num_classes = saved.get("num_classes") or datasets.num_classes_for(
            args, dataset if args.split == "train" else None)
    model, criterion, postprocessors = build_model(args)
    load_model_weights(model, ckpt["model"], args.resume, args, saved)
    del ckpt
    model = evaluation_model(model, criterion.addons).to(device).eval()
    return model, postprocessors["bbox"]


@torch.no_grad()
def run_shards(args: Any, model: torch.nn.Module, postprocess: Any, dataset: Any, shard_dir: Path,
               device: torch.device) -> int:
    """This rank's missing shards (k = rank, rank + world, ...); returns the number of images run."""
    n = len(dataset)
    shards = [k for k in range(get_rank(), -(-n // args.shard_size), get_world_size())
              if not shard_file(shard_dir, k).is_file()]
    # batches never straddle two shards: a shard's detections do not depend on which shards are left to run
    bounds = [(k * args.shard_size, min(n, (k + 1) * args.shard_size)) for k in shards]
    batches = [list(range(i, min(i + args.batch_size, end))) for start, end in bounds
               for i in range(start, end, args.batch_size)]
    total = sum(end - start for start, end in bounds)
    logger.info("generate: %d image(s) of %d to run on this process (%d shard(s) missing)", total, n, len(shards))
    if not total:
        return 0
    loader = DataLoader(dataset, batch_sampler=batches, collate_fn=collate_fn, num_workers=args.num_workers)
    table = datasets.label_category_ids(dataset)
    table = None if table is None else torch.tensor(table, dtype=torch.int64)
    parts: list[Detections] = []
    covered: list[int] = []
    done, start, shard_iter = 0, time.time(), iter(shards)
    current = next(shard_iter)
    for step, (samples, targets) in enumerate(loader):
        with autocast(device, args.amp, args.amp_dtype):
            outputs = model(samples.to(device))
        sizes = torch.stack([t["orig_size"] for t in targets]).to(device)
        for target, result in zip(targets, postprocess(outputs, sizes)):
            if table is not None:
                result = labels_to_category_ids(result, table.to(result["labels"].device))
            image_id = int(target["image_id"])
            parts.append(_image_detections(result, image_id, args))
            covered.append(image_id)
            done += 1
            if len(covered) == min(n, (current + 1) * args.shard_size) - current * args.shard_size:
                save_shard(shard_file(shard_dir, current), parts, covered)
                parts, covered, current = [], [], next(shard_iter, -1)
        if step % max(args.print_freq, 1) == 0 or done == total:
            rate = done / max(time.time() - start, 1e-9)
            eta = datetime.timedelta(seconds=int((total - done) / max(rate, 1e-9)))
            logger.info("generate: %d/%d images, %.1f img/s, eta %s", done, total, rate, eta)
    return done


def merge_shards(shard_dir: Path, num_shards: int, output: Path, fmt: str) -> Detections:
    """Rank 0: every shard -> OUTPUT (an image met twice, e.g. an unreadable one replaced by the next, once)."""
    missing = [k for k in range(num_shards) if not shard_file(shard_dir, k).is_file()]
    if missing:
        raise FileNotFoundError(f"{shard_dir}: shard(s) {missing[:5]} missing after every process finished; run "
                                "the command again to make them")
    parts, seen = [], set()
    for k in range(num_shards):
        dets, covered = load_shard(shard_file(shard_dir, k))
        fresh = np.isin(dets.image_ids, np.array(sorted(seen), dtype=np.int64), invert=True)
        parts.append(dets.take(fresh))
        seen.update(covered.tolist())
    dets = Detections.concat(parts)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_teacher_file(output, dets, fmt)
    logger.info("wrote %s: %d box(es) on %d image(s) of %d (format %s)", output, len(dets),
                len(np.unique(dets.image_ids)), len(seen), fmt)
    return dets


def generate(args: Any) -> Path:
    """Run the checkpoint over the split and write the teacher file (see the module docstring)."""
    from main import check_device

    if not args.resume:
        raise FlagError("--resume CHECKPOINT is required (the detector that makes the teacher boxes)")
    if args.shard_size < 1:
        raise FlagError("--shard_size must be at least 1")
    validate_args(args)
    init_distributed_mode(args)
    check_device(args)
    device = torch.device(args.device)
    # the evaluation transforms on either split, and never teacher boxes of a previous run
    args.train_transforms, args.ext_ann_files, args.ensemble = "val", {}, False
    args.addons = [a for a in (args.addons or []) if a != "teach"]
    dataset = datasets.build_dataset(args.split, args)
    output = Path(args.output)
    shard_dir = output.with_name(output.name + ".shards")
    _check_manifest(shard_dir, _manifest(args, len(dataset)))
    model, postprocess = build_detector(args, dataset, device)
    run_shards(args, model, postprocess, dataset, shard_dir, device)
    if is_dist_avail_and_initialized():
        torch.distributed.barrier()
    if get_rank() == 0:
        merge_shards(shard_dir, -(-len(dataset) // args.shard_size), output, args.format)
        if not args.keep_shards:
            shutil.rmtree(shard_dir, ignore_errors=True)
    if is_dist_avail_and_initialized():
        torch.distributed.barrier()
    return output


def convert(source: str, output: str, fmt: str) -> Detections:
    """Either format -> ``fmt``; malformed, non-finite and degenerate entries are dropped (one log line)."""
    dets, counts = check_detections(read_teacher_file(source))
    write_teacher_file(output, dets, fmt)
    logger.info("converted %s -> %s (%s): %d box(es) on %d image(s); dropped: %s", source, output, fmt, len(dets),
                len(np.unique(dets.image_ids)), describe_dropped(counts))
    return dets


def main(argv: Sequence[str] | None = None) -> None:
    """Command-line entry: mistakes exit as main.py's do (one line, status 2 for flags, 1 for files)."""
    from main import INPUT_ERRORS, _fail
    from util.logger import setup_logging

    args = finalize_args(build_parser().parse_args(argv))
    setup_logging(None, int(os.environ.get("RANK", 0)))
    try:
        if args.convert:
            convert(args.convert, args.output, args.format)
        else:
            generate(args)
    except FlagError as e:
        _fail(str(e), 2)
    except INPUT_ERRORS as e:
        _fail(str(e), 1)


if __name__ == "__main__":
    main()
