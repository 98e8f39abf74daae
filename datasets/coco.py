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
* ids must be integers (image ids, category ids and the annotations' ``image_id`` and
  ``category_id``; category ids >= 0, as they are the labels; integral floats such as ``1.0`` are
  read as integers), ``file_name`` a string, ``area`` a number and ``iscrowd`` 0 or 1, and image,
  annotation and category ids unique, else :class:`AnnotationError` names the file and the entry;
* when the data set is built, every image file's header is read (no decoding): an image whose
  EXIF orientation rotates or flips it is read as a viewer shows it, and its entry's
  ``width``/``height`` must be that shown size. Entries that differ from their file are counted and
  logged, and resolved as the official loaders do: the file's size wins, boxes are pixels of the
  file and are clamped or dropped against it (so the counts logged are what reaches the targets).
  One exception: an EXIF-rotated image whose entry gives the stored (unrotated) size is read
  unrotated, so that its boxes stay in the frame they were drawn in (counted and logged);
* when an item is read, an image that is missing or cannot be decoded is logged (file and
  error) and replaced by the next readable image, with a running count of skips in the log;
  16-bit and 32-bit grey images are scaled to 8 bits (a plain RGB conversion would clip them to
  white).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
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


# EXIF orientation -> the transpose that shows the image as a viewer does (as PIL.ImageOps.exif_transpose).
EXIF_ORIENTATION = 0x0112
_TRANSPOSE = {2: PIL.Image.Transpose.FLIP_LEFT_RIGHT, 3: PIL.Image.Transpose.ROTATE_180,
              4: PIL.Image.Transpose.FLIP_TOP_BOTTOM, 5: PIL.Image.Transpose.TRANSPOSE,
              6: PIL.Image.Transpose.ROTATE_270, 7: PIL.Image.Transpose.TRANSVERSE, 8: PIL.Image.Transpose.ROTATE_90}
HEADER_THREADS = 16  # image headers are read in threads (I/O bound: network file systems)


class AnnotationError(ValueError):
    """An annotation file that cannot be used: not JSON, missing keys, entries lacking fields or with ids of the
    wrong type. main.py's cli() exits with its message (status 1)."""


class NoReadableImageError(AnnotationError, RuntimeError):
    """Not one image of a data set can be read (also a RuntimeError, as when it is found at read time)."""


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
    if path.is_dir():
        raise AnnotationError(f"annotation file {path} is a folder; give the COCO JSON file")
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
    _check_values(path, data)
    _check_unique(path, data["images"], "image")
    _check_unique(path, data["annotations"], "annotation")
    _check_unique(path, data.get("categories") or [], "category")
    return data


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# (list, field, what it is, test, what it must be)
_VALUE_RULES = (
    ("images", "id", "image id", _is_int, "an integer (COCO format); number the images and use those numbers as "
                                          "the annotations' image_id"),
    ("images", "file_name", "file_name", lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    ("annotations", "id", "annotation id", lambda v: _is_int(v) or isinstance(v, str), "an integer"),
    ("annotations", "image_id", "image_id", _is_int, "an integer: the id of an entry of 'images'"),
    ("annotations", "category_id", "category_id", lambda v: _is_int(v) and v >= 0,
     "an integer >= 0: the id of an entry of 'categories' (it is the class label)"),
    ("annotations", "area", "area", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
     and math.isfinite(v) and v >= 0, "a finite number >= 0 (or left out: the box area)"),
    ("annotations", "iscrowd", "iscrowd", lambda v: v in (0, 1) and not isinstance(v, float),
     "0 or 1 (or left out: 0)"),
    ("categories", "id", "category id", lambda v: _is_int(v) and v >= 0,
     "an integer >= 0 (COCO format: the labels are the category ids)"),
)


def _check_values(path: Path, data: dict[str, Any]) -> None:
    """Ids and fields of the wrong type fail here, naming the file and the entry, not at the first batch.

    Integral floats (``1.0``, as pandas writes integer columns with gaps) are read as integers, in place.
    """
    for kind, field, what, ok, expected in _VALUE_RULES:
        for i, entry in enumerate(data.get(kind) or []):
            value = entry.get(field)
            if isinstance(value, float) and value.is_integer() and field in ("id", "image_id", "category_id"):
                entry[field] = int(value)
            if field in entry and not ok(entry[field]):
                value = entry[field]
                which = f"{kind}[{i}]" if field == "id" else f"{kind}[{i}] (id={entry.get('id')!r})"
                raise AnnotationError(f"annotation file {path}: {which} has {what} {value!r} (a "
                                      f"{type(value).__name__}); it must be {expected}")


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


def image_header(source: str | os.PathLike | io.BytesIO) -> tuple[tuple[int, int], int]:
    """(stored width, height) and EXIF orientation (1..8, 1 when absent) of an image file, without decoding it."""
    with PIL.Image.open(source) as img:
        return img.size, _orientation(img)


def _orientation(img: PIL.Image.Image) -> int:
    if img.format == "PNG" and "exif" not in img.info:
        return 1  # a PNG's EXIF chunk after the pixels is only found by decoding them; viewers mostly ignore it too
    try:
        value = img.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a malformed EXIF block is ignored, as viewers do
        return 1
    return value if value in _TRANSPOSE else 1


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """8-bit RGB as a viewer shows the pixels: 16-bit grey (and 32-bit integer grey holding values above 255)
    scaled by 1/257, float grey in [0, 1] scaled by 255 (PIL's convert would clip them, e.g. to white)."""
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        arr = np.asarray(img).astype(np.float64)
        if img.mode == "F":
            arr = arr * 255.0 if arr.size and np.nanmax(arr) <= 1.0 else arr
        elif img.mode.startswith("I;16") or (arr.size and arr.max() > 255):
            arr = arr / 257.0
        img = PIL.Image.fromarray(np.nan_to_num(arr).round().clip(0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def index_image_files(img_folder: Path, images: list[dict], source: str,
                      exif_orientation: bool = False) -> tuple[list[dict], dict[Any, int]]:
    """Read every image file's header and reconcile it with its entry (see the module docstring).

    Args:
        img_folder: folder of the images.
        images: the annotation file's ``images`` entries (not modified).
        source: the annotation file, for log lines.

    Returns:
        The entries with ``width``/``height`` of the image as it is read (copies where they change), and the
        EXIF orientation to apply to each image id (absent: none).

    Raises:
        NoReadableImageError: no image file can be read.
    """
    def header(entry: dict) -> Any:
        try:
            return image_header(img_folder / entry["file_name"])
        except IMAGE_READ_ERRORS as err:
            return err

    start = time.time()
    with ThreadPoolExecutor(max_workers=HEADER_THREADS) as pool:
        headers = list(pool.map(header, images))
    out, orientation, counts, examples = [], {}, Counter(), {}
    for entry, head in zip(images, headers):
        if isinstance(head, BaseException):
            counts["unreadable"] += 1
            examples.setdefault("unreadable", f"{img_folder / entry['file_name']}: {type(head).__name__}: {head}")
            out.append(entry)
            continue
        (w, h), rot = head
        if not exif_orientation:  # official: the stored pixels, whatever the EXIF tag says
            rot = 1
        shown = (h, w) if rot >= 5 else (w, h)  # 5..8 swap the axes
        given = (entry.get("width"), entry.get("height"))
        size = shown
        if given == (w, h) != shown:  # an EXIF rotation, and the entry gives the stored size
            counts["stored_frame"] += 1
            examples.setdefault("stored_frame", entry["file_name"])
            rot, size = 1, (w, h)
        elif given != shown and given != (None, None):
            counts["mismatch"] += 1
            examples.setdefault("mismatch", f"{entry['file_name']}: entry {given[0]}x{given[1]}, file "
                                            f"{shown[0]}x{shown[1]}")
        if rot != 1:
            counts["oriented"] += 1
            orientation[entry["id"]] = rot
        out.append(entry if given == size else {**entry, "width": size[0], "height": size[1]})
    _log_index(source, img_folder, len(images), counts, examples, time.time() - start)
    if images and counts["unreadable"] == len(images):
        raise NoReadableImageError(f"none of the {len(images)} images of {source} under {img_folder} could be read "
                                   f"(e.g. {examples['unreadable']})")
    return out, orientation


def _log_index(source: str, folder: Path, n: int, counts: Counter, examples: dict, seconds: float) -> None:
    logger.info("%s: read the headers of %d image file(s) in %.1f s", source, n, seconds)
    if counts["unreadable"]:  # info: each read of such a file is a warning (with a running count)
        logger.info("%s: %d of %d image file(s) under %s are missing or unreadable (e.g. %s); each is replaced by "
                    "the next readable image when read", source, counts["unreadable"], n, folder,
                    examples["unreadable"])
    if counts["mismatch"]:
        logger.warning("%s: %d image(s) whose width/height differ from the file (e.g. %s); the file's size is used "
                       "and boxes are taken as pixels of the file, as the official loaders do (boxes outside it are "
                       "clamped or dropped, counted below); if the boxes were drawn on images of the entry's size, "
                       "scale the boxes or the images", source, counts["mismatch"], examples["mismatch"])
    if counts["stored_frame"]:
        logger.warning("%s: %d EXIF-rotated image(s) whose width/height are those of the stored pixels (e.g. %s): "
                       "read unrotated, so that their boxes stay in the frame they were drawn in", source,
                       counts["stored_frame"], examples["stored_frame"])
    if counts["oriented"]:
        logger.info("%s: %d image(s) with an EXIF orientation are read rotated/flipped as a viewer shows them",
                    source, counts["oriented"])


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
        exif_orientation: apply each image's EXIF orientation (``--exif_orientation``; official: the stored
            pixels are read as they are, and COCO's boxes are in that frame).
        extra_box_sets: ``(PIL image, target) -> target`` attaching extra box sets to the converted
            target before the transforms (with ``datasets.transforms.add_box_set``; for example
            Teach-DETR's teacher boxes), or None. Give it to the training split only: targets then
            carry the ground truth alone everywhere else. It must not draw random numbers (the
            augmentation's draws come next and must not depend on it).
    """

    def __init__(self, img_folder: str | os.PathLike, ann_file: str | os.PathLike,
                 transforms: Optional[Callable] = None, cache_mode: bool = False,
                 extra_box_sets: Optional[Callable[[PIL.Image.Image, dict], dict]] = None,
                 exif_orientation: bool = False) -> None:
        self.img_folder = Path(img_folder)
        self.ann_file = Path(ann_file)
        data = read_annotation_file(ann_file)
        if self.img_folder.exists() and not self.img_folder.is_dir():
            raise NotADirectoryError(f"image folder {self.img_folder} (for {self.ann_file}) is a file; give the "
                                     "folder that holds the images")
        if not self.img_folder.is_dir():
            raise FileNotFoundError(f"image folder {self.img_folder} (for {self.ann_file}) not found")
        images, self._orientation = index_image_files(self.img_folder, data["images"], str(ann_file),
                                                      exif_orientation)
        self.coco = coco_from_dict(clean_annotations({**data, "images": images}, source=str(ann_file)))
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
            img = to_rgb(img)  # forces the full decode, so truncated files fail here
        rot = self._orientation.get(image_id, 1)
        return img if rot == 1 else img.transpose(_TRANSPOSE[rot])

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
