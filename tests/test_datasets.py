"""Tests of datasets/: transforms, COCO-format reading and its bad-input handling, the synthetic
set, the COCO evaluator and the builders. Tiny data generated under tmp_path; CPU only."""
from __future__ import annotations

import argparse
import json
import logging
import random
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch.utils.data import DataLoader, Subset

import datasets
import datasets.coco_eval as coco_eval_module
import datasets.synthetic as synthetic
from datasets import transforms as T
from datasets.coco import AnnotationError, CocoDetection, load_coco
from datasets.coco_eval import CocoEvaluator
from util.misc import collate_fn

SPEC = synthetic.SyntheticSpec(image_size=64, train_size=8, val_size=4)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _target(boxes, labels=None):
    boxes = torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)
    n = len(boxes)
    return {"boxes": boxes, "labels": torch.arange(1, n + 1) if labels is None else torch.tensor(labels),
            "area": (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]),
            "iscrowd": torch.zeros(n, dtype=torch.int64)}


def _write_coco(root: Path, anns: list[dict], images: int = 3, size=(40, 30), categories=(1, 2)) -> Path:
    """A tiny COCO-format set: ``images`` RGB images of ``size`` (w, h) and the given annotations."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(1, images + 1):
        PIL.Image.new("RGB", size, (10 * i, 20, 30)).save(root / "img" / f"{i}.png")
        entries.append({"id": i, "file_name": f"{i}.png", "width": size[0], "height": size[1]})
    data = {"images": entries, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in categories]}
    ann_file = root / "ann.json"
    ann_file.write_text(json.dumps(data))
    return ann_file


def _ann(ann_id, image_id, bbox, category_id=1, **extra):
    return {"id": ann_id, "image_id": image_id, "bbox": bbox, "category_id": category_id, "area": 1.0,
            "iscrowd": 0, **extra}


def _args(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset_file", default="coco")
    parser.add_argument("--coco_path", default=None)
    parser.add_argument("--cache_mode", action="store_true")
    datasets.add_args(parser)
    args = parser.parse_args([])
    vars(args).update(kw)
    return args


def _synthetic_args(tmp_path: Path) -> argparse.Namespace:
    return _args(dataset_file="synthetic", coco_path=str(tmp_path / "syn"), synthetic_image_size=SPEC.image_size,
                 synthetic_train_size=SPEC.train_size, synthetic_val_size=SPEC.val_size)


def _tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("wh,size,max_size,expected", [
    ((640, 480), 800, 1333, (800, 1066)),     # shorter side -> 800, longer truncated
    ((1000, 500), 800, 1333, (666, 1332)),    # cap: size := round(1333 * 500 / 1000) = 666
    ((480, 640), 600, None, (800, 600)),      # portrait, no cap
    ((480, 643), 600, None, (803, 600)),      # 803.75 truncated, not rounded
    ((800, 600), 600, 1333, (600, 800)),      # shorter side already right: unchanged
])
def test_resize_rule(wh, size, max_size, expected):
    assert T.get_resize_shape(wh, size, max_size) == expected


def test_resize_scales_boxes_and_area():
    image = PIL.Image.new("RGB", (40, 20))
    target = _target([[4, 2, 20, 10]])
    out, t = T.resize(image, target, 40)
    assert out.size == (80, 40)
    assert torch.allclose(t["boxes"], torch.tensor([[8.0, 4.0, 40.0, 20.0]]))
    assert torch.allclose(t["area"], target["area"] * 4)
    assert t["size"].tolist() == [40, 80]


def test_hflip_boxes_and_pixels():
    image = PIL.Image.new("RGB", (10, 4))
    image.putpixel((0, 0), (255, 0, 0))
    out, t = T.hflip(image, _target([[1, 0, 3, 2]]))
    assert out.getpixel((9, 0)) == (255, 0, 0)
    assert t["boxes"].tolist() == [[7.0, 0.0, 9.0, 2.0]]


def test_crop_shifts_clips_and_drops_empty_boxes():
    image = PIL.Image.new("RGB", (20, 20))
    target = _target([[2, 2, 8, 8], [12, 12, 18, 18], [0, 0, 3, 3]], labels=[1, 2, 3])
    target["iscrowd"] = torch.tensor([0, 1, 0])
    out, t = T.crop(image, target, (5, 5, 10, 10))  # top, left, height, width
    assert out.size == (10, 10) and t["size"].tolist() == [10, 10]
    assert t["boxes"].tolist() == [[0.0, 0.0, 3.0, 3.0], [7.0, 7.0, 10.0, 10.0]]
    assert t["labels"].tolist() == [1, 2] and t["iscrowd"].tolist() == [0, 1]
    assert t["area"].tolist() == [9.0, 9.0]


def test_normalize_gives_cxcywh_in_unit_range():
    image = PIL.Image.new("RGB", (40, 20), (124, 116, 104))
    normalize = T.Compose([T.ToTensor(), T.Normalize(T.IMAGENET_MEAN, T.IMAGENET_STD)])
    tensor, t = normalize(image, _target([[0, 0, 20, 10]]))
    assert tensor.shape == (3, 20, 40) and tensor.abs().max() < 0.05
    assert torch.allclose(t["boxes"], torch.tensor([[0.25, 0.25, 0.5, 0.5]]))


def test_official_sizes_at_scale_one():
    train = T.make_coco_transforms("train")
    flip, select, _ = train.transforms
    assert select.first.sizes == list(T.TRAIN_SCALES) and select.first.max_size == 1333
    crop_resize, crop, last = select.second.transforms
    assert crop_resize.sizes == [400, 500, 600] and crop_resize.max_size is None
    assert (crop.min_size, crop.max_size) == (384, 600) and last.sizes == list(T.TRAIN_SCALES)
    val_resize = T.make_coco_transforms("val").transforms[0]
    assert val_resize.sizes == [800] and val_resize.max_size == 1333
    with pytest.raises(ValueError):
        T.make_coco_transforms("test")


def test_scaled_pipeline_is_sane_at_128px():
    scale = 128 / 800
    train = T.make_coco_transforms("train", scale=scale)
    select = train.transforms[1]
    assert select.first.sizes == [77, 82, 87, 92, 97, 102, 108, 113, 118, 123, 128] and select.first.max_size == 213
    crop_resize, crop, _ = select.second.transforms
    assert crop_resize.sizes == [64, 80, 96] and (crop.min_size, crop.max_size) == (61, 96)
    assert crop.min_size <= min(crop_resize.sizes)  # a crop never exceeds the image it cuts
    image = PIL.Image.new("RGB", (128, 128))
    tensor, t = T.make_coco_transforms("val", scale=scale)(image, _target([[0, 0, 64, 32]]))
    assert tensor.shape == (3, 128, 128) and t["size"].tolist() == [128, 128]
    random.seed(0)
    torch.manual_seed(0)
    for step in range(100):
        boxes = [[10, 10, 60, 50], [70, 80, 120, 126]] if step % 4 else []  # also images without objects
        tensor, t = train(image, _target(boxes))
        h, w = tensor.shape[-2:]
        assert 61 <= min(h, w) <= 128 and max(h, w) <= 213 and t["size"].tolist() == [h, w]
        assert ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all() and (t["boxes"][:, 2:] > 0).all()
        assert len(t["labels"]) == len(t["boxes"]) == len(t["area"]) == len(t["iscrowd"])


# ------------------------------------------------------------------------------------------------
# COCO-format reading and bad input
# ------------------------------------------------------------------------------------------------
def test_item_matches_official_target_contract(tmp_path):
    anns = [_ann(1, 1, [4, 3, 10, 6]), _ann(2, 1, [0, 0, 5, 5], category_id=2, iscrowd=1)]
    ds = CocoDetection(tmp_path / "img", _write_coco(tmp_path, anns), transforms=T.make_coco_transforms("val"))
    image, t = ds[0]
    assert image.dtype == torch.float32 and image.shape == (3, 800, 1066)
    assert set(t) == {"boxes", "labels", "image_id", "area", "iscrowd", "orig_size", "size"}
    assert t["labels"].tolist() == [1] and t["labels"].dtype == torch.int64  # crowd dropped, raw id kept
    assert t["boxes"].dtype == torch.float32 and t["area"].dtype == torch.float32
    assert torch.allclose(t["boxes"], torch.tensor([[9 / 40, 6 / 30, 10 / 40, 6 / 30]]))
    assert t["image_id"].tolist() == [1] and t["orig_size"].tolist() == [30, 40] and t["size"].tolist() == [800, 1066]
    assert t["iscrowd"].dtype == t["orig_size"].dtype == t["size"].dtype == torch.int64


@pytest.mark.parametrize("content,problem", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "expected a JSON object"),
    (json.dumps({"annotations": []}), "'images'"),
    (json.dumps({"images": []}), "'annotations'"),
    (json.dumps({"images": [{"id": 1}], "annotations": []}), "file_name"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}], "annotations": [{"id": 1, "image_id": 1,
                                                                               "category_id": 1}]}), "bbox"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}],
                 "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 2, 3]}]}), "bbox"),
    (json.dumps({"images": [{"id": 1, "file_name": "a.png"}, {"id": 1, "file_name": "b.png"}],
                 "annotations": []}), "duplicated image id"),
])
def test_bad_annotation_file_raises_at_build(tmp_path, content, problem):
    ann_file = tmp_path / "bad.json"
    ann_file.write_text(content)
    (tmp_path / "img").mkdir()
    with pytest.raises(AnnotationError, match=problem) as info:
        CocoDetection(tmp_path / "img", ann_file)
    assert str(ann_file) in str(info.value)


def test_missing_annotation_file_or_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        load_coco(tmp_path / "nope.json")
    ann_file = _write_coco(tmp_path, [])
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        CocoDetection(tmp_path / "no_such_folder", ann_file)


def test_bad_boxes_and_categories_are_dropped_counted_and_logged(tmp_path, caplog):
    anns = [
        _ann(1, 1, [1, 1, 10, 10]),
        _ann(2, 1, [1, 1, 0, 5]), _ann(3, 1, [1, 1, 5, -2]),        # zero / negative size
        _ann(4, 1, [35, 25, 10, 10]),                                # reaches outside: clamped
        _ann(5, 2, [50, 50, 5, 5]),                                  # wholly outside: dropped
        _ann(6, 2, [2, 2, 5, 5], category_id=7),                     # unknown category
        _ann(7, 99, [2, 2, 5, 5]),                                   # unknown image
    ]
    with caplog.at_level(logging.INFO, logger="datasets.coco"):
        coco = load_coco(_write_coco(tmp_path, anns))
    assert sorted(coco.anns) == [1, 4]
    assert coco.anns[4]["bbox"] == [35.0, 25.0, 5.0, 5.0]
    text = caplog.text
    assert "dropped 2 annotation(s) whose box has zero or negative" in text and "e.g. annotation id 2" in text
    assert "clamped 1 box(es)" in text and "e.g. annotation id 4" in text
    assert "dropped 1 annotation(s) whose box lies wholly outside" in text and "annotation id 5" in text
    assert "category_id not listed" in text and "annotation id 6" in text
    assert "image_id is not listed" in text and "annotation id 7" in text
    assert "2 image(s) without annotations (kept as negatives)" in text
    assert sum("zero or negative" in r.getMessage() for r in caplog.records) == 1  # once per file


def test_minimal_custom_file_gets_categories_area_and_iscrowd(tmp_path, caplog):
    ann_file = _write_coco(tmp_path, [{"id": 1, "image_id": 1, "bbox": [1, 2, 4, 5], "category_id": 3}])
    data = json.loads(ann_file.read_text())
    del data["categories"]
    ann_file.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        coco = load_coco(ann_file)
    assert "no 'categories' list" in caplog.text and list(coco.cats) == [3]
    assert coco.anns[1]["area"] == 20.0 and coco.anns[1]["iscrowd"] == 0
    evaluator = CocoEvaluator(coco)
    evaluator.update({1: {"scores": [0.9], "labels": [3], "boxes": [[1, 2, 5, 7]]}})
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.coco_eval["bbox"].stats[1] == pytest.approx(1.0)


def test_images_without_annotations_are_kept(tmp_path):
    ds = CocoDetection(tmp_path / "img", _write_coco(tmp_path, [_ann(1, 2, [1, 1, 5, 5])]),
                       transforms=T.make_coco_transforms("val", scale=0.05))
    assert len(ds) == 3
    _, t = ds[0]
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["image_id"].item() == 1


@pytest.mark.parametrize("damage", ["missing", "corrupt", "truncated"])
def test_unreadable_image_is_skipped_with_a_warning(tmp_path, caplog, damage):
    ann_file = _write_coco(tmp_path, [_ann(1, 1, [1, 1, 5, 5]), _ann(2, 2, [2, 2, 5, 5], category_id=2)])
    path = tmp_path / "img" / "1.png"
    if damage == "missing":
        path.unlink()
    elif damage == "corrupt":
        path.write_bytes(b"this is not an image")
    else:
        path.write_bytes(path.read_bytes()[:60])
    ds = CocoDetection(tmp_path / "img", ann_file)
    with caplog.at_level(logging.WARNING, logger="datasets.coco"):
        _, t = ds[0]
        assert t["image_id"].item() == 2 and t["labels"].tolist() == [2]  # the next readable image
        ds[0]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2 and all(str(path) in w for w in warnings)
    assert "1 image read(s) skipped so far" in warnings[0] and "2 image read(s) skipped so far" in warnings[1]
    assert ds.num_skipped == 2


def test_all_images_unreadable_raises(tmp_path):
    ann_file = _write_coco(tmp_path, [], images=2)
    for p in (tmp_path / "img").iterdir():
        p.write_bytes(b"")
    with pytest.raises(RuntimeError, match="none of the 2 images"):
        CocoDetection(tmp_path / "img", ann_file)[1]


def test_cache_mode_gives_the_same_items(tmp_path):
    ann_file = _write_coco(tmp_path, [_ann(1, 1, [1, 1, 5, 5])])
    plain = CocoDetection(tmp_path / "img", ann_file, transforms=T.make_coco_transforms("val", scale=0.05))
    cached = CocoDetection(tmp_path / "img", ann_file, transforms=T.make_coco_transforms("val", scale=0.05),
                           cache_mode=True)
    (tmp_path / "img" / "1.png").unlink()  # served from memory now
    a, b = plain[1], cached[0]
    assert torch.equal(cached[1][0], a[0]) and b[1]["image_id"].item() == 1


# ------------------------------------------------------------------------------------------------
# synthetic set
# ------------------------------------------------------------------------------------------------
def test_synthetic_generation_is_deterministic(tmp_path):
    synthetic.generate(tmp_path / "a", SPEC)
    synthetic.generate(tmp_path / "b", SPEC)
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert len(a) == SPEC.train_size + SPEC.val_size + 3 and a == b
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporary folders left


def test_synthetic_annotations_are_sane(tmp_path):
    synthetic.generate(tmp_path / "s", SPEC)
    data = json.loads((tmp_path / "s" / "annotations" / "instances_train2017.json").read_text())
    assert [c["id"] for c in data["categories"]] == [1, 2, 3, 4, 5] and len(data["images"]) == SPEC.train_size
    per_image = {}
    for a in data["annotations"]:
        x, y, w, h = a["bbox"]
        assert 0 <= x and 0 <= y and x + w <= SPEC.image_size and y + h <= SPEC.image_size
        assert w >= 4 and h >= 4 and 0 < a["area"] <= w * h + 1e-6 and a["category_id"] in range(1, 6)
        per_image[a["image_id"]] = per_image.get(a["image_id"], 0) + 1
    assert len(per_image) == SPEC.train_size and all(1 <= n <= synthetic.MAX_OBJECTS for n in per_image.values())


def test_synthetic_regenerates_on_manifest_mismatch(tmp_path, caplog):
    root = tmp_path / "s"
    synthetic.ensure_synthetic(root, SPEC)
    stamp = (root / "manifest.json").stat().st_mtime_ns
    synthetic.ensure_synthetic(root, SPEC)  # ready: untouched
    assert (root / "manifest.json").stat().st_mtime_ns == stamp
    other = synthetic.SyntheticSpec(image_size=48, train_size=3, val_size=2)
    with caplog.at_level(logging.INFO, logger="datasets.synthetic"):
        synthetic.ensure_synthetic(root, other)
    assert "generated with other parameters" in caplog.text and synthetic.is_ready(root, other)
    assert len(list((root / "train2017").iterdir())) == 3


def test_synthetic_refuses_to_overwrite_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(RuntimeError, match="refusing to overwrite"):
        synthetic.ensure_synthetic(tmp_path / "mine", SPEC)


def test_synthetic_spec_rejects_unusable_sizes():
    with pytest.raises(ValueError, match="at least"):
        synthetic.SyntheticSpec(image_size=16)
    with pytest.raises(ValueError, match="positive"):
        synthetic.SyntheticSpec(val_size=0)


def test_synthetic_crash_halfway_leaves_nothing_half_written(tmp_path, monkeypatch):
    root = tmp_path / "s"
    calls = {"n": 0}
    real = synthetic.render_image

    def flaky(rng, size):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(rng, size)

    monkeypatch.setattr(synthetic, "render_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        synthetic.ensure_synthetic(root, SPEC)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(synthetic, "render_image", real)
    synthetic.ensure_synthetic(root, SPEC)
    assert synthetic.is_ready(root, SPEC)


def test_synthetic_dataloader_with_collate_fn(tmp_path):
    args = _synthetic_args(tmp_path)
    ds = datasets.build_dataset("train", args)
    assert datasets.num_classes_for(args) == 6 and len(ds) == SPEC.train_size
    loader = DataLoader(ds, batch_size=4, shuffle=False, collate_fn=collate_fn, num_workers=0)
    for samples, targets in loader:
        images, mask = samples.decompose()
        assert images.shape[:2] == (4, 3) and mask.shape == (4, *images.shape[-2:]) and len(targets) == 4
        for img_mask, t in zip(mask, targets):
            h, w = t["size"].tolist()
            assert not img_mask[:h, :w].any() and img_mask.sum() == mask.shape[1] * mask.shape[2] - h * w
            assert len(t["boxes"]) == len(t["labels"]) and ((t["boxes"] >= 0) & (t["boxes"] <= 1)).all()
    val = datasets.build_dataset("val", args)
    image, t = val[0]
    assert image.shape == (3, 64, 64) and t["orig_size"].tolist() == [64, 64]


# ------------------------------------------------------------------------------------------------
# evaluator
# ------------------------------------------------------------------------------------------------
def _gt_and_perfect_predictions(tmp_path):
    synthetic.generate(tmp_path / "s", SPEC)
    coco = load_coco(tmp_path / "s" / "annotations" / "instances_val2017.json")
    return coco, _perfect_predictions(coco)


def _perfect_predictions(coco):
    predictions = {}
    for image_id in coco.getImgIds():
        anns = coco.imgToAnns[image_id]
        boxes = torch.tensor([a["bbox"] for a in anns])
        boxes[:, 2:] += boxes[:, :2]
        labels = torch.tensor([a["category_id"] for a in anns])
        predictions[image_id] = {"scores": torch.ones(len(anns)), "labels": labels, "boxes": boxes}
    return predictions


def _imperfect_predictions(coco):
    predictions = _perfect_predictions(coco)
    ids = sorted(predictions)
    for i in ids[1:]:
        predictions[i]["scores"] = torch.full_like(predictions[i]["scores"], 0.5)
    # The top-scored image is imperfect, so AP < 1 and a doubled copy of it would lower AP further.
    predictions[ids[0]]["boxes"] = predictions[ids[0]]["boxes"] + 3.0
    return predictions


def test_evaluator_perfect_predictions_give_ap_one(tmp_path, capsys):
    coco, predictions = _gt_and_perfect_predictions(tmp_path)
    evaluator = CocoEvaluator(coco, ("bbox",))
    evaluator.update(predictions)
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    stats = evaluator.coco_eval["bbox"].stats
    assert len(stats) == 12 and stats[0] == pytest.approx(1.0) and stats[1] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert out.count("Average Precision") == 6 and "index" not in out and "Loading" not in out


def test_evaluator_without_detections(tmp_path):
    coco, predictions = _gt_and_perfect_predictions(tmp_path)
    evaluator = CocoEvaluator(coco)
    evaluator.update({i: {"scores": [], "labels": [], "boxes": np.zeros((0, 4))} for i in predictions})
    evaluator.synchronize_between_processes()
    evaluator.accumulate()
    evaluator.summarize()
    assert evaluator.coco_eval["bbox"].stats[0] == 0.0
    empty = CocoEvaluator(coco)
    empty.accumulate()
    empty.summarize()
    assert (empty.coco_eval["bbox"].stats == -1).all()


def test_evaluator_gathers_each_image_once(tmp_path, monkeypatch):
    coco, _ = _gt_and_perfect_predictions(tmp_path)
    predictions = _imperfect_predictions(coco)
    ids = sorted(predictions)
    single = CocoEvaluator(coco)
    single.update(predictions)
    single.accumulate()
    single.summarize()
    # Two "processes", the second padded with a repeat of the first's image (as DistributedSampler does).
    rank0 = {i: predictions[i] for i in ids[::2]}
    rank1 = {i: predictions[i] for i in ids[1::2] + [ids[0]]}
    parts = []
    for part in (rank0, rank1):
        ev = CocoEvaluator(coco)
        ev.update(part)
        parts.append(ev._detections)
    monkeypatch.setattr(coco_eval_module, "all_gather_object", lambda obj: parts)
    multi = CocoEvaluator(coco)
    multi.synchronize_between_processes()
    multi.accumulate()
    multi.summarize()
    assert single.coco_eval["bbox"].stats[0] < 1.0
    np.testing.assert_array_equal(single.coco_eval["bbox"].stats, multi.coco_eval["bbox"].stats)


# ------------------------------------------------------------------------------------------------
# builders
# ------------------------------------------------------------------------------------------------
def test_add_args_defaults():
    args = _args()
    assert (args.synthetic_image_size, args.synthetic_train_size, args.synthetic_val_size) == (128, 2000, 200)
    assert args.train_img_folder is args.train_ann_file is args.val_img_folder is args.val_ann_file is None


def test_build_coco_with_explicit_paths_and_num_classes(tmp_path):
    ann_file = _write_coco(tmp_path, [_ann(1, 1, [1, 1, 5, 5], category_id=12)], categories=(1, 12))
    args = _args(coco_path=str(tmp_path / "absent"), train_img_folder=str(tmp_path / "img"),
                 train_ann_file=str(ann_file))
    ds = datasets.build_dataset("train", args)
    assert len(ds) == 3 and datasets.num_classes_for(args) == 13
    assert datasets.num_classes_for(args, Subset(ds, [0])) == 13
    assert datasets.get_coco_api_from_dataset(Subset(Subset(ds, [0, 1]), [0])) is ds.coco
    assert datasets.num_classes_for(_args(coco_path=str(tmp_path / "absent"))) == 91  # official default
    with pytest.raises(FileNotFoundError):
        datasets.build_dataset("val", args)
    with pytest.raises(ValueError, match="image_set"):
        datasets.build_dataset("test", args)
    with pytest.raises(ValueError, match="dataset_file"):
        datasets.build_dataset("train", _args(dataset_file="voc"))


def test_coco_path_layout_and_synthetic_default_root(tmp_path, monkeypatch):
    root = tmp_path / "coco"
    (root / "annotations").mkdir(parents=True)
    _write_coco(root, [_ann(1, 1, [1, 1, 5, 5])])
    (root / "img").rename(root / "val2017")
    (root / "ann.json").rename(root / "annotations" / "instances_val2017.json")
    assert len(datasets.build_dataset("val", _args(coco_path=str(root)))) == 3
    monkeypatch.chdir(tmp_path)
    args = _synthetic_args(tmp_path)
    args.coco_path = None
    datasets.build_dataset("val", args)
    assert synthetic.is_ready(tmp_path / "data" / "synthetic", SPEC)


def _generation_forbidden(*args, **kwargs):
    raise AssertionError("a rank other than 0 generated the synthetic set")


def _distributed_worker(rank: int, init_file: str, root: str, result_file: str) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        if rank != 0:  # only rank 0 may generate; the others wait for it (a forked process: no leak)
            synthetic.generate = _generation_forbidden
        synthetic.ensure_synthetic(root, SPEC)
        coco = load_coco(Path(root) / "annotations" / "instances_val2017.json")
        predictions = _imperfect_predictions(coco)
        ids = sorted(predictions)
        part = ids[rank::2] + ([ids[0]] if rank == 1 else [])  # rank 1 padded with a repeat, as DistributedSampler
        evaluator = CocoEvaluator(coco)
        evaluator.update({i: predictions[i] for i in part})
        evaluator.synchronize_between_processes()
        evaluator.accumulate()
        evaluator.summarize()
        if rank == 0:
            np.save(result_file, evaluator.coco_eval["bbox"].stats)
        torch.distributed.barrier()  # no rank tears gloo down while the other still talks to it
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_generation_and_evaluation(tmp_path):
    root, result = tmp_path / "s", tmp_path / "stats.npy"
    torch.multiprocessing.start_processes(_distributed_worker, args=(str(tmp_path / "init"), str(root), str(result)),
                                         nprocs=2, start_method="fork")
    assert synthetic.is_ready(root, SPEC)
    coco = load_coco(root / "annotations" / "instances_val2017.json")
    single = CocoEvaluator(coco)
    single.update(_imperfect_predictions(coco))
    single.accumulate()
    single.summarize()
    np.testing.assert_array_equal(np.load(result), single.coco_eval["bbox"].stats)
