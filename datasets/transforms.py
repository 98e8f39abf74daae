"""Joint image/target transforms of the Deformable-DETR data pipeline.

Behaviour follows fundamentalvision/Deformable-DETR ``datasets/transforms.py`` (itself from DETR):
the same operations, order, random choices and box arithmetic, written anew here.

Every transform is called as ``image, target = t(image, target)``. Until :class:`Normalize`, the
image is a PIL image and ``target["boxes"]`` holds absolute ``xyxy`` pixel boxes; :class:`Normalize`
turns the image into a normalised tensor and the boxes into ``cxcywh`` divided by the transformed,
unpadded image size. Random choices use Python's ``random`` module (as the official code does), so
the DataLoader's per-worker seeding covers them; crop positions use torch's generator.

Box sets. The ground truth ``boxes`` (with its per-box fields ``labels``, ``area``, ``iscrowd``) is
one *box set*; a target may carry more (Teach-DETR's teacher boxes ``ext_boxes`` with ``ext_labels``
and ``ext_scores``), declared in ``target["box_fields"]`` = ``{boxes key: (per-box keys, ...)}``,
best attached with :func:`add_box_set`. Every transform moves every box set by the same geometry
(flip, resize, crop, normalise); a crop drops each set's empty boxes with that set's per-box fields
only. Per-box keys named ``area`` or ``*_area`` are areas: scaled by a resize, recomputed by a crop.
No random draw reads the boxes, so extra box sets never change the augmentation of an image. There
is no pad transform: batches are padded bottom/right by ``collate_fn``, which moves no box.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import PIL.Image
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as F

from util.box_ops import box_xyxy_to_cxcywh

Target = Dict[str, Any]
Transform = Callable[[Any, Optional[Target]], Tuple[Any, Optional[Target]]]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The ground-truth box set and the per-box fields that must follow its boxes when a crop removes some.
GT_BOXES = "boxes"
PER_BOX_FIELDS = ("labels", "area", "iscrowd")
# Target key declaring the extra box sets: {boxes key: tuple of per-box keys}.
BOX_FIELDS_KEY = "box_fields"

# Official sizes (pixels) at scale 1.0.
TRAIN_SCALES = (480, 512, 544, 576, 608, 640, 672, 704, 736, 768, 800)
TRAIN_MAX_SIZE = 1333
CROP_BRANCH_SCALES = (400, 500, 600)
CROP_MIN, CROP_MAX = 384, 600
VAL_SIZE = 800


def get_resize_shape(image_size: tuple[int, int], size: int, max_size: int | None = None) -> tuple[int, int]:
    """Output (height, width) of the official resize rule.

    The shorter side becomes ``size`` unless the longer side would then exceed ``max_size``, in
    which case ``size`` is lowered to ``round(max_size * short / long)``. The longer side is
    truncated, not rounded. An image whose shorter side already equals ``size`` keeps its shape.

    Args:
        image_size: (width, height) of the input, as PIL reports it.
        size: requested shorter side.
        max_size: cap on the longer side, or None for no cap.

    Returns:
        (height, width) of the resized image.
    """
    w, h = image_size
    if max_size is not None:
        short, long = float(min(w, h)), float(max(w, h))
        if long / short * size > max_size:
            size = int(round(max_size * short / long))
    if (w <= h and w == size) or (h <= w and h == size):
        return h, w
    if w < h:
        return int(size * h / w), size
    return size, int(size * w / h)


def add_box_set(target: Target, name: str, boxes: torch.Tensor,
                per_box: Mapping[str, torch.Tensor] | None = None) -> Target:
    """Return a copy of ``target`` carrying one more box set, declared in ``target["box_fields"]``.

    Call it before the transforms (on the xyxy pixel target of the data set), for example
    ``add_box_set(t, "ext_boxes", boxes, {"ext_labels": labels, "ext_scores": scores})``.

    Args:
        target: target dict (not modified).
        name: key of the boxes; must not be a key the target already has.
        boxes: [N, 4] xyxy pixel boxes of the untransformed image (stored as float32).
        per_box: per-box tensors ([N, ...] each) kept in sync with the boxes; ``*_area`` keys are areas.

    Returns:
        The new target dict.
    """
    per_box = dict(per_box or {})
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    for key in (name, *per_box):
        if key in target or key in (BOX_FIELDS_KEY, GT_BOXES, *PER_BOX_FIELDS):
            raise ValueError(f"add_box_set: key {key!r} is already used by the target")
    for key, value in per_box.items():
        if len(value) != len(boxes):
            raise ValueError(f"add_box_set: {key!r} has {len(value)} entries for {len(boxes)} boxes of {name!r}")
    target = {**target, name: boxes, **{k: torch.as_tensor(v) for k, v in per_box.items()}}
    target[BOX_FIELDS_KEY] = {**target.get(BOX_FIELDS_KEY, {}), name: tuple(per_box)}
    return target


def box_sets(target: Target) -> dict[str, tuple[str, ...]]:
    """Every box set of ``target``: {boxes key: per-box keys}, the ground truth ``boxes`` first.

    The ground truth is listed even when the target lacks ``boxes`` (the transforms then skip it, as
    the official code does); a declared extra set must be present with all its per-box keys.
    """
    sets = {GT_BOXES: PER_BOX_FIELDS}
    for name, per_box in target.get(BOX_FIELDS_KEY, {}).items():
        missing = [k for k in (name, *per_box) if k not in target]
        if name in sets or missing:
            raise KeyError(f"box set {name!r} declared in target[{BOX_FIELDS_KEY!r}] is "
                           + ("the ground truth" if name in sets else f"missing {missing}"))
        sets[name] = tuple(per_box)
    return sets


def _is_area(key: str) -> bool:
    return key == "area" or key.endswith("_area")


def hflip(image: PIL.Image.Image, target: Target | None) -> tuple[PIL.Image.Image, Target | None]:
    """Mirror the image left-right; the boxes of every box set become (W - x1, y0, W - x0, y1)."""
    flipped = F.hflip(image)
    if target is None:
        return flipped, target
    names = [name for name in box_sets(target) if name in target]
    if not names:
        return flipped, target
    w = image.width
    target = dict(target)
    for name in names:
        boxes = target[name]
        target[name] = boxes[:, [2, 1, 0, 3]] * torch.tensor([-1.0, 1.0, -1.0, 1.0]) + torch.tensor([w, 0.0, w, 0.0])
    return flipped, target


def resize(image: PIL.Image.Image, target: Target | None, size: int,
           max_size: int | None = None) -> tuple[PIL.Image.Image, Target | None]:
    """Resize by the official rule (:func:`get_resize_shape`), scaling every box set and area per axis.

    Args:
        image: input image.
        target: target dict with xyxy pixel ``boxes`` (optional), ``area`` (optional) and any
            declared box sets (:func:`box_sets`), or None.
        size: requested shorter side.
        max_size: cap on the longer side, or None.

    Returns:
        The resized image and a new target dict with ``size`` set to (H, W) of the output.
    """
    out_h, out_w = get_resize_shape(image.size, size, max_size)
    resized = F.resize(image, [out_h, out_w])
    if target is None:
        return resized, None
    ratio_w = resized.width / image.width
    ratio_h = resized.height / image.height
    target = dict(target)
    for name, per_box in box_sets(target).items():
        if name in target:
            target[name] = target[name] * torch.tensor([ratio_w, ratio_h, ratio_w, ratio_h])
        for key in per_box:
            if _is_area(key) and key in target:
                target[key] = target[key] * (ratio_w * ratio_h)
    target["size"] = torch.tensor([out_h, out_w])
    return resized, target


def crop(image: PIL.Image.Image, target: Target | None,
         region: tuple[int, int, int, int]) -> tuple[PIL.Image.Image, Target | None]:
    """Crop ``region = (top, left, height, width)``; the boxes of every box set are shifted and clipped.

    In each box set, boxes left with zero width or height are removed together with that set's
    per-box fields (``labels``, ``area``, ``iscrowd`` for the ground truth), independently of the
    other sets. Areas (``area``, ``*_area``) are recomputed from the clipped boxes.
    """
    top, left, h, w = region
    cropped = F.crop(image, top, left, h, w)
    if target is None:
        return cropped, None
    target = dict(target)
    target["size"] = torch.tensor([h, w])
    for name, per_box in box_sets(target).items():
        if name not in target:
            continue
        corners = (target[name] - torch.tensor([left, top, left, top], dtype=torch.float32)).reshape(-1, 2, 2)
        corners = torch.min(corners, torch.tensor([w, h], dtype=torch.float32)).clamp(min=0)
        target[name] = corners.reshape(-1, 4)
        area = (corners[:, 1, :] - corners[:, 0, :]).prod(dim=1)
        for key in filter(_is_area, per_box):
            target[key] = area
        keep = torch.all(corners[:, 1, :] > corners[:, 0, :], dim=1)
        for key in (name,) + per_box:
            if key in target:
                target[key] = target[key][keep]
    return cropped, target


class RandomHorizontalFlip:
    """Flip with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, image: PIL.Image.Image, target: Target | None) -> tuple[PIL.Image.Image, Target | None]:
        if random.random() < self.p:
            return hflip(image, target)
        return image, target


class RandomResize:
    """Resize the shorter side to a size drawn uniformly from ``sizes``, longer side capped at ``max_size``."""

    def __init__(self, sizes: Sequence[int], max_size: int | None = None) -> None:
        if len(sizes) == 0:
            raise ValueError("RandomResize needs at least one size")
        self.sizes = list(sizes)
        self.max_size = max_size

    def __call__(self, image: PIL.Image.Image, target: Target | None) -> tuple[PIL.Image.Image, Target | None]:
        return resize(image, target, random.choice(self.sizes), self.max_size)


class RandomSizeCrop:
    """Crop a random region with width in [min_size, min(W, max_size)] and height likewise.

    Unlike the official code, an image smaller than ``min_size`` does not raise: the lower bound
    falls to the image size (the official sizes never reach this case).
    """

    def __init__(self, min_size: int, max_size: int) -> None:
        self.min_size = min_size
        self.max_size = max_size

    def __call__(self, image: PIL.Image.Image, target: Target | None) -> tuple[PIL.Image.Image, Target | None]:
        w = random.randint(min(self.min_size, image.width), min(image.width, self.max_size))
        h = random.randint(min(self.min_size, image.height), min(image.height, self.max_size))
        region = T.RandomCrop.get_params(image, [h, w])
        return crop(image, target, region)


class RandomSelect:
    """Apply ``first`` with probability ``p``, else ``second``."""

    def __init__(self, first: Transform, second: Transform, p: float = 0.5) -> None:
        self.first, self.second, self.p = first, second, p

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        if random.random() < self.p:
            return self.first(image, target)
        return self.second(image, target)


class ToTensor:
    """PIL image -> float tensor [3, H, W] in [0, 1]; the target is untouched."""

    def __call__(self, image: PIL.Image.Image, target: Target | None) -> tuple[torch.Tensor, Target | None]:
        return F.to_tensor(image), target


class Normalize:
    """Normalise the image with mean/std; every box set xyxy pixels -> cxcywh in [0, 1] of the unpadded size."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: torch.Tensor, target: Target | None) -> tuple[torch.Tensor, Target | None]:
        image = F.normalize(image, mean=self.mean, std=self.std)
        if target is None:
            return image, None
        target = dict(target)
        h, w = image.shape[-2:]
        for name in box_sets(target):
            if name in target:
                target[name] = box_xyxy_to_cxcywh(target[name]) / torch.tensor([w, h, w, h], dtype=torch.float32)
        return image, target


class Compose:
    """Chain joint transforms."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, image: Any, target: Target | None) -> tuple[Any, Target | None]:
        for t in self.transforms:
            image, target = t(image, target)
        return image, target

    def __repr__(self) -> str:
        inner = "".join(f"\n    {t!r}" for t in self.transforms)
        return f"{type(self).__name__}({inner}\n)"


def _scaled(value: int, scale: float) -> int:
    return max(1, int(round(value * scale)))


@dataclass(frozen=True)
class InputSizes:
    """Every size (pixels) of the train/val pipelines; the defaults are the official values.

    Attributes:
        train_scales: shorter sides drawn by the training resize (official 480..800).
        train_max_size: cap on the longer side in training (official 1333).
        crop_scales: shorter sides of the crop branch's first resize (official 400, 500, 600).
        crop_min: smallest side of the crop branch's random crop (official 384).
        crop_max: largest side of that crop (official 600).
        val_size: shorter side at evaluation (official 800).
        val_max_size: cap on the longer side at evaluation (official 1333).
    """

    train_scales: Tuple[int, ...] = TRAIN_SCALES
    train_max_size: int = TRAIN_MAX_SIZE
    crop_scales: Tuple[int, ...] = CROP_BRANCH_SCALES
    crop_min: int = CROP_MIN
    crop_max: int = CROP_MAX
    val_size: int = VAL_SIZE
    val_max_size: int = TRAIN_MAX_SIZE

    @classmethod
    def scaled(cls, scale: float = 1.0) -> InputSizes:
        """The official sizes multiplied by ``scale``, each rounded to an integer (at least 1)."""
        if scale <= 0:
            raise ValueError(f"input sizes: scale must be positive, got {scale}")
        def size(value: int) -> int:
            return _scaled(value, scale)

        return cls(train_scales=tuple(map(size, TRAIN_SCALES)), train_max_size=size(TRAIN_MAX_SIZE),
                   crop_scales=tuple(map(size, CROP_BRANCH_SCALES)), crop_min=size(CROP_MIN),
                   crop_max=size(CROP_MAX), val_size=size(VAL_SIZE), val_max_size=size(TRAIN_MAX_SIZE))

    def describe(self) -> str:
        """One line for logs, e.g. the official sizes: ``train shorter side 480..800 (cap 1333), ...``."""
        train = f"{min(self.train_scales)}..{max(self.train_scales)}" if len(self.train_scales) > 1 \
            else str(self.train_scales[0])
        return (f"train shorter side {train} (cap {self.train_max_size}), crop branch "
                f"{'/'.join(map(str, self.crop_scales))} then a {self.crop_min}..{self.crop_max} crop, "
                f"val {self.val_size} (cap {self.val_max_size})")


def make_coco_transforms(image_set: str, scale: float = 1.0, sizes: InputSizes | None = None) -> Compose:
    """The official train/val pipelines, every size multiplied by ``scale`` (or given by ``sizes``).

    ``scale=1.0`` gives the official sizes (train shorter sides 480..800, cap 1333; crop branch
    400/500/600 then a crop of 384..600; val 800, cap 1333). Other scales multiply all of these
    and round to integers, so small images (the synthetic set uses ``scale = image_size / 800``)
    see the same pipeline at their size. ``sizes`` sets each size explicitly (``--train_scales``
    and friends); only the sizes change, never the operations, their order or their random draws.

    Args:
        image_set: "train" or "val".
        scale: multiplier of every size (must stay 1.0 when ``sizes`` is given).
        sizes: the sizes to use, or None for ``InputSizes.scaled(scale)``.

    Returns:
        A callable ``(PIL image, target) -> (tensor [3, H, W], target)`` with normalised cxcywh boxes.
    """
    if scale <= 0:
        raise ValueError(f"make_coco_transforms: scale must be positive, got {scale}")
    if sizes is not None and scale != 1.0:
        raise ValueError("make_coco_transforms: give either scale or sizes (sizes are final pixel values)")
    sizes = sizes if sizes is not None else InputSizes.scaled(scale)
    normalize = Compose([ToTensor(), Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    scales = list(sizes.train_scales)
    if image_set == "train":
        crop_branch = Compose([
            RandomResize(list(sizes.crop_scales)),
            RandomSizeCrop(sizes.crop_min, sizes.crop_max),
            RandomResize(scales, max_size=sizes.train_max_size),
        ])
        return Compose([
            RandomHorizontalFlip(),
            RandomSelect(RandomResize(scales, max_size=sizes.train_max_size), crop_branch),
            normalize,
        ])
    if image_set == "val":
        return Compose([RandomResize([sizes.val_size], max_size=sizes.val_max_size), normalize])
    raise ValueError(f"unknown image_set {image_set!r}; expected 'train' or 'val'")
