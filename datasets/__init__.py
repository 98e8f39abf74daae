"""Data sets: COCO-format detection (pycocotools) and the generated synthetic shapes set.

Public entry points: :func:`build_dataset`, :func:`get_coco_api_from_dataset`,
:func:`num_classes_for` and :func:`add_args`. Only the build functions read ``args``.

Flags read here. From ``main.py`` (official Deformable-DETR names): ``--dataset_file``
(``coco`` or ``synthetic``), ``--coco_path``, ``--cache_mode``. From :func:`add_args`:
``--synthetic_image_size``, ``--synthetic_train_size``, ``--synthetic_val_size`` and, for custom
COCO-format data, ``--train_img_folder``, ``--train_ann_file``, ``--val_img_folder``,
``--val_ann_file`` (each overrides its part of the ``--coco_path`` layout); the input sizes
``--input_scale``, ``--train_scales``, ``--train_max_size``, ``--crop_scales``, ``--crop_size``,
``--val_size``, ``--val_max_size`` (:func:`input_sizes`); ``--contiguous_classes``.

Class ids. By default (official) labels are the raw ``category_id`` and the head has max id + 1
logits. ``--contiguous_classes`` gives label ``i`` to the ``i``-th smallest category id of the
*training* annotation file (its ``categories``, or the ids of its annotations when it lists none):
a pure function of that file, so ``--eval --resume`` with the same data flags maps labels back the
same way without storing anything in the checkpoint. :func:`label_category_ids` returns that table
(label -> file id) for a built data set; ``engine.evaluate`` uses it to report the file's ids.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
from pathlib import Path
from typing import Any, Sequence

import PIL.Image
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset

from .coco import AnnotationError, CocoDetection
from .synthetic import CATEGORIES as SYNTHETIC_CATEGORIES
from .synthetic import NUM_CLASSES as SYNTHETIC_NUM_CLASSES
from .synthetic import SyntheticSpec, ensure_synthetic
from .teacher_boxes import TeacherFileError, teacher_boxes_for_dataset
from .teacher_merge import DEFAULT_TEACHER_WEIGHT, TeacherMerge
from .transforms import VAL_SIZE, InputSizes, get_resize_shape, make_coco_transforms

logger = logging.getLogger(__name__)

__all__ = ["AnnotationError", "CocoDetection", "ContiguousCocoDetection", "InputSizes", "TeacherFileError", "add_args",
           "build_dataset", "get_coco_api_from_dataset", "image_size_report", "input_sizes", "label_category_ids",
           "num_classes_for", "teacher_files", "teacher_merge"]

IMAGE_SETS = ("train", "val")
DEFAULT_COCO_PATH = "./data/coco"
DEFAULT_SYNTHETIC_PATH = "data/synthetic"
COCO_DEFAULT_NUM_CLASSES = 91  # official value when the annotation file cannot be read
UPSAMPLE_HINT = 2.0  # hint at --input_scale when most images would be enlarged more than this
SIZE_SAMPLE = 200  # image headers read when the annotation file lacks width/height


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the data flags that the official Deformable-DETR ``main.py`` does not have."""
    group = parser.add_argument_group("data")
    group.add_argument("--exif_orientation", action="store_true",
                       help="read images as a viewer shows them (EXIF orientation applied; boxes must be in that "
                            "frame); official: the stored pixels")
    group.add_argument("--train_transforms", default="official", choices=("official", "val"),
                       help="'val': train without augmentation (the val resize only)")
    group.add_argument("--synthetic_image_size", type=int, default=128,
                       help="side of the square synthetic images (pixels)")
    group.add_argument("--synthetic_train_size", type=int, default=2000, help="number of synthetic training images")
    group.add_argument("--synthetic_val_size", type=int, default=200, help="number of synthetic validation images")
    for split in IMAGE_SETS:
        group.add_argument(f"--{split}_img_folder", type=str, default=None,
                           help=f"{split} image folder (default: <coco_path>/{split}2017)")
        group.add_argument(f"--{split}_ann_file", type=str, default=None,
                           help=f"{split} annotation file "
                                f"(default: <coco_path>/annotations/instances_{split}2017.json)")
    sizes = parser.add_argument_group("input sizes (default: the official COCO sizes; explicit sizes are pixels and "
                                      "are not multiplied by --input_scale)")
    sizes.add_argument("--input_scale", type=float, default=None,
                       help="multiply every official size by F (train 480..800 cap 1333, crop branch 400/500/600 "
                            "and 384..600, val 800 cap 1333); e.g. 0.16 for 128 px images "
                            "(default 1; synthetic: synthetic_image_size / 800)")
    sizes.add_argument("--train_scales", type=int, nargs="+", default=None, metavar="S",
                       help="shorter sides drawn by the training resize (official 480 512 ... 800)")
    sizes.add_argument("--train_max_size", type=int, default=None, help="cap on the longer side in training (1333)")
    sizes.add_argument("--crop_scales", type=int, nargs="+", default=None, metavar="S",
                       help="shorter sides of the crop branch's first resize (official 400 500 600)")
    sizes.add_argument("--crop_size", type=int, nargs=2, default=None, metavar=("MIN", "MAX"),
                       help="side range of the crop branch's random crop (official 384 600)")
    sizes.add_argument("--val_size", type=int, default=None, help="shorter side at evaluation (official 800)")
    sizes.add_argument("--val_max_size", type=int, default=None, help="cap on the longer side at evaluation (1333)")
    group.add_argument("--contiguous_classes", action="store_true",
                       help="labels 0..C-1 (the training file's sorted category ids) instead of the raw ids, C "
                            "logits; predictions and evaluation use the file's ids")


def input_sizes(args: argparse.Namespace) -> InputSizes:
    """The pipeline sizes of the flags: the official ones times ``--input_scale``, then the explicit ones.

    Without size flags: the official sizes for ``coco``, times ``synthetic_image_size / 800`` for
    ``synthetic``. ``--input_scale`` replaces that factor; each explicit flag sets its own size only.
    """
    scale = getattr(args, "input_scale", None)
    if scale is None:
        scale = args.synthetic_image_size / VAL_SIZE if args.dataset_file == "synthetic" else 1.0
    changes: dict[str, Any] = {}
    for dest in ("train_scales", "crop_scales"):
        if getattr(args, dest, None) is not None:
            changes[dest] = tuple(getattr(args, dest))
    for dest in ("train_max_size", "val_size", "val_max_size"):
        if getattr(args, dest, None) is not None:
            changes[dest] = getattr(args, dest)
    if getattr(args, "crop_size", None) is not None:
        changes["crop_min"], changes["crop_max"] = args.crop_size
    return dataclasses.replace(InputSizes.scaled(scale), **changes)


def _resolve_root(args: argparse.Namespace) -> Path:
    coco_path = getattr(args, "coco_path", None)
    if args.dataset_file == "synthetic":
        # The official --coco_path default points at real COCO; never generate shapes into it.
        return Path(DEFAULT_SYNTHETIC_PATH if coco_path in (None, DEFAULT_COCO_PATH) else coco_path)
    return Path(coco_path or DEFAULT_COCO_PATH)


def _split_paths(image_set: str, args: argparse.Namespace) -> tuple[Path, Path]:
    """(image folder, annotation file) of one split; explicit flags override the --coco_path layout."""
    root = _resolve_root(args)
    img_folder = root / f"{image_set}2017"
    ann_file = root / "annotations" / f"instances_{image_set}2017.json"
    if args.dataset_file == "coco":
        img_folder = Path(getattr(args, f"{image_set}_img_folder", None) or img_folder)
        ann_file = Path(getattr(args, f"{image_set}_ann_file", None) or ann_file)
    return img_folder, ann_file


class ContiguousCocoDetection(CocoDetection):
    """A :class:`CocoDetection` whose target labels are 0..C-1 (``--contiguous_classes``).

    Label ``i`` is ``category_ids[i]`` of the annotation file; ``self.coco`` keeps the file's ids
    (evaluation compares against them). Only the ``labels`` of each item change.

    Args:
        *args: as :class:`CocoDetection`.
        category_ids: the sorted category ids of the training file (label -> category id); None: this
            file's own (its ``categories``, or the ids of its annotations when it lists none).
        **kwargs: as :class:`CocoDetection`.
    """

    def __init__(self, *args: Any, category_ids: Sequence[int] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.category_ids = sorted(int(c) for c in (self.coco.cats if category_ids is None else category_ids))
        self._label_of = {c: i for i, c in enumerate(self.category_ids)}
        unknown = sorted({a["category_id"] for a in self.coco.anns.values()} - set(self._label_of))
        if unknown:
            raise ValueError(f"--contiguous_classes: {self.ann_file} has annotations of category id(s) "
                             f"{unknown[:10]} that the training annotation file does not list")

    def __getitem__(self, idx: int) -> tuple[Any, dict[str, Any]]:
        image, target = super().__getitem__(idx)
        labels = [self._label_of[int(c)] for c in target["labels"]]
        return image, {**target, "labels": torch.tensor(labels, dtype=torch.int64).reshape(-1)}


def label_category_ids(dataset: Any) -> list[int] | None:
    """Label -> category id table of a data set built with ``--contiguous_classes``, else None.

    ``Subset`` and ``SeededDataset`` wrappers (anything with a ``.dataset``) are unwrapped.
    """
    while dataset is not None and not isinstance(dataset, CocoDetection):
        dataset = getattr(dataset, "dataset", None)
    return list(dataset.category_ids) if isinstance(dataset, ContiguousCocoDetection) else None


def _contiguous_ids(image_set: str, args: argparse.Namespace) -> list[int] | None:
    """The training file's sorted category ids; None for the training split itself (it reads its own) or when
    the training file is not readable (the split's own ids are used then, with a warning)."""
    if image_set == "train":
        return None
    _, train_ann = _split_paths("train", args)
    ids = _category_ids(train_ann)
    if ids is None:
        logger.warning("--contiguous_classes: %s not readable; the %s file's own category ids give the labels "
                       "(they must be the training file's for a trained model)", train_ann, image_set)
    return ids


def build_dataset(image_set: str, args: argparse.Namespace) -> Dataset:
    """Build the ``train`` or ``val`` split of ``args.dataset_file``.

    ``coco`` reads ``<coco_path>/{train,val}2017`` and ``annotations/instances_{train,val}2017.json``
    (or the explicit folder/file flags) with the official transforms. ``synthetic`` first generates
    the set under ``--coco_path`` (default ``data/synthetic``) when it is missing or was made with
    other parameters, and uses the official transforms scaled by ``synthetic_image_size / 800``.
    The size flags change the transforms' sizes (:func:`input_sizes`); ``--contiguous_classes``
    gives a :class:`ContiguousCocoDetection`. The image sizes of the training split (of the val
    split with ``--eval``) are logged once, with a hint when most images would be enlarged > 2x.
    With the teach add-on on and ``--ext_ann_files`` given, the training split's targets carry the teacher
    boxes (``ext_boxes``, ``ext_labels``, ``ext_scores``, ``ext_teacher``; datasets/teacher_boxes.py), merged
    per image before the transforms as the released code does (``--ensemble_mode merged``, the default;
    datasets/teacher_merge.py) or every teacher's own (``parallel``).

    Args:
        image_set: "train" or "val".
        args: parsed flags (see the module docstring).

    Returns:
        A :class:`CocoDetection` whose items are ``(image [3, H, W], target)``, boxes normalised cxcywh.
    """
    if image_set not in IMAGE_SETS:
        raise ValueError(f"unknown image_set {image_set!r}; expected one of {IMAGE_SETS}")
    if args.dataset_file not in ("coco", "synthetic"):
        raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; expected 'coco' or 'synthetic'")
    cache_mode = bool(getattr(args, "cache_mode", False))
    # --train_transforms val: no augmentation in training (overfitting checks, exact equivalence tests).
    transform_set = "val" if getattr(args, "train_transforms", "official") == "val" else image_set
    if args.dataset_file == "synthetic":
        explicit = [f"--{s}_{k}" for s in IMAGE_SETS for k in ("img_folder", "ann_file")
                    if getattr(args, f"{s}_{k}", None)]
        if explicit:
            logger.warning("%s apply to --dataset_file coco only; ignored for the synthetic set", ", ".join(explicit))
        spec = SyntheticSpec(image_size=args.synthetic_image_size, train_size=args.synthetic_train_size,
                             val_size=args.synthetic_val_size)
        ensure_synthetic(_resolve_root(args), spec)
    img_folder, ann_file = _split_paths(image_set, args)
    sizes = input_sizes(args)
    transforms = make_coco_transforms(transform_set, sizes=sizes)
    if getattr(args, "contiguous_classes", False):
        dataset: CocoDetection = ContiguousCocoDetection(img_folder, ann_file, transforms=transforms,
                                                         cache_mode=cache_mode,
                                                         category_ids=_contiguous_ids(image_set, args),
                                                         exif_orientation=getattr(args, "exif_orientation", False))
    else:
        dataset = CocoDetection(img_folder, ann_file, transforms=transforms, cache_mode=cache_mode,
                                exif_orientation=getattr(args, "exif_orientation", False))
    if image_set == "train" or getattr(args, "eval", False):
        lines, hint = image_size_report(dataset, sizes)
        for line in [f"input sizes {sizes.describe()}", *lines]:
            logger.info("%s images: %s", image_set, line)
        if hint:
            logger.warning("%s images: %s", image_set, hint)
    files = teacher_files(args)
    if image_set == "train" and files:  # Teach-DETR: the training split only; validation never carries them
        dataset.extra_box_sets = teacher_boxes_for_dataset(files, dataset, teacher_merge(args, files))
    return dataset


def teacher_files(args: argparse.Namespace) -> dict[str, str]:
    """Teacher name -> file of ``--ext_ann_files`` when the teach add-on is on (``--ensemble`` or ``--addons
    teach``), else {} (the flags are the add-on's; see datasets/teacher_boxes.py)."""
    files = dict(getattr(args, "ext_ann_files", None) or {})
    enabled = bool(getattr(args, "ensemble", False)) or "teach" in (getattr(args, "addons", None) or [])
    return files if enabled else {}


def teacher_merge(args: argparse.Namespace, files: dict[str, str]) -> TeacherMerge | None:
    """The data-path merge of the teachers (``--ensemble_mode merged``): weights ``--ext_ann_weights`` in
    ``files``' order (missing: 0.5), the whole-image box unless ``--ensemble_no_dummy``; None in parallel mode."""
    if getattr(args, "ensemble_mode", "merged") == "parallel":
        return None
    given = getattr(args, "ext_ann_weights", None) or {}
    return TeacherMerge(tuple(float(given.get(name, DEFAULT_TEACHER_WEIGHT)) for name in files),
                        dummy=not getattr(args, "ensemble_no_dummy", False))


def image_size_report(dataset: CocoDetection, sizes: InputSizes) -> tuple[list[str], str | None]:
    """Image size statistics of a data set and a hint when ``sizes`` would enlarge most images > 2x.

    Sizes come from the annotation file's ``width``/``height``; for images without them, up to
    200 image headers are read (no decoding). The enlargement is that of the val resize
    (``sizes.val_size``, capped by ``sizes.val_max_size``), the largest training scale officially.

    Returns:
        (log lines, hint or None); the hint names ``--input_scale`` with a suggested value.
    """
    shapes, missing = [], []
    for image_id in dataset.ids:
        info = dataset.coco.imgs[image_id]
        if isinstance(info.get("width"), (int, float)) and isinstance(info.get("height"), (int, float)):
            shapes.append((int(info["width"]), int(info["height"])))
        else:
            missing.append(info)
    step = max(1, len(missing) // SIZE_SAMPLE)
    for info in missing[::step][:SIZE_SAMPLE]:
        try:
            with PIL.Image.open(dataset.img_folder / info["file_name"]) as img:
                shapes.append(img.size)
        except (OSError, ValueError, SyntaxError):
            continue
    shapes = [(w, h) for w, h in shapes if w > 0 and h > 0]
    if not shapes:
        return ["no image size known (no width/height in the annotation file, no readable image)"], None
    short = [min(w, h) for w, h in shapes]
    long = [max(w, h) for w, h in shapes]
    factors = [min(get_resize_shape(s, sizes.val_size, sizes.val_max_size)) / min(s) for s in shapes]
    sampled = f" ({len(shapes)} sampled)" if len(shapes) < len(dataset.ids) else ""
    lines = [f"{len(dataset.ids)}{sampled}, shorter side min/median/max {min(short)}/{statistics.median(short):g}/"
             f"{max(short)} px, longer side {min(long)}/{statistics.median(long):g}/{max(long)} px; the val resize "
             f"({sizes.val_size}, cap {sizes.val_max_size}) scales the median image by "
             f"{statistics.median(factors):.2f}x"]
    enlarged = sum(f > UPSAMPLE_HINT for f in factors)
    if enlarged * 2 <= len(factors):
        return lines, None
    suggestion = statistics.median(short) / VAL_SIZE
    hint = (f"{enlarged} of {len(factors)} images would be upsampled more than {UPSAMPLE_HINT:g}x (val shorter side "
            f"{sizes.val_size}, cap {sizes.val_max_size}), which costs time and memory for no detail: pass "
            f"--input_scale {suggestion:.2g} (median shorter side {statistics.median(short):g} px / {VAL_SIZE}), or "
            f"set --train_scales/--train_max_size/--crop_scales/--crop_size/--val_size/--val_max_size")
    return lines, hint


def get_coco_api_from_dataset(dataset: Dataset) -> COCO:
    """The pycocotools ground-truth index behind a data set (``Subset`` wrappers are unwrapped)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not hasattr(dataset, "coco"):
        raise TypeError(f"{type(dataset).__name__} has no COCO ground truth (expected a CocoDetection)")
    return dataset.coco


def _category_ids(ann_file: Path) -> list[int] | None:
    """Sorted category ids of a file: its ``categories``, else the ids its annotations use; None if unreadable."""
    try:
        with open(ann_file, "rb") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    ids = [c.get("id") for c in data.get("categories") or [] if isinstance(c, dict)]
    if not ids:
        ids = [a.get("category_id") for a in data.get("annotations") or [] if isinstance(a, dict)]
    ids = sorted({i for i in ids if isinstance(i, int)})
    return ids or None


def _max_category_id(ann_file: Path) -> int | None:
    ids = _category_ids(ann_file)
    return max(ids) if ids else None


def num_classes_for(args: argparse.Namespace, dataset: Any = None) -> int:
    """Size of the class head: max category id + 1 (raw category ids are kept as labels), or with
    ``--contiguous_classes`` the number of category ids C (labels 0..C-1).

    For ``coco`` this reads the training annotation file (COCO gives 91); when it is absent or
    unreadable the official default 91 is used (with ``--contiguous_classes``: the val file's count
    first). Pass the already built training ``dataset`` to avoid reading the file a second time.
    ``synthetic`` gives 6 (ids 1..5), or 5 with ``--contiguous_classes``.

    Args:
        args: parsed flags.
        dataset: optional built data set (possibly a Subset) whose categories to use.

    Returns:
        The number of class logits.
    """
    contiguous = bool(getattr(args, "contiguous_classes", False))
    if args.dataset_file == "synthetic":
        return len(SYNTHETIC_CATEGORIES) if contiguous else SYNTHETIC_NUM_CLASSES
    if dataset is not None:
        table = label_category_ids(dataset)
        if contiguous and table is not None:
            return max(len(table), 1)
        category_ids = get_coco_api_from_dataset(dataset).cats.keys()
        return max(category_ids) + 1 if category_ids else COCO_DEFAULT_NUM_CLASSES
    if args.dataset_file != "coco":
        raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; expected 'coco' or 'synthetic'")
    _, ann_file = _split_paths("train", args)
    if contiguous:
        ids = _category_ids(ann_file) or _category_ids(_split_paths("val", args)[1])
        if ids:
            return len(ids)
    max_id = _max_category_id(ann_file)
    if max_id is None:
        logger.info("%s not readable; using the official COCO class count %d", ann_file, COCO_DEFAULT_NUM_CLASSES)
        return COCO_DEFAULT_NUM_CLASSES
    return max_id + 1
