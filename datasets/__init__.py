"""Data sets: COCO-format detection (pycocotools) and the generated synthetic shapes set.

Public entry points: :func:`build_dataset`, :func:`get_coco_api_from_dataset`,
:func:`num_classes_for` and :func:`add_args`. Only the build functions read ``args``.

Flags read here. From ``main.py`` (official Deformable-DETR names): ``--dataset_file``
(``coco`` or ``synthetic``), ``--coco_path``, ``--cache_mode``. From :func:`add_args`:
``--synthetic_image_size``, ``--synthetic_train_size``, ``--synthetic_val_size`` and, for custom
COCO-format data, ``--train_img_folder``, ``--train_ann_file``, ``--val_img_folder``,
``--val_ann_file`` (each overrides its part of the ``--coco_path`` layout).
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

from pycocotools.coco import COCO
from torch.utils.data import Dataset, Subset

from .coco import AnnotationError, CocoDetection
from .synthetic import NUM_CLASSES as SYNTHETIC_NUM_CLASSES
from .synthetic import SyntheticSpec, ensure_synthetic
from .transforms import VAL_SIZE, make_coco_transforms

logger = logging.getLogger(__name__)

__all__ = ["AnnotationError", "CocoDetection", "add_args", "build_dataset", "get_coco_api_from_dataset",
           "num_classes_for"]

IMAGE_SETS = ("train", "val")
DEFAULT_COCO_PATH = "./data/coco"
DEFAULT_SYNTHETIC_PATH = "data/synthetic"
COCO_DEFAULT_NUM_CLASSES = 91  # official value when the annotation file cannot be read


def add_args(parser: argparse.ArgumentParser) -> None:
    """Add the data flags that the official Deformable-DETR ``main.py`` does not have."""
    group = parser.add_argument_group("data")
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


def build_dataset(image_set: str, args: argparse.Namespace) -> Dataset:
    """Build the ``train`` or ``val`` split of ``args.dataset_file``.

    ``coco`` reads ``<coco_path>/{train,val}2017`` and ``annotations/instances_{train,val}2017.json``
    (or the explicit folder/file flags) with the official transforms. ``synthetic`` first generates
    the set under ``--coco_path`` (default ``data/synthetic``) when it is missing or was made with
    other parameters, and uses the official transforms scaled by ``synthetic_image_size / 800``.

    Args:
        image_set: "train" or "val".
        args: parsed flags (see the module docstring).

    Returns:
        A :class:`CocoDetection` whose items are ``(image [3, H, W], target)``, boxes normalised cxcywh.
    """
    if image_set not in IMAGE_SETS:
        raise ValueError(f"unknown image_set {image_set!r}; expected one of {IMAGE_SETS}")
    cache_mode = bool(getattr(args, "cache_mode", False))
    # --train_transforms val: no augmentation in training (overfitting checks, exact equivalence tests).
    transform_set = "val" if getattr(args, "train_transforms", "official") == "val" else image_set
    if args.dataset_file == "coco":
        img_folder, ann_file = _split_paths(image_set, args)
        return CocoDetection(img_folder, ann_file, transforms=make_coco_transforms(transform_set),
                             cache_mode=cache_mode)
    if args.dataset_file == "synthetic":
        explicit = [f"--{s}_{k}" for s in IMAGE_SETS for k in ("img_folder", "ann_file")
                    if getattr(args, f"{s}_{k}", None)]
        if explicit:
            logger.warning("%s apply to --dataset_file coco only; ignored for the synthetic set", ", ".join(explicit))
        spec = SyntheticSpec(image_size=args.synthetic_image_size, train_size=args.synthetic_train_size,
                             val_size=args.synthetic_val_size)
        ensure_synthetic(_resolve_root(args), spec)
        img_folder, ann_file = _split_paths(image_set, args)
        # The official pipeline at the synthetic image size: val resizes to the image size itself.
        transforms = make_coco_transforms(transform_set, scale=spec.image_size / VAL_SIZE)
        return CocoDetection(img_folder, ann_file, transforms=transforms, cache_mode=cache_mode)
    raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; expected 'coco' or 'synthetic'")


def get_coco_api_from_dataset(dataset: Dataset) -> COCO:
    """The pycocotools ground-truth index behind a data set (``Subset`` wrappers are unwrapped)."""
    while isinstance(dataset, Subset):
        dataset = dataset.dataset
    if not hasattr(dataset, "coco"):
        raise TypeError(f"{type(dataset).__name__} has no COCO ground truth (expected a CocoDetection)")
    return dataset.coco


def _max_category_id(ann_file: Path) -> int | None:
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
    ids = [i for i in ids if isinstance(i, int)]
    return max(ids) if ids else None


def num_classes_for(args: argparse.Namespace, dataset: Any = None) -> int:
    """Size of the class head: max category id + 1 (raw category ids are kept as labels).

    For ``coco`` this reads the training annotation file (COCO gives 91); when it is absent or
    unreadable the official default 91 is used. Pass the already built training ``dataset`` to
    avoid reading the file a second time. ``synthetic`` gives 6 (ids 1..5).

    Args:
        args: parsed flags.
        dataset: optional built data set (possibly a Subset) whose categories to use.

    Returns:
        The number of class logits.
    """
    if args.dataset_file == "synthetic":
        return SYNTHETIC_NUM_CLASSES
    if dataset is not None:
        category_ids = get_coco_api_from_dataset(dataset).cats.keys()
        return max(category_ids) + 1 if category_ids else COCO_DEFAULT_NUM_CLASSES
    if args.dataset_file != "coco":
        raise ValueError(f"unknown --dataset_file {args.dataset_file!r}; expected 'coco' or 'synthetic'")
    _, ann_file = _split_paths("train", args)
    max_id = _max_category_id(ann_file)
    if max_id is None:
        logger.info("%s not readable; using the official COCO class count %d", ann_file, COCO_DEFAULT_NUM_CLASSES)
        return COCO_DEFAULT_NUM_CLASSES
    return max_id + 1
