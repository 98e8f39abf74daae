"""A deterministic COCO-format data set of rendered shapes (``--dataset_file synthetic``).

Each image holds 1-6 objects of five shape classes (circle, square, triangle, cross, ring) of
random colour, drawn on a flat, gradient or noise-textured background with a little clutter
(thin strokes and dots that are not objects). Objects may overlap, but an object is never more
than :data:`MAX_OCCLUSION` covered; its box is the tight box of its visible pixels and its area the
visible pixel count. Object colours always contrast with what lies under them.

Every image is drawn from its own ``numpy.random.Generator`` seeded by (seed, split, index), so the
same parameters give byte-identical files. The set is written to a temporary sibling folder and
renamed into place when complete; a ``manifest.json`` records the parameters, and a folder whose
manifest differs from the requested parameters is regenerated. Under torch.distributed only
rank 0 generates; the others wait for it.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw

from util.misc import all_gather_object, is_dist_avail_and_initialized, is_main_process

logger = logging.getLogger(__name__)

CATEGORIES = (
    {"id": 1, "name": "circle", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 3, "name": "triangle", "supercategory": "shape"},
    {"id": 4, "name": "cross", "supercategory": "shape"},
    {"id": 5, "name": "ring", "supercategory": "shape"},
)
NUM_CLASSES = max(c["id"] for c in CATEGORIES) + 1
FORMAT_VERSION = 1
DEFAULT_SEED = 20240917
MAX_OBJECTS = 6
MAX_OCCLUSION = 0.4          # fraction of an object that later objects may cover
SIZE_RANGE = (12 / 128, 80 / 128)  # object side, as a fraction of the image side
SUPERSAMPLE = 2              # shapes are drawn at 2x and box-filtered down (anti-aliasing)
JPEG_QUALITY = 95
MIN_IMAGE_SIZE = 32          # below this the smallest shapes lose their form
SPLITS = {"train": 0, "val": 1}


@dataclass(frozen=True)
class SyntheticSpec:
    """Generation parameters; equal specs give byte-identical data sets."""

    image_size: int = 128
    train_size: int = 2000
    val_size: int = 200
    seed: int = DEFAULT_SEED

    def __post_init__(self) -> None:
        if self.image_size < MIN_IMAGE_SIZE:
            raise ValueError(f"synthetic image size must be at least {MIN_IMAGE_SIZE} px, got {self.image_size}")
        if self.train_size < 1 or self.val_size < 1:
            raise ValueError(f"synthetic train/val sizes must be positive, got {self.train_size}/{self.val_size}")

    def manifest(self) -> dict[str, Any]:
        return {"generator": "datasets.synthetic", "format_version": FORMAT_VERSION, **asdict(self),
                "categories": [c["name"] for c in CATEGORIES]}


# ------------------------------------------------------------------------------------------------
# Rendering
# ------------------------------------------------------------------------------------------------
def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """[size, size, 3] float32 background: flat, linear gradient or smooth noise texture."""
    kind = rng.integers(3)
    base = rng.uniform(0, 255, size=3)
    if kind == 0:
        img = np.broadcast_to(base, (size, size, 3)).astype(np.float32)
    elif kind == 1:
        other = rng.uniform(0, 255, size=3)
        angle = rng.uniform(0, 2 * np.pi)
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
        t = xx * np.cos(angle) + yy * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = (base * (1 - t[..., None]) + other * t[..., None]).astype(np.float32)
    else:
        cells = int(rng.integers(3, 9))
        coarse = rng.normal(0, 1, size=(cells, cells)).astype(np.float32)
        smooth = np.asarray(PIL.Image.fromarray(coarse).resize((size, size), PIL.Image.BILINEAR))
        tint = rng.uniform(0.5, 1.0, size=3)
        img = base + rng.uniform(15, 40) * smooth[..., None] * tint
    return np.clip(img, 0, 255)


def _shape_mask(category_id: int, box: tuple[int, int, int, int], canvas: int,
                rng: np.random.Generator) -> np.ndarray:
    """Boolean [canvas, canvas] mask of one shape filling ``box = (x0, y0, x1, y1)`` (inclusive)."""
    mask = PIL.Image.new("L", (canvas, canvas), 0)
    draw = PIL.ImageDraw.Draw(mask)
    x0, y0, x1, y1 = box
    w, h = x1 - x0 + 1, y1 - y0 + 1
    if category_id == 1:
        draw.ellipse(box, fill=255)
    elif category_id == 2:
        draw.rectangle(box, fill=255)
    elif category_id == 3:
        corners = [(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)]  # pointing up, then rotated by k * 90 degrees
        k = int(rng.integers(4))
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        for _ in range(k):  # a quarter turn about the centre, rescaled to the box
            corners = [(cx - (py - cy) * w / h, cy + (px - cx) * h / w) for px, py in corners]
        draw.polygon(corners, fill=255)
    elif category_id == 4:
        tw, th = max(round(0.34 * w), 2), max(round(0.34 * h), 2)
        cx, cy = x0 + (w - tw) // 2, y0 + (h - th) // 2
        draw.rectangle((x0, cy, x1, cy + th - 1), fill=255)
        draw.rectangle((cx, y0, cx + tw - 1, y1), fill=255)
    elif category_id == 5:
        draw.ellipse(box, fill=255)
        t = max(round(0.28 * min(w, h)), 2)
        if x1 - t > x0 + t and y1 - t > y0 + t:
            draw.ellipse((x0 + t, y0 + t, x1 - t, y1 - t), fill=0)
    else:
        raise ValueError(f"unknown synthetic category {category_id}")
    return np.asarray(mask) > 127


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour far (in luminance and RGB) from the mean colour ``under`` it."""
    weights = np.array([0.299, 0.587, 0.114])
    for _ in range(32):
        colour = rng.integers(0, 256, size=3)
        diff = colour - under
        if abs(float(diff @ weights)) >= 60 and float(np.linalg.norm(diff)) >= 110:
            return tuple(int(c) for c in colour)
    return (0, 0, 0) if float(under @ weights) > 127 else (255, 255, 255)


def _draw_clutter(rng: np.random.Generator, canvas: PIL.Image.Image) -> None:
    """A few thin strokes and small dots: texture that is not an object."""
    draw = PIL.ImageDraw.Draw(canvas)
    size = canvas.width
    unit = size / 128  # canvas pixels per output pixel of a 128 px image (sizes below are relative to 128 px)
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, size, size=2)
        length, angle = rng.uniform(8, 40) * unit, rng.uniform(0, np.pi)
        end = (x + length * np.cos(angle), y + length * np.sin(angle))
        draw.line([(x, y), end], fill=tuple(int(c) for c in rng.integers(0, 256, size=3)),
                  width=max(int(rng.integers(1, 3) * unit), 1))
    for _ in range(int(rng.integers(0, 6))):
        x, y = rng.uniform(0, size, size=2)
        r = rng.uniform(1, 3) * unit
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, size=3)))


def render_image(rng: np.random.Generator, size: int) -> tuple[PIL.Image.Image, list[dict[str, Any]]]:
    """Draw one image and its objects.

    Args:
        rng: the image's own generator (the only source of randomness).
        size: side of the square output image in pixels.

    Returns:
        The RGB image and a list of objects with ``category_id``, ``bbox`` [x, y, w, h] (pixels,
        tight around the visible part) and ``area`` (visible pixels), in drawing order.
    """
    s = SUPERSAMPLE
    canvas_size = size * s
    canvas = PIL.Image.fromarray(_background(rng, canvas_size).astype(np.uint8))
    _draw_clutter(rng, canvas)
    lo, hi = (f * size * s for f in SIZE_RANGE)
    visible: list[np.ndarray] = []
    full_area: list[int] = []
    categories: list[int] = []
    for _ in range(int(rng.integers(1, MAX_OBJECTS + 1))):
        category_id = int(rng.integers(1, len(CATEGORIES) + 1))  # drawn once, so rejections keep classes balanced
        for _attempt in range(20):
            side = rng.uniform(lo, hi)  # uniform, not log-uniform: fewer tiny objects, faster to learn
            aspect = np.exp(rng.uniform(np.log(0.75), np.log(4 / 3)))
            w = int(np.clip(side * np.sqrt(aspect), 0.8 * lo, canvas_size - 2))
            h = int(np.clip(side / np.sqrt(aspect), 0.8 * lo, canvas_size - 2))
            x0, y0 = int(rng.integers(0, canvas_size - w)), int(rng.integers(0, canvas_size - h))
            mask = _shape_mask(category_id, (x0, y0, x0 + w - 1, y0 + h - 1), canvas_size, rng)
            if all((v & ~mask).sum() >= (1 - MAX_OCCLUSION) * a for v, a in zip(visible, full_area)):
                break
        else:
            continue  # no placement keeps the earlier objects visible enough: draw one object fewer
        under = np.asarray(canvas)[mask].mean(axis=0)
        canvas.paste(_contrasting_colour(rng, under), (0, 0), PIL.Image.fromarray(mask.astype(np.uint8) * 255))
        visible = [v & ~mask for v in visible] + [mask]
        full_area.append(int(mask.sum()))
        categories.append(category_id)
    image = canvas.resize((size, size), PIL.Image.BOX)
    noise_std = rng.uniform(0, 5)
    if noise_std > 0.5:
        pixels = np.asarray(image).astype(np.float32) + rng.normal(0, noise_std, size=(size, size, 3))
        image = PIL.Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    objects = []
    for category_id, vis in zip(categories, visible):
        ys, xs = np.nonzero(vis)
        x0, y0, x1, y1 = xs.min() / s, ys.min() / s, (xs.max() + 1) / s, (ys.max() + 1) / s
        objects.append({"category_id": category_id, "bbox": [x0, y0, x1 - x0, y1 - y0],
                        "area": float(vis.sum()) / s**2})
    return image, objects


# ------------------------------------------------------------------------------------------------
# Writing to disk
# ------------------------------------------------------------------------------------------------
def _write_split(root: Path, split: str, count: int, spec: SyntheticSpec) -> None:
    folder = root / f"{split}2017"
    folder.mkdir(parents=True)
    images, annotations = [], []
    for index in range(count):
        rng = np.random.default_rng([spec.seed, SPLITS[split], index])
        image, objects = render_image(rng, spec.image_size)
        image_id = index + 1
        file_name = f"{image_id:012d}.jpg"
        image.save(folder / file_name, format="JPEG", quality=JPEG_QUALITY, subsampling=0)
        images.append({"id": image_id, "file_name": file_name, "width": spec.image_size,
                       "height": spec.image_size})
        for obj in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": obj["category_id"],
                                "bbox": [round(v, 2) for v in obj["bbox"]], "area": round(obj["area"], 2),
                                "iscrowd": 0})
    data = {"info": {"description": "synthetic shapes", **spec.manifest()}, "images": images,
            "annotations": annotations, "categories": list(CATEGORIES)}
    (root / "annotations").mkdir(exist_ok=True)
    with open(root / "annotations" / f"instances_{split}2017.json", "w") as f:
        json.dump(data, f, separators=(",", ":"))


def read_manifest(root: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of a generated folder, or None when absent or unreadable."""
    try:
        with open(Path(root) / "manifest.json") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_ready(root: str | os.PathLike, spec: SyntheticSpec) -> bool:
    """Whether ``root`` holds a complete set generated with ``spec``."""
    return read_manifest(root) == spec.manifest()


def _remove_stale_temporaries(root: Path) -> None:
    """Remove temporary folders that crashed runs on this host left behind."""
    host = socket.gethostname()
    for path in root.parent.glob(f".{root.name}.*-{host}-*"):
        pid = int(path.name.rsplit("-", 1)[-1]) if path.name.rsplit("-", 1)[-1].isdigit() else None
        if pid is None or pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            logger.info("removing %s, left by an interrupted generation", path)
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # a live process of another user


def generate(root: str | os.PathLike, spec: SyntheticSpec) -> None:
    """Write the data set under ``root`` (replacing what is there) via a temporary sibling folder.

    The manifest is written last and the folder renamed into place only when complete, so a crash
    leaves ``root`` either absent, or as it was before.
    """
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(root)
    tag = f"{socket.gethostname()}-{os.getpid()}"
    tmp, old = root.parent / f".{root.name}.tmp-{tag}", root.parent / f".{root.name}.old-{tag}"
    shutil.rmtree(tmp, ignore_errors=True)
    start = time.perf_counter()
    logger.info("generating the synthetic data set under %s (%d train + %d val images of %d px)", root,
                spec.train_size, spec.val_size, spec.image_size)
    try:
        _write_split(tmp, "train", spec.train_size, spec)
        _write_split(tmp, "val", spec.val_size, spec)
        with open(tmp / "manifest.json", "w") as f:
            json.dump(spec.manifest(), f, indent=2, sort_keys=True)
        if root.exists():
            os.rename(root, old)
        try:
            os.rename(tmp, root)
        except OSError:
            if not is_ready(root, spec):  # not just another process that finished first
                raise
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("synthetic data set written in %.1f s", time.perf_counter() - start)


def _ensure_local(root: Path, spec: SyntheticSpec) -> None:
    if is_ready(root, spec):
        return
    if root.exists():
        found = read_manifest(root)
        if found is None or found.get("generator") != "datasets.synthetic":
            if any(root.iterdir()):
                raise RuntimeError(f"{root} exists, is not empty and holds no synthetic-data manifest; refusing to "
                                   "overwrite it (choose another --coco_path)")
        else:
            changed = {k: (found.get(k), v) for k, v in spec.manifest().items() if found.get(k) != v}
            logger.info("%s was generated with other parameters (found vs requested: %s); regenerating", root, changed)
    generate(root, spec)


def ensure_synthetic(root: str | os.PathLike, spec: SyntheticSpec) -> Path:
    """Make sure ``root`` holds the synthetic set for ``spec``; generate it if not.

    Under torch.distributed, rank 0 generates while the others wait; a rank that still does not
    see the set afterwards (no shared file system) generates its own identical copy.

    Args:
        root: folder of the set (``train2017/``, ``val2017/``, ``annotations/``, ``manifest.json``).
        spec: generation parameters.

    Returns:
        ``root`` as a Path.
    """
    root = Path(root)
    if not is_dist_avail_and_initialized():
        _ensure_local(root, spec)
        return root
    error = None
    if is_main_process():
        try:
            _ensure_local(root, spec)
        except Exception as err:  # reported to every rank below, then re-raised
            error = err
    outcomes = all_gather_object(None if error is None else repr(error))  # also the barrier
    if error is not None:
        raise error
    if outcomes[0] is not None:
        raise RuntimeError(f"rank 0 failed to generate the synthetic data set under {root}: {outcomes[0]}")
    if not is_ready(root, spec):
        logger.warning("the synthetic set generated by rank 0 is not visible here (no shared file system?); "
                       "generating a local copy under %s", root)
        _ensure_local(root, spec)
    return root
