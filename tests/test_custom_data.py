"""Custom data as users bring it (#18): input size flags, the scale hint, --contiguous_classes, inspect_dataset.

Tiny COCO-format sets are written under tmp_path; CPU only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

import datasets
import main as train_main
from datasets import transforms as T
from engine import evaluate
from flags import finalize_args, get_args_parser
from models.deformable_detr import PostProcess
from tests.conftest import TINY, tiny_args
from util.checkpoint import load_checkpoint
from util.misc import collate_fn
from util.validation import flag_problems

SPARSE_IDS = (1001, 2002, 3003)


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def _write_set(root: Path, name: str, category_ids=SPARSE_IDS, images: int = 6, size=(48, 40),
               listed=None, extra_anns=()) -> tuple[Path, Path]:
    """``images`` images of ``size`` (w, h) with 1-3 boxes each of the given ids; returns (folder, ann file)."""
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(len(name))
    entries, anns = [], []
    w, h = size
    for i in range(1, images + 1):
        PIL.Image.new("RGB", size, (20 * i % 255, 90, 160)).save(folder / f"{i}.png")
        entries.append({"id": i, "file_name": f"{i}.png", "width": w, "height": h})
        for _ in range(1 + i % 3):
            bw, bh = rng.randint(6, w // 2), rng.randint(6, h // 2)
            x, y = rng.randint(0, w - bw), rng.randint(0, h - bh)
            anns.append({"id": len(anns) + 1, "image_id": i, "bbox": [x, y, bw, bh], "area": bw * bh,
                         "iscrowd": 0, "category_id": category_ids[(i + len(anns)) % len(category_ids)]})
    anns += [dict(a, id=len(anns) + k + 1) for k, a in enumerate(extra_anns)]
    listed = category_ids if listed is None else listed
    data = {"images": entries, "annotations": anns, "categories": [{"id": c, "name": f"c{c}"} for c in listed]}
    ann_file = root / f"{name}.json"
    ann_file.write_text(json.dumps(data))
    return folder, ann_file


def _args(*extra: str, train=None, val=None) -> argparse.Namespace:
    """The full parser's flags (main.py's) for a custom COCO-format set."""
    flags = ["--dataset_file", "coco", "--coco_path", "/nonexistent"]
    for split, paths in (("train", train), ("val", val)):
        if paths is not None:
            flags += [f"--{split}_img_folder", str(paths[0]), f"--{split}_ann_file", str(paths[1])]
    return tiny_args(*flags, *extra)


def _pipeline_sizes(train: T.Compose, val: T.Compose) -> T.InputSizes:
    """Read the sizes back out of built pipelines (checks the transforms, not only the flag parsing)."""
    flip, select, normalize = train.transforms
    crop_resize, crop, last = select.second.transforms
    assert isinstance(flip, T.RandomHorizontalFlip) and isinstance(normalize, T.Compose)
    assert select.first.sizes == last.sizes and select.first.max_size == last.max_size
    assert crop_resize.max_size is None
    (val_resize, _) = val.transforms
    assert len(val_resize.sizes) == 1
    return T.InputSizes(train_scales=tuple(select.first.sizes), train_max_size=select.first.max_size,
                        crop_scales=tuple(crop_resize.sizes), crop_min=crop.min_size, crop_max=crop.max_size,
                        val_size=val_resize.sizes[0], val_max_size=val_resize.max_size)


def _built_sizes(args: argparse.Namespace) -> T.InputSizes:
    sizes = datasets.input_sizes(args)
    return _pipeline_sizes(T.make_coco_transforms("train", sizes=sizes), T.make_coco_transforms("val", sizes=sizes))


# ------------------------------------------------------------------------------------------------
# input sizes
# ------------------------------------------------------------------------------------------------
OFFICIAL = T.InputSizes()


@pytest.mark.parametrize("flags,changed", [
    ([], {}),
    (["--input_scale", "1"], {}),
    (["--train_scales", "96", "128"], {"train_scales": (96, 128)}),
    (["--train_max_size", "200"], {"train_max_size": 200}),
    (["--crop_scales", "50", "60"], {"crop_scales": (50, 60)}),
    (["--crop_size", "40", "55"], {"crop_min": 40, "crop_max": 55}),
    (["--val_size", "112"], {"val_size": 112}),
    (["--val_max_size", "190"], {"val_max_size": 190}),
])
def test_explicit_size_flags_change_only_their_size(flags, changed):
    assert _built_sizes(_args(*flags)) == dataclasses.replace(OFFICIAL, **changed)


def test_input_scale_multiplies_every_official_size():
    sizes = _built_sizes(_args("--input_scale", "0.16"))
    assert sizes == T.InputSizes(train_scales=(77, 82, 87, 92, 97, 102, 108, 113, 118, 123, 128), train_max_size=213,
                                 crop_scales=(64, 80, 96), crop_min=61, crop_max=96, val_size=128, val_max_size=213)
    assert sizes == T.InputSizes.scaled(0.16)
    # The synthetic set's internal scale is the same mechanism: 128 px images give the same sizes ...
    synthetic = tiny_args("--dataset_file", "synthetic", "--synthetic_image_size", "128")
    assert datasets.input_sizes(synthetic) == sizes
    # ... --input_scale replaces it there, and explicit sizes win over the scale for their own size only.
    assert datasets.input_sizes(tiny_args("--dataset_file", "synthetic", "--input_scale", "1")) == OFFICIAL
    both = _built_sizes(_args("--input_scale", "0.16", "--val_size", "100", "--train_scales", "90"))
    assert both == dataclasses.replace(sizes, val_size=100, train_scales=(90,))


def test_size_flags_leave_everything_else_unchanged():
    """Explicit flags equal to the official sizes give the official pipeline: same outputs, same random draws."""
    official = [f"{s}" for s in T.TRAIN_SCALES]
    args = _args("--train_scales", *official, "--train_max_size", "1333", "--crop_scales", "400", "500", "600",
                 "--crop_size", "384", "600", "--val_size", "800", "--val_max_size", "1333")
    image = PIL.Image.new("RGB", (500, 420), (10, 200, 30))
    for split in ("train", "val"):
        reference = T.make_coco_transforms(split)
        flagged = T.make_coco_transforms(split, sizes=datasets.input_sizes(args))
        for step in range(6):
            outs = []
            for pipeline in (reference, flagged):
                random.seed(step)
                torch.manual_seed(step)
                target = {"boxes": torch.tensor([[10.0, 20.0, 300.0, 400.0]]), "labels": torch.tensor([3]),
                          "area": torch.tensor([290.0 * 380.0]), "iscrowd": torch.tensor([0])}
                outs.append(pipeline(image, target))
            assert torch.equal(outs[0][0], outs[1][0])
            assert all(torch.equal(outs[0][1][k], outs[1][1][k]) for k in outs[0][1])


def test_size_flags_reach_the_built_data_set(tmp_path):
    val = _write_set(tmp_path, "val", size=(40, 30))
    image, target = datasets.build_dataset("val", _args("--val_size", "60", val=val))[0]
    assert image.shape[-2:] == (60, 80) and target["size"].tolist() == [60, 80]
    image, _ = datasets.build_dataset("val", _args("--input_scale", "0.05", val=val))[0]
    assert image.shape[-2:] == (40, 53)  # shorter side 800 * 0.05


@pytest.mark.parametrize("flags,message", [
    (["--input_scale", "0"], "--input_scale must be > 0"),
    (["--train_scales", "128", "0"], "--train_scales must be positive"),
    (["--crop_size", "90", "60"], "MIN <= MAX"),
    (["--val_size", "0"], "--val_size must be >= 1"),
])
def test_impossible_size_flags_are_refused(flags, message):
    assert any(message in p for p in flag_problems(tiny_args(*flags)))


# ------------------------------------------------------------------------------------------------
# image size statistics and the --input_scale hint
# ------------------------------------------------------------------------------------------------
def _train_log(caplog, args) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="datasets"):
        datasets.build_dataset("train", args)
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "datasets")


def test_scale_hint_for_small_images_only(tmp_path, caplog):
    small = _write_set(tmp_path, "small", size=(128, 128), images=3)
    log = _train_log(caplog, _args(train=small))
    assert "shorter side min/median/max 128/128/128 px" in log
    assert "upsampled more than 2x" in log and "--input_scale 0.16" in log
    assert "upsampled" not in _train_log(caplog, _args("--input_scale", "0.16", train=small))
    coco_sized = _write_set(tmp_path, "coco_sized", size=(640, 480), images=3)
    log = _train_log(caplog, _args(train=coco_sized))
    assert "shorter side min/median/max 480/480/480 px" in log and "upsampled" not in log


# ------------------------------------------------------------------------------------------------
# --contiguous_classes
# ------------------------------------------------------------------------------------------------
def test_contiguous_classes_training_targets(tmp_path):
    train = _write_set(tmp_path, "train")
    # The val file lists its categories in another order and omits one: labels still follow the training file.
    val = _write_set(tmp_path, "val", category_ids=(3003, 1001), listed=(3003, 1001))
    args = _args("--contiguous_classes", train=train, val=val)
    ds_train, ds_val = datasets.build_dataset("train", args), datasets.build_dataset("val", args)
    assert datasets.label_category_ids(ds_train) == datasets.label_category_ids(ds_val) == list(SPARSE_IDS)
    assert datasets.num_classes_for(args) == datasets.num_classes_for(args, ds_train) == 3
    assert sorted(ds_val.coco.getCatIds()) == [1001, 3003]  # evaluation keeps the file's ids
    assert all(set(ds_train[i][1]["labels"].tolist()) <= {0, 1, 2} for i in range(len(ds_train)))
    # Without augmentation every box survives: label i is the training file's i-th smallest id, in both splits.
    exact = _args("--contiguous_classes", "--train_transforms", "val", train=train, val=val)
    for ds in (datasets.build_dataset("train", exact), ds_val):
        for i in range(len(ds)):
            raw = [a["category_id"] for a in ds.coco.imgToAnns[ds.ids[i]]]
            assert [SPARSE_IDS[j] for j in ds[i][1]["labels"].tolist()] == raw
    # The official rule stays the default: raw ids, max id + 1 logits.
    plain = _args(train=train, val=val)
    assert datasets.num_classes_for(plain) == 3004 and datasets.label_category_ids(datasets.build_dataset(
        "train", plain)) is None
    assert set(datasets.build_dataset("val", plain)[0][1]["labels"].tolist()) <= set(SPARSE_IDS)
    bad = _write_set(tmp_path, "bad", category_ids=(1001, 4004))
    with pytest.raises(ValueError, match="4004"):
        datasets.build_dataset("val", _args("--contiguous_classes", train=train, val=bad))


class _Replay(nn.Module):
    """Returns precomputed outputs batch after batch (the loader is sequential)."""

    def __init__(self, outputs: list[dict]) -> None:
        super().__init__()
        self.outputs = outputs
        self.calls = 0

    def forward(self, samples):
        out = self.outputs[self.calls]
        self.calls += 1
        return out


class _NoCriterion(nn.Module):
    weight_dict: dict = {}


def _predictions(dataset, batch_size: int, num_classes: int) -> list[dict]:
    """Per batch: each ground-truth box jittered with its label, plus a wrong-label copy and a stray box."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for start in range(0, len(dataset), batch_size):
        logits, boxes = [], []
        for i in range(start, min(start + batch_size, len(dataset))):
            target = dataset[i][1]
            n = len(target["labels"])
            box = (target["boxes"] + 0.03 * torch.randn(n, 4, generator=g)).clamp(0.01, 0.99)
            logit = torch.full((3 * n, num_classes), -8.0)
            logit[torch.arange(n), target["labels"]] = torch.rand(n, generator=g) * 4
            logit[n + torch.arange(n), (target["labels"] + 1) % num_classes] = torch.rand(n, generator=g) * 4 - 1
            stray = torch.rand(n, 4, generator=g) * 0.5 + 0.25
            boxes.append(torch.cat([box, box, stray]))
            logits.append(logit)
        q = max(len(b) for b in boxes)
        batches.append({"pred_logits": torch.stack([nn.functional.pad(x, (0, 0, 0, q - len(x)), value=-9.0)
                                                    for x in logits]),
                        "pred_boxes": torch.stack([nn.functional.pad(x, (0, 0, 0, q - len(x)), value=0.5)
                                                   for x in boxes])})
    return batches


def _evaluate(dataset, outputs):
    loader = DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=collate_fn)
    stats, evaluator = evaluate(_Replay(outputs), _NoCriterion(), {"bbox": PostProcess()}, loader,
                                datasets.get_coco_api_from_dataset(dataset), torch.device("cpu"), print_freq=100,
                                compute_losses=False)
    return np.array(stats["coco_eval_bbox"]), evaluator


def test_contiguous_classes_evaluation_equals_hand_remapped_ids(tmp_path):
    sparse = _write_set(tmp_path, "sparse", images=8)
    data = json.loads(sparse[1].read_text())
    remap = {c: i for i, c in enumerate(SPARSE_IDS)}  # by hand: ids 0..2, the official raw-id rule
    data["categories"] = [{**c, "id": remap[c["id"]]} for c in data["categories"]]
    data["annotations"] = [{**a, "category_id": remap[a["category_id"]]} for a in data["annotations"]]
    by_hand = tmp_path / "by_hand.json"
    by_hand.write_text(json.dumps(data))

    contiguous = datasets.build_dataset("val", _args("--contiguous_classes", "--val_size", "48", val=sparse))
    official = datasets.build_dataset("val", _args("--val_size", "48", val=(sparse[0], by_hand)))
    assert datasets.num_classes_for(_args("--contiguous_classes", train=sparse)) == 3
    for i in range(len(official)):
        assert torch.equal(contiguous[i][1]["labels"], official[i][1]["labels"])
    outputs = _predictions(official, 2, num_classes=3)
    stats_contiguous, evaluator = _evaluate(contiguous, outputs)
    stats_by_hand, _ = _evaluate(official, outputs)
    assert 0.05 < stats_by_hand[0] < 0.95  # neither trivial nor empty
    np.testing.assert_array_equal(stats_contiguous, stats_by_hand)
    predicted = {d["category_id"] for dets in evaluator._detections.values() for d in dets}
    assert predicted == set(SPARSE_IDS)  # predictions carry the file's ids


def test_contiguous_classes_train_then_eval_resume(tmp_path):
    """End to end: C logits for sparse ids, and --eval --resume maps back the same way (pure function of the file)."""
    train, val = _write_set(tmp_path, "train", images=4), _write_set(tmp_path, "val", images=2)
    flags = [f for f in TINY if f not in ("--num_classes", "5")] + [
        "--train_img_folder", str(train[0]), "--train_ann_file", str(train[1]), "--val_img_folder", str(val[0]),
        "--val_ann_file", str(val[1]), "--contiguous_classes", "--input_scale", "0.08", "--batch_size", "2",
        "--num_workers", "0", "--epochs", "1", "--output_dir", str(tmp_path / "out"), "--backbone_from_scratch"]
    stats = train_main.main(finalize_args(get_args_parser().parse_args(flags)))
    ckpt = load_checkpoint(tmp_path / "out" / "checkpoint.pth")
    assert ckpt["args"]["num_classes"] == 3 and ckpt["args"]["contiguous_classes"]
    assert ckpt["model"]["class_embed.0.weight"].shape[0] == 3
    again = train_main.main(finalize_args(get_args_parser().parse_args(
        flags + ["--eval", "--resume", str(tmp_path / "out" / "checkpoint.pth")])))
    assert again["test_coco_eval_bbox"] == pytest.approx(stats["test_coco_eval_bbox"], abs=1e-9)


# ------------------------------------------------------------------------------------------------
# tools/inspect_dataset.py
# ------------------------------------------------------------------------------------------------
def test_inspect_dataset_writes_png_and_reports(tmp_path, capsys):
    from tools import inspect_dataset

    degenerate = {"image_id": 1, "bbox": [5, 5, 0, 4], "area": 0, "iscrowd": 0, "category_id": 1001}
    crowd = {"image_id": 2, "bbox": [1, 1, 30, 20], "area": 600, "iscrowd": 1, "category_id": 2002}
    train = _write_set(tmp_path, "train", size=(128, 96), extra_anns=(degenerate, crowd))
    val = _write_set(tmp_path, "val", size=(128, 96))
    (train[0] / "6.png").unlink()  # an image missing on disk
    out = tmp_path / "look" / "data.png"
    lines = inspect_dataset.main([
        "--train_img_folder", str(train[0]), "--train_ann_file", str(train[1]), "--val_img_folder", str(val[0]),
        "--val_ann_file", str(val[1]), "--coco_path", "/nonexistent", "--contiguous_classes", "--output", str(out),
        "--num_images", "4"])
    text = "\n".join(lines)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with PIL.Image.open(out) as png:
        assert png.width > 200 and png.height > 200
    assert "== train" in text and "== val" in text and "images: 6" in text
    assert "label   0 id  1001" in text and "per image mean" in text
    assert "small" in text and "medium" in text and "large" in text
    assert text.count("zero or negative width/height") == 1 and "1 crowd annotation" in text
    assert "1 image(s) missing on disk" in text
    assert "HINT" in text and "--input_scale 0.12" in text
    assert capsys.readouterr().out.count("== ") == 2
