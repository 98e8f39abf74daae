"""COCO-format detection data set read with pycocotools, with checked and cleaned annotations.

Targets follow fundamentalvision/Deformable-DETR ``datasets/coco.py`` (``ConvertCocoPolysToMask``):
crowd annotations are skipped, boxes are clamped to the image and kept only when x1 > x0 and
y1 > y0, labels are the raw ``category_id``. Written anew; the checks below are this project's.

What is checked, and when:

* when the data set is built, the annotation file must be JSON with ``images`` and
  ``annotations`` whose entries carry the required fields, else :class:`AnnotationError` (naming
  the file) is raised; boxes with zero or negative size, boxes wholly outside their image,
  unknown category ids and annotations of unknown images are dropped; boxes reaching outside
  their image are clamped; each kind is counted and logged once per file with an example id;
* when an item is read, an image that is missing or cannot be decoded is logged (file and
  error) and replaced by the next readable image, with a running count of skips in the log.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import PIL.Image
import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

logger = logging.getLogger(__name__)

REQUIRED_IMAGE_FIELDS = ("id", "file_name")
REQUIRED_ANNOTATION_FIELDS = ("id", "image_id", "bbox", "category_id")
# Errors PIL raises for missing, truncated or undecodable files.
IMAGE_READ_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)

_DROP_MESSAGES = {
    "degenerate": "dropped {n} annotation(s) whose box has zero or negative width/height",
    "outside": "dropped {n} annotation(s) whose box lies wholly outside its image",
    "unknown_category": "dropped {n} annotation(s) with a category_id not listed in 'categories'",
    "unknown_image": "dropped {n} annotation(s) whose image_id is not listed in 'images'",
    "clamped": "clamped {n} box(es) reaching outside their image",
}


class AnnotationError(ValueError):
    """An annotation file that cannot be used: not JSON, missing keys, or entries lacking fields."""


def read_annotation_file(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO detection JSON file and check its structure.

    Args:
        ann_file: path of the JSON file.

    Returns:
        The parsed dict (not yet cleaned; see :func:`clean_annotations`).

    Raises:
        FileNotFoundError: the file does not exist.
        AnnotationError: the file is not JSON, lacks ``images``/``annotations``, or an entry lacks
            a required field or has a malformed ``bbox``.
    """
    path = Path(ann_file)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file {path} not found")
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise AnnotationError(f"annotation file {path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise AnnotationError(f"annotation file {path}: expected a JSON object, got a {type(data).__name__}")
    for key in ("images", "annotations"):
        if key not in data:
            raise AnnotationError(f"annotation file {path} lacks the top-level key {key!r} "
                                  "(a COCO detection file needs 'images' and 'annotations')")
        if not isinstance(data[key], list):
            raise AnnotationError(f"annotation file {path}: {key!r} must be a list, got {type(data[key]).__name__}")
    _check_entries(path, data["images"], "images", REQUIRED_IMAGE_FIELDS)
    _check_entries(path, data["annotations"], "annotations", REQUIRED_ANNOTATION_FIELDS)
    for ann in data["annotations"]:
        bbox = ann["bbox"]
        if (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in bbox)):
            raise AnnotationError(f"annotation file {path}: annotation id {ann['id']} has bbox {bbox!r}; "
                                  "expected [x, y, width, height] of four finite numbers")
    if "categories" in data:
        if not isinstance(data["categories"], list):
            raise AnnotationError(f"annotation file {path}: 'categories' must be a list")
        _check_entries(path, data["categories"], "categories", ("id",))
    _check_unique(path, data["images"], "image")
    _check_unique(path, data["annotations"], "annotation")
    return data


def _check_entries(path: Path, entries: list, kind: str, required: tuple[str, ...]) -> None:
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise AnnotationError(f"annotation file {path}: {kind}[{i}] is a {type(entry).__name__}, not an object")
        missing = [k for k in required if k not in entry]
        if missing:
            raise AnnotationError(f"annotation file {path}: {kind}[{i}] (id={entry.get('id')!r}) lacks the "
                                  f"required field(s) {', '.join(missing)}")


def _check_unique(path: Path, entries: list, kind: str) -> None:
    counts = Counter(e["id"] for e in entries)
    dupes = [k for k, n in counts.items() if n > 1]
    if dupes:
        raise AnnotationError(f"annotation file {path}: {len(dupes)} duplicated {kind} id(s), e.g. {dupes[0]!r}; "
                              f"{kind} ids must be unique")


def clean_annotations(data: dict[str, Any], source: str = "<annotations>") -> dict[str, Any]:
    """Drop or clamp unusable annotations and log what was changed, once per kind.

    Boxes with zero or negative size, boxes wholly outside their image (when the image entry has
    ``width``/``height``), unknown category ids and unknown image ids are dropped; boxes reaching
    outside the image are clamped to it. Missing ``area`` defaults to the box area and missing
    ``iscrowd`` to 0 (pycocotools' evaluation needs both). Without ``categories``, they are
    inferred from the annotations (with a warning). Crowd annotations are kept: evaluation uses
    them as ignore regions, and the training targets skip them.

    Args:
        data: a dict as returned by :func:`read_annotation_file` (not modified).
        source: name used in log lines (the file path).

    Returns:
        A new dict with the same top-level keys and the cleaned ``annotations``/``categories``.
    """
    categories = data.get("categories")
    if not categories:
        ids = sorted({a["category_id"] for a in data["annotations"]})
        logger.warning("%s: no 'categories' list; using the %d category id(s) found in the annotations",
                       source, len(ids))
        categories = [{"id": i, "name": str(i)} for i in ids]
    category_ids = {c["id"] for c in categories}
    images = {img["id"]: img for img in data["images"]}
    counts: Counter = Counter()
    examples: dict[str, Any] = {}
    kept = []
    for ann in data["annotations"]:
        problem, cleaned = _clean_annotation(ann, images.get(ann["image_id"]), category_ids)
        if problem is not None:
            counts[problem] += 1
            examples.setdefault(problem, ann["id"])
        if cleaned is not None:
            kept.append(cleaned)

    for kind, template in _DROP_MESSAGES.items():
        if counts[kind]:
            logger.warning("%s: %s (e.g. annotation id %s)", source, template.format(n=counts[kind]), examples[kind])
    annotated = {a["image_id"] for a in kept}
    empty = sum(1 for i in images if i not in annotated)
    logger.info("%s: %d images, %d annotations kept of %d, %d categories; %d image(s) without annotations "
                "(kept as negatives)", source, len(images), len(kept), len(data["annotations"]),
                len(categories), empty)
    return {**data, "annotations": kept, "categories": categories}


def _clean_annotation(ann: dict, image: dict | None, category_ids: set) -> tuple[str | None, dict | None]:
    """Check one annotation: (problem kind or None, cleaned copy or None when it is dropped)."""
    if image is None:
        return "unknown_image", None
    if ann["category_id"] not in category_ids:
        return "unknown_category", None
    x, y, w, h = (float(v) for v in ann["bbox"])
    if w <= 0 or h <= 0:
        return "degenerate", None
    cleaned, problem = dict(ann), None
    width, height = image.get("width"), image.get("height")
    if isinstance(width, (int, float)) and isinstance(height, (int, float)):
        x0, y0 = min(max(x, 0.0), width), min(max(y, 0.0), height)
        x1, y1 = min(max(x + w, 0.0), width), min(max(y + h, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            return "outside", None
        if (x0, y0, x1, y1) != (x, y, x + w, y + h):
            problem, (w, h) = "clamped", (x1 - x0, y1 - y0)
            cleaned["bbox"] = [x0, y0, w, h]
    cleaned.setdefault("area", w * h)
    cleaned.setdefault("iscrowd", 0)
    return problem, cleaned


def coco_from_dict(data: dict[str, Any]) -> COCO:
    """Build a pycocotools ``COCO`` index from an in-memory dict, without its progress prints."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def load_coco(ann_file: str | os.PathLike) -> COCO:
    """Read, check and clean an annotation file; return its pycocotools index."""
    data = read_annotation_file(ann_file)
    return coco_from_dict(clean_annotations(data, source=str(ann_file)))


def convert_annotations(image: PIL.Image.Image, image_id: int, annotations: list[dict]) -> dict[str, torch.Tensor]:
    """COCO annotations of one image -> the official target dict (xyxy pixel boxes).

    Args:
        image: the decoded image (its size clamps the boxes).
        image_id: COCO image id.
        annotations: the image's COCO annotation dicts.

    Returns:
        ``boxes`` float32 [N, 4] xyxy pixels, ``labels`` int64 [N] (raw category ids), ``image_id``
        int64 [1], ``area`` float32 [N], ``iscrowd`` int64 [N], ``orig_size`` and ``size`` int64
        [2] = (H, W). Crowd annotations and boxes without positive extent after clamping are left out.
    """
    w, h = image.size
    anns = [a for a in annotations if a.get("iscrowd", 0) == 0]
    boxes = torch.as_tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes[:, 0::2].clamp_(min=0, max=w)
    boxes[:, 1::2].clamp_(min=0, max=h)
    keep = (boxes[:, 3] > boxes[:, 1]) & (boxes[:, 2] > boxes[:, 0])
    return {
        "boxes": boxes[keep],
        "labels": torch.tensor([a["category_id"] for a in anns], dtype=torch.int64)[keep],
        "image_id": torch.tensor([image_id], dtype=torch.int64),
        "area": torch.tensor([a["area"] for a in anns], dtype=torch.float32)[keep],
        "iscrowd": torch.tensor([a.get("iscrowd", 0) for a in anns], dtype=torch.int64)[keep],
        "orig_size": torch.tensor([h, w], dtype=torch.int64),
        "size": torch.tensor([h, w], dtype=torch.int64),
    }


class CocoDetection(Dataset):
    """COCO-format detection data set.

    Items are ``(image, target)``: with the official transforms ``image`` is a float tensor
    [3, H, W] (ImageNet-normalised) and ``target["boxes"]`` is float32 [N, 4] cxcywh normalised by
    the transformed image size; see :func:`convert_annotations` for the other keys (``size`` is
    updated by the transforms, ``orig_size`` is the size of the image on disk).

    Args:
        img_folder: folder holding the images named by ``file_name``.
        ann_file: COCO-format JSON annotation file.
        transforms: joint ``(PIL image, target) -> (image, target)`` transform, or None.
        cache_mode: read every image file's encoded bytes into memory when the set is built.
        extra_box_sets: ``(PIL image, target) -> target`` attaching extra box sets to the converted
            target before the transforms (with ``datasets.transforms.add_box_set``; for example
            Teach-DETR's teacher boxes), or None. Give it to the training split only: targets then
            carry the ground truth alone everywhere else. It must not draw random numbers (the
            augmentation's draws come next and must not depend on it).
    """

    def __init__(self, img_folder: str | os.PathLike, ann_file: str | os.PathLike,
                 transforms: Optional[Callable] = None, cache_mode: bool = False,
                 extra_box_sets: Optional[Callable[[PIL.Image.Image, dict], dict]] = None) -> None:
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        self.coco = load_coco(ann_file)
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"image folder {self.img_folder} (for {self.ann_file}) not found")
        self.ids = sorted(self.coco.imgs.keys())
        self._transforms = transforms
        self.extra_box_sets = extra_box_sets
        self.cache_mode = cache_mode
        self.num_skipped = 0
        self._cache: dict[int, bytes] = {}
        if cache_mode:
            self._fill_cache()

    def _path(self, image_id: int) -> Path:
        return self.img_folder / self.coco.imgs[image_id]["file_name"]

    def _fill_cache(self) -> None:
        # Unreadable files are left out of the cache; reading them later reports the error.
        for image_id in self.ids:
            with contextlib.suppress(OSError):
                self._cache[image_id] = self._path(image_id).read_bytes()
        logger.info("cache_mode: %d image files (%.1f MiB) held in memory", len(self._cache),
                    sum(len(b) for b in self._cache.values()) / 2**20)

    def _load_image(self, image_id: int) -> PIL.Image.Image:
        data = self._cache.get(image_id)
        source = io.BytesIO(data) if data is not None else self._path(image_id)
        with PIL.Image.open(source) as img:
            return img.convert("RGB")  # forces the full decode, so truncated files fail here

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, idx: int) -> tuple[Any, dict[str, Any]]:
        for step in range(len(self.ids)):
            image_id = self.ids[(idx + step) % len(self.ids)]
            try:
                image = self._load_image(image_id)
            except IMAGE_READ_ERRORS as err:
                self.num_skipped += 1
                logger.warning("cannot read image %s (%s: %s); using the next readable image instead "
                               "(%d image read(s) skipped so far in this process)", self._path(image_id),
                               type(err).__name__, err, self.num_skipped)
                continue
            target = convert_annotations(image, image_id, self.coco.imgToAnns.get(image_id, []))
            if self.extra_box_sets is not None:
                target = self.extra_box_sets(image, target)
            if self._transforms is not None:
                image, target = self._transforms(image, target)
            return image, target
        raise RuntimeError(f"none of the {len(self.ids)} images of {self.ann_file} under {self.img_folder} "
                           "could be read")
