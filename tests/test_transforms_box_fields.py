"""Extra box sets (``target["box_fields"]``, Teach-DETR's teacher boxes) through the data transforms.

Every transform must move every box set by the ground truth's geometry, drop each set's empty boxes
with its own per-box fields, and leave the ground truth and the random draws bitwise unchanged.
Tiny images built in memory or under tmp_path; CPU only.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import PIL.Image
import pytest
import torch

from datasets import transforms as T
from datasets.coco import CocoDetection
from datasets.seeded import SeededDataset

W, H = 64, 48
SCALE = W / 800  # the official pipeline at the size of these images (as the synthetic set does)
COPY_FIELDS = {"ext_boxes": "boxes", "ext_labels": "labels", "ext_area": "area", "ext_iscrowd": "iscrowd"}


def _target(boxes, labels=None) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    return {"boxes": boxes, "labels": torch.arange(1, n + 1) if labels is None else torch.tensor(labels),
            "image_id": torch.tensor([7]), "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(n, dtype=torch.int64), "orig_size": torch.tensor([H, W]),
            "size": torch.tensor([H, W])}


def _random_target(seed: int, n: int = 6) -> dict:
    """n boxes in a W x H image, some of them small and near the borders (so crops drop some)."""
    g = torch.Generator().manual_seed(seed)
    x0y0 = torch.rand(n, 2, generator=g) * torch.tensor([W - 4.0, H - 4.0])
    wh = 1 + torch.rand(n, 2, generator=g) * 20
    x1y1 = torch.min(x0y0 + wh, torch.tensor([float(W), float(H)]))
    return _target(torch.cat([x0y0, x1y1], dim=1).tolist())


def _with_copy(target: dict) -> dict:
    """The target plus an extra box set that copies the ground truth (with a score per box)."""
    per_box = {k: target[v].clone() for k, v in COPY_FIELDS.items() if k != "ext_boxes"}
    per_box["ext_scores"] = target["labels"].float() * 0.1
    return T.add_box_set(target, "ext_boxes", target["boxes"].clone(), per_box)


def _assert_copy_follows(t: dict) -> None:
    for extra, gt in COPY_FIELDS.items():
        assert torch.equal(t[extra], t[gt]), extra
    assert torch.equal(t["ext_scores"], t["labels"].float() * 0.1)


def _image(seed: int = 0) -> PIL.Image.Image:
    g = torch.Generator().manual_seed(seed)
    return PIL.Image.fromarray(torch.randint(0, 256, (H, W, 3), generator=g, dtype=torch.uint8).numpy())


def _normalize() -> T.Compose:
    return T.Compose([T.ToTensor(), T.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])


def _run_seeded(transform, image, target, seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    return transform(image, target)


TRANSFORMS = {
    "hflip": T.hflip,
    "resize": lambda im, t: T.resize(im, t, 100, max_size=120),
    "crop": lambda im, t: T.crop(im, t, (10, 20, 25, 30)),
    "random_size_crop": T.RandomSizeCrop(20, 40),
    "normalize": _normalize(),
    "train": T.make_coco_transforms("train", scale=SCALE),
    "val": T.make_coco_transforms("val", scale=SCALE),
}


# ------------------------------------------------------------------------------------------------
# a copy of the ground truth stays equal to it; the ground truth is unchanged by an extra set
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("seed", range(12))
def test_copy_of_ground_truth_follows_it_bitwise(name, seed):
    target = _random_target(seed)
    transform = TRANSFORMS[name]
    _, t = _run_seeded(transform, _image(), _with_copy(target), seed)
    _assert_copy_follows(t)
    assert t["box_fields"] == {"ext_boxes": ("ext_labels", "ext_area", "ext_iscrowd", "ext_scores")}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("seed", range(12))
def test_ground_truth_and_draws_unchanged_by_extra_set(name, seed):
    target = _random_target(seed)
    extra = T.add_box_set(target, "ext_boxes", _random_target(seed + 100, n=9)["boxes"],
                          {"ext_labels": torch.arange(9), "ext_scores": torch.rand(9)})
    image_a, plain = _run_seeded(TRANSFORMS[name], _image(seed), target, seed)
    state_a = (random.getstate(), torch.get_rng_state())
    image_b, with_extra = _run_seeded(TRANSFORMS[name], _image(seed), extra, seed)
    assert random.getstate() == state_a[0] and torch.equal(torch.get_rng_state(), state_a[1])
    if torch.is_tensor(image_a):
        assert torch.equal(image_a, image_b)
    else:
        assert image_a.tobytes() == image_b.tobytes()
    assert set(with_extra) == set(plain) | {"box_fields", "ext_boxes", "ext_labels", "ext_scores"}
    for key, value in plain.items():
        assert torch.equal(with_extra[key], value), key
        assert value.dtype == with_extra[key].dtype


def test_official_pipeline_covers_both_branches_and_real_drops():
    """Over these seeds the train pipeline flips, crops and drops boxes; the copy follows every time."""
    train = TRANSFORMS["train"]
    dropped = flipped = 0
    for seed in range(40):
        target = _random_target(seed)
        _, t = _run_seeded(train, _image(), _with_copy(target), seed)
        _assert_copy_follows(t)
        dropped += len(t["boxes"]) < len(target["boxes"])
        random.seed(seed)
        flipped += random.random() < 0.5  # RandomHorizontalFlip's draw comes first
    assert dropped > 0 and 0 < flipped < 40


# ------------------------------------------------------------------------------------------------
# a different extra set gets the same geometry (hand-computed values)
# ------------------------------------------------------------------------------------------------
def _teacher(target: dict, boxes, scores) -> dict:
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    return T.add_box_set(target, "ext_boxes", boxes, {"ext_labels": torch.arange(10, 10 + n),
                                                      "ext_scores": torch.tensor(scores, dtype=torch.float32)})


def test_hflip_moves_extra_boxes():
    image = PIL.Image.new("RGB", (10, 4))
    target = _teacher(_target([[1, 0, 3, 2]]), [[0, 1, 4, 3], [6, 0, 10, 4]], [0.9, 0.2])
    _, t = T.hflip(image, target)
    assert t["boxes"].tolist() == [[7.0, 0.0, 9.0, 2.0]]
    assert t["ext_boxes"].tolist() == [[6.0, 1.0, 10.0, 3.0], [0.0, 0.0, 4.0, 4.0]]
    assert t["ext_labels"].tolist() == [10, 11] and torch.equal(t["ext_scores"], target["ext_scores"])


def test_resize_moves_extra_boxes_and_areas():
    image = PIL.Image.new("RGB", (40, 20))
    target = _teacher(_target([[4, 2, 20, 10]]), [[0, 0, 10, 5], [30, 10, 40, 20]], [0.5, 0.25])
    target = T.add_box_set(target, "aux_boxes", torch.tensor([[2.0, 2.0, 4.0, 6.0]]), {"aux_area": torch.tensor([8.0])})
    _, t = T.resize(image, target, 40)  # x2 on both axes
    assert t["boxes"].tolist() == [[8.0, 4.0, 40.0, 20.0]] and t["area"].tolist() == [512.0]
    assert t["ext_boxes"].tolist() == [[0.0, 0.0, 20.0, 10.0], [60.0, 20.0, 80.0, 40.0]]
    assert t["aux_boxes"].tolist() == [[4.0, 4.0, 8.0, 12.0]] and t["aux_area"].tolist() == [32.0]
    assert t["ext_scores"].tolist() == [0.5, 0.25] and t["ext_labels"].tolist() == [10, 11]


def test_crop_drops_boxes_of_each_set_independently():
    image = PIL.Image.new("RGB", (20, 20))
    gt = _target([[2, 2, 8, 8], [12, 12, 18, 18], [0, 0, 3, 3]], labels=[1, 2, 3])
    # teacher: survives where the GT [0,0,3,3] dies; dies where the GT [12,12,18,18] survives; one outside
    target = _teacher(gt, [[1, 1, 6, 6], [16, 16, 19, 19], [6, 7, 9, 30], [0, 0, 4, 4]], [0.1, 0.2, 0.3, 0.4])
    target = T.add_box_set(target, "aux_boxes", torch.tensor([[4.0, 4.0, 9.0, 9.0]]),
                           {"aux_area": torch.tensor([25.0])})
    _, t = T.crop(image, target, (5, 5, 10, 10))  # top, left, height, width
    assert t["boxes"].tolist() == [[0.0, 0.0, 3.0, 3.0], [7.0, 7.0, 10.0, 10.0]]
    assert t["labels"].tolist() == [1, 2] and t["area"].tolist() == [9.0, 9.0] and t["iscrowd"].tolist() == [0, 0]
    assert t["ext_boxes"].tolist() == [[0.0, 0.0, 1.0, 1.0], [1.0, 2.0, 4.0, 10.0]]
    assert t["ext_labels"].tolist() == [10, 12] and t["ext_scores"].tolist() == pytest.approx([0.1, 0.3])
    assert t["aux_boxes"].tolist() == [[0.0, 0.0, 4.0, 4.0]] and t["aux_area"].tolist() == [16.0]


def test_normalize_moves_extra_boxes():
    image = PIL.Image.new("RGB", (40, 20))
    target = _teacher(_target([[0, 0, 20, 10]]), [[10, 5, 30, 15], [0, 0, 40, 20]], [1.0, 0.0])
    _, t = _normalize()(image, target)
    assert torch.allclose(t["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5]]))
    assert torch.allclose(t["ext_boxes"], torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]))


@pytest.mark.parametrize("gt_boxes,extra_boxes", [
    ([], [[1, 1, 30, 20]]),   # empty ground truth
    ([[1, 1, 30, 20]], []),   # empty extra set
    ([], []),
])
@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_empty_sets(name, gt_boxes, extra_boxes):
    target = _teacher(_target(gt_boxes), extra_boxes, [0.5] * len(extra_boxes))
    for seed in range(6):
        _, t = _run_seeded(TRANSFORMS[name], _image(), target, seed)
        assert t["boxes"].shape[1:] == t["ext_boxes"].shape[1:] == (4,)
        assert len(t["ext_boxes"]) == len(t["ext_labels"]) == len(t["ext_scores"]) <= len(extra_boxes)
        assert len(t["boxes"]) == len(t["labels"]) == len(t["area"]) <= len(gt_boxes)


# ------------------------------------------------------------------------------------------------
# declaration
# ------------------------------------------------------------------------------------------------
def test_add_box_set_declares_and_refuses_clashes():
    target = _target([[0, 0, 4, 4]])
    t = _teacher(target, [[1, 1, 2, 2]], [0.3])
    assert "box_fields" not in target and "ext_boxes" not in target  # the input is not modified
    assert T.box_sets(t) == {"boxes": ("labels", "area", "iscrowd"), "ext_boxes": ("ext_labels", "ext_scores")}
    assert T.box_sets(target) == {"boxes": ("labels", "area", "iscrowd")}
    with pytest.raises(ValueError, match="already used"):
        T.add_box_set(t, "ext_boxes", torch.zeros(0, 4))
    with pytest.raises(ValueError, match="already used"):
        T.add_box_set(t, "other_boxes", torch.zeros(1, 4), {"labels": torch.zeros(1)})
    with pytest.raises(ValueError, match="entries"):
        T.add_box_set(t, "other_boxes", torch.zeros(2, 4), {"other_scores": torch.zeros(3)})
    broken = {k: v for k, v in t.items() if k != "ext_scores"}
    with pytest.raises(KeyError, match="ext_scores"):
        T.hflip(PIL.Image.new("RGB", (4, 4)), broken)


# ------------------------------------------------------------------------------------------------
# the data set: extra sets only when asked; seeded augmentation unchanged by them
# ------------------------------------------------------------------------------------------------
def _write_coco(root: Path, images: int = 4) -> Path:
    (root / "img").mkdir(parents=True)
    entries, anns = [], []
    for i in range(1, images + 1):
        _image(i).save(root / "img" / f"{i}.png")
        entries.append({"id": i, "file_name": f"{i}.png", "width": W, "height": H})
        for j, box in enumerate(_random_target(i, n=4)["boxes"].tolist()):
            x0, y0, x1, y1 = box
            anns.append({"id": 10 * i + j, "image_id": i, "bbox": [x0, y0, x1 - x0, y1 - y0], "category_id": 1 + j % 2,
                         "area": (x1 - x0) * (y1 - y0), "iscrowd": 0})
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps({"images": entries, "annotations": anns,
                                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return ann_file


def _attach_teacher(image: PIL.Image.Image, target: dict) -> dict:
    """A stand-in teacher: the GT copied, plus one box over the whole image (no random draws)."""
    boxes = torch.cat([target["boxes"], torch.tensor([[0.0, 0.0, image.width, image.height]])])
    labels = torch.cat([target["labels"], torch.tensor([0])])
    scores = torch.full((len(boxes),), 0.5)
    return T.add_box_set(target, "ext_boxes", boxes, {"ext_labels": labels, "ext_scores": scores})


def test_dataset_attaches_extra_sets_only_when_asked_and_keeps_seeded_draws(tmp_path):
    ann_file = _write_coco(tmp_path)
    train = T.make_coco_transforms("train", scale=SCALE)
    plain = SeededDataset(CocoDetection(tmp_path / "img", ann_file, transforms=train), seed=3)
    extra = SeededDataset(CocoDetection(tmp_path / "img", ann_file, transforms=train,
                                        extra_box_sets=_attach_teacher), seed=3)
    val = CocoDetection(tmp_path / "img", ann_file, transforms=T.make_coco_transforms("val", scale=SCALE))
    assert set(val[0][1]) == {"boxes", "labels", "image_id", "area", "iscrowd", "orig_size", "size"}
    for epoch in range(3):
        plain.set_epoch(epoch)
        extra.set_epoch(epoch)
        for index in range(len(plain)):
            image_a, t_a = plain[index]
            image_b, t_b = extra[index]
            assert torch.equal(image_a, image_b)
            assert set(t_b) - set(t_a) == {"box_fields", "ext_boxes", "ext_labels", "ext_scores"}
            assert all(torch.equal(t_b[k], v) for k, v in t_a.items())
            # the copied GT boxes come first in the teacher set and survive exactly where the GT does;
            # the whole-image box survives every crop
            assert len(t_b["ext_boxes"]) == len(t_a["boxes"]) + 1
            assert torch.equal(t_b["ext_boxes"][:-1], t_a["boxes"])
            assert torch.equal(t_b["ext_labels"][:-1], t_a["labels"]) and t_b["ext_labels"][-1] == 0
            assert (t_b["ext_boxes"] >= 0).all() and (t_b["ext_boxes"] <= 1).all()
