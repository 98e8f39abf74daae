"""A look at a COCO-format data set before training: counts per split and a picture of what the model sees.

    python tools/inspect_dataset.py --train_img_folder data/parts/train --train_ann_file data/parts/train.json \
        --val_img_folder data/parts/val --val_ann_file data/parts/val.json --input_scale 0.16 --output parts.png

Takes the data flags of ``main.py`` (``--dataset_file``, ``--coco_path``, the folder/file flags, the input size
flags, ``--contiguous_classes``). Prints, per split: images (and how many have no box), image sizes and the
enlargement the input sizes give them (with the ``--input_scale`` hint), boxes per image, a class histogram, box
sizes in COCO terms (small < 32², medium < 96², large; by the annotation ``area``, as COCO evaluation counts them,
and again at the val resize) and the skipped entries with the reason. Then draws ``--num_images`` training images
after the training transforms (the augmentation of epoch 0, as training draws it) with their boxes and class names
into ``--output``; all tiles share one pixel scale, so their sizes compare.
"""
from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

import PIL.Image
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import datasets  # noqa: E402
from datasets.coco import IMAGE_READ_ERRORS, CocoDetection  # noqa: E402
from datasets.seeded import SeededDataset  # noqa: E402
from datasets.transforms import InputSizes, get_resize_shape  # noqa: E402
from flags import finalize_args, flag_problems, get_args_parser  # noqa: E402
from tools.visualize import MEAN, PALETTE, STD  # noqa: E402
from util.box_ops import box_cxcywh_to_xyxy  # noqa: E402

SMALL, MEDIUM = 32 ** 2, 96 ** 2  # COCO evaluation's area ranges
PER_IMAGE_BINS = ((0, 0), (1, 1), (2, 3), (4, 7), (8, 15), (16, 31), (32, 63), (64, None))


class _Collect(logging.Handler):
    """Keeps the warnings the data set's loader logs (dropped and clamped annotations)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def build_split(split: str, args: argparse.Namespace) -> tuple[CocoDetection | None, list[str]]:
    """The split as ``main.py`` builds it, and the loader's warnings (or the error that stopped it)."""
    handler = _Collect()
    data_logger = logging.getLogger("datasets")  # datasets.coco's records propagate to it
    data_logger.addHandler(handler)
    try:
        return datasets.build_dataset(split, args), handler.messages
    except (OSError, ValueError) as err:
        return None, handler.messages + [f"not available: {type(err).__name__}: {err}"]
    finally:
        data_logger.removeHandler(handler)


def _size_classes(areas: Sequence[float]) -> str:
    counts = (sum(a < SMALL for a in areas), sum(SMALL <= a < MEDIUM for a in areas), sum(a >= MEDIUM for a in areas))
    total = max(len(areas), 1)
    return ", ".join(f"{name} {n} ({100 * n / total:.0f}%)" for name, n in zip(("small", "medium", "large"), counts))


def _per_image_histogram(counts: Sequence[int]) -> str:
    parts = []
    for low, high in PER_IMAGE_BINS:
        n = sum(low <= c and (high is None or c <= high) for c in counts)
        if n:
            parts.append(f"{low if low == high else f'{low}+' if high is None else f'{low}-{high}'}: {n}")
    return ", ".join(parts)


def split_report(dataset: CocoDetection, sizes: InputSizes, check_images: bool = False) -> list[str]:
    """Text lines describing one built split (counts, sizes, classes, skipped entries)."""
    coco = dataset.coco
    anns = [a for a in coco.anns.values() if not a.get("iscrowd", 0)]
    crowd = len(coco.anns) - len(anns)
    per_image = Counter(a["image_id"] for a in anns)
    counts = [per_image.get(i, 0) for i in dataset.ids]
    size_lines, hint = datasets.image_size_report(dataset, sizes)
    lines = [f"images: {len(dataset.ids)} ({counts.count(0)} without boxes, kept as negatives)",
             *(f"image sizes: {s}" for s in size_lines), *([f"HINT: {hint}"] if hint else []),
             f"boxes: {len(anns)}; per image mean {len(anns) / max(len(counts), 1):.2f}, median "
             f"{statistics.median(counts) if counts else 0:g}, max {max(counts, default=0)}; "
             f"histogram {_per_image_histogram(counts)}"]
    table = datasets.label_category_ids(dataset)
    label_of = {c: i for i, c in enumerate(table)} if table is not None else None
    boxes_of, images_of = Counter(a["category_id"] for a in anns), Counter()
    for _, cat in {(a["image_id"], a["category_id"]) for a in anns}:
        images_of[cat] += 1
    lines.append(f"classes: {len(coco.cats)} (labels {'0..C-1, --contiguous_classes' if table else 'raw ids'})")
    top = max(boxes_of.values(), default=1)
    for cat_id in sorted(coco.cats):
        label = f"label {label_of[cat_id]:>3} " if label_of is not None and cat_id in label_of else ""
        n = boxes_of.get(cat_id, 0)
        lines.append(f"  {label}id {cat_id:>5} {str(coco.cats[cat_id].get('name', cat_id))[:20]:<20} {n:>7} boxes "
                     f"in {images_of.get(cat_id, 0):>6} images {'#' * round(30 * n / top)}")
    lines.append(f"box sizes (COCO terms, annotation area): {_size_classes([a['area'] for a in anns])}")
    resized = []
    for a in anns:
        info = coco.imgs[a["image_id"]]
        if info.get("width") and info.get("height"):
            out_h, _ = get_resize_shape((info["width"], info["height"]), sizes.val_size, sizes.val_max_size)
            resized.append(a["area"] * (out_h / info["height"]) ** 2)
    if resized:
        lines.append(f"box sizes at the val resize ({sizes.val_size}, cap {sizes.val_max_size}): "
                     f"{_size_classes(resized)}")
    lines += _skipped(dataset, crowd, check_images)
    return lines


def _skipped(dataset: CocoDetection, crowd: int, check_images: bool) -> list[str]:
    """Entries training will not see, and why (annotation drops are the loader's warnings, added by the caller)."""
    lines = []
    if crowd:
        lines.append(f"skipped: {crowd} crowd annotation(s) (iscrowd=1): not trained on, ignore regions in evaluation")
    missing, unreadable = [], []
    for image_id in dataset.ids:
        path = dataset.img_folder / dataset.coco.imgs[image_id]["file_name"]
        if not path.is_file():
            missing.append(path)
        elif check_images:
            try:
                with PIL.Image.open(path) as img:
                    img.convert("RGB")  # the full decode, as the loader does
            except IMAGE_READ_ERRORS:
                unreadable.append(path)
    for what, paths in (("missing on disk", missing), ("not decodable", unreadable)):
        if paths:
            lines.append(f"skipped: {len(paths)} image(s) {what} (training reads the next image instead), e.g. "
                         f"{paths[0]}")
    return lines


def draw_grid(dataset: Any, indices: Sequence[int], names: dict[int, str], output: Path, sizes: InputSizes,
              cols: int = 4) -> None:
    """Training images after the transforms with their boxes, one tile each, on one common pixel scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    table = datasets.label_category_ids(dataset)
    items = [dataset[i] for i in indices]
    max_h = max(int(t["size"][0]) for _, t in items)
    max_w = max(int(t["size"][1]) for _, t in items)
    rows = (len(items) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows * max_h / max_w + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (image, target) in zip(axes.flat, items):
        h, w = (int(x) for x in target["size"])
        ax.imshow((image * STD + MEAN).clamp(0, 1).permute(1, 2, 0).numpy(), extent=(0, w, h, 0))
        ax.set_xlim(0, max_w)
        ax.set_ylim(max_h, 0)
        boxes = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h])
        for (x0, y0, x1, y1), label in zip(boxes.tolist(), target["labels"].tolist()):
            cat = table[label] if table is not None else label
            colour = tuple(c / 255 for c in PALETTE[cat % len(PALETTE)])
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=colour, linewidth=1.5))
            ax.text(x0, y0, names.get(cat, str(cat)), color="white", fontsize=6, va="bottom",
                    bbox={"facecolor": colour, "pad": 0.5, "linewidth": 0})
        ax.set_title(f"image {int(target['image_id'])}: {w}x{h} px, {len(boxes)} boxes", fontsize=8)
    fig.suptitle(f"training transforms: {sizes.describe()}", fontsize=9)
    fig.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> list[str]:
    """Print the report, write the PNG; returns the printed lines."""
    parser = get_args_parser()
    group = parser.add_argument_group("inspect_dataset")
    group.add_argument("--output", default="dataset.png", help="PNG grid of training images after the transforms")
    group.add_argument("--num_images", default=12, type=int, help="images in the grid")
    group.add_argument("--grid_cols", default=4, type=int)
    group.add_argument("--check_images", action="store_true", help="also decode every image (slow)")
    args = finalize_args(parser.parse_args(argv))
    problems = flag_problems(args)
    if args.num_images < 1 or args.grid_cols < 1:
        problems.append("--num_images and --grid_cols must be >= 1")
    if problems:
        parser.error("; ".join(problems))
    sizes = datasets.input_sizes(args)
    out = [f"input sizes: {sizes.describe()}"]
    built = {}
    for split in ("train", "val"):
        dataset, messages = build_split(split, args)
        out.append(f"== {split}" + (f": {dataset.ann_file} (images under {dataset.img_folder})" if dataset else ""))
        out += [f"skipped: {m}" if dataset else m for m in messages if "upsampled more than" not in m]
        if dataset is not None:
            built[split] = dataset
            out += split_report(dataset, sizes, args.check_images)
    print("\n".join(out))
    shown = built["train"] if "train" in built else built.get("val")
    if shown is None:
        raise SystemExit("no split could be built; see the messages above")
    indices = random.Random(args.seed).sample(range(len(shown)), min(args.num_images, len(shown)))
    names = {c: str(info.get("name", c)) for c, info in shown.coco.cats.items()}
    draw_grid(SeededDataset(shown, args.seed), indices, names, Path(args.output), sizes, args.grid_cols)
    out.append(f"wrote {args.output}: {len(indices)} {'training' if 'train' in built else 'val'} images after the "
               "transforms, with their boxes")
    print(out[-1])
    return out


if __name__ == "__main__":
    main()
