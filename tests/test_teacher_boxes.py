"""Teacher-box files (Teach-DETR): both formats, bad entries, refused files, and the training data path.

Files are written under tmp_path; the data set is a tiny synthetic one (64 px). CPU only.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
import torchvision

import datasets
import datasets.transforms as T
from datasets.seeded import SeededDataset
from datasets.teacher_boxes import (
    BAD_KINDS,
    Detections,
    TeacherBoxes,
    TeacherFileError,
    load_teacher_boxes,
    read_teacher_file,
    write_teacher_file,
)
from datasets.teacher_merge import MERGED_KEY, TeacherMerge
from datasets.transforms import add_box_set
from models.addons.teach import merged_targets
from tests.conftest import tiny_args

EXT_KEYS = {"ext_boxes", "ext_labels", "ext_scores", "ext_teacher", "box_fields"}


def _random_detections(seed: int, images: int = 40, per_image: int = 7) -> list[dict]:
    rng = np.random.default_rng(seed)
    out = []
    for image_id in rng.choice(10_000, images, replace=False).tolist():
        for _ in range(int(rng.integers(0, per_image + 1))):
            x, y, w, h = (rng.random(4) * [600, 400, 200, 150] + [0, 0, 0.5, 0.5]).round(3).tolist()
            out.append({"image_id": image_id, "bbox": [x, y, w, h], "category_id": int(rng.integers(1, 91)),
                        "score": round(float(rng.random()), 5)})
    return out


def _released(results: list[dict]) -> dict[str, list]:
    per_image: dict[str, list] = {}
    for r in results:
        per_image.setdefault(str(r["image_id"]), []).append({k: v for k, v in r.items() if k != "image_id"})
    return per_image


def _assert_same(a: Detections, b: Detections) -> None:
    order_a, order_b = np.argsort(a.image_ids, kind="stable"), np.argsort(b.image_ids, kind="stable")
    for field in ("image_ids", "boxes", "category_ids", "scores"):
        assert np.array_equal(getattr(a, field)[order_a], getattr(b, field)[order_b]), field


@pytest.mark.parametrize("piece_bytes", [64, 1 << 20])
def test_both_formats_load_to_the_same_arrays(tmp_path, piece_bytes):
    results = _random_detections(0)
    (tmp_path / "coco.json").write_text(" " * 100 + "\n" + json.dumps(results))  # leading blanks
    # the released layout, pretty-printed, with an extra key per detection (ignored) and an empty image
    released = {**_released([{**r, "extra": [1, {"x": 2}]} for r in results]), "123456": []}
    (tmp_path / "released.json").write_text(json.dumps(released, indent=2))
    a = read_teacher_file(tmp_path / "coco.json", piece_bytes=piece_bytes)
    b = read_teacher_file(tmp_path / "released.json", piece_bytes=piece_bytes)
    assert len(a) == len(results) and a.malformed == b.malformed == 0
    # images with an entry: the released format keeps an empty list as an entry, the coco format has none
    assert a.entry_ids.tolist() == sorted({r["image_id"] for r in results})
    assert b.entry_ids.tolist() == sorted({r["image_id"] for r in results} | {123456})
    assert a.boxes.dtype == np.float32 and a.scores.dtype == np.float32 and a.category_ids.dtype == np.int64
    assert np.array_equal(a.image_ids, [r["image_id"] for r in results])  # file order kept
    assert np.array_equal(a.boxes, np.array([r["bbox"] for r in results], dtype=np.float32))
    _assert_same(a, b)
    # written back in either format, it reads the same
    for fmt in ("released", "coco"):
        write_teacher_file(tmp_path / f"out_{fmt}.json", a, fmt)
        _assert_same(a, read_teacher_file(tmp_path / f"out_{fmt}.json", piece_bytes=piece_bytes))


def test_csr_storage_and_lookup():
    d0 = Detections(np.array([5, 2, 5]), np.arange(12, dtype=np.float32).reshape(3, 4) + 1, np.array([1, 2, 3]),
                    np.array([0.1, 0.2, 0.3], np.float32))
    d1 = Detections(np.array([2]), np.ones((1, 4), np.float32), np.array([4]), np.array([0.9], np.float32))
    tb = TeacherBoxes.from_detections(["a", "b"], [d0, d1])
    assert tb.image_ids.tolist() == [2, 5] and tb.offsets.tolist() == [0, 2, 4]
    assert tb.teacher.tolist() == [0, 1, 0, 0] and tb.labels.tolist() == [2, 4, 1, 3]  # teacher by teacher
    assert tb.rows(5) == slice(2, 4) and tb.rows(3) == slice(0, 0) and tb.rows(99) == slice(0, 0)
    assert tb.nbytes == sum(a.nbytes for a in (tb.image_ids, tb.offsets, tb.boxes, tb.labels, tb.scores, tb.teacher,
                                               *tb.entries))
    assert tb.teacher.dtype == np.int8 and tb.boxes.dtype == np.float32
    # entries (none given: the images with boxes); teacher b also has an (empty) entry for image 7
    assert [e.tolist() for e in tb.entries] == [[2, 5], [2]]
    assert [tb.teachers_with_entry(i) for i in (2, 5, 3)] == [2, 1, 0]
    d1.entry_ids = np.array([2, 7])
    tb = TeacherBoxes.from_detections(["a", "b"], [d0, d1])
    assert [tb.teachers_with_entry(i) for i in (2, 5, 7, 3)] == [2, 1, 1, 0]


def test_every_bad_entry_kind_is_counted_once_per_file(tmp_path, caplog):
    good = {"bbox": [1, 1, 5, 5], "category_id": 1, "score": 0.5}
    released = {
        "1": [good, {**good, "bbox": [1, 1, 0, 5]}, {**good, "bbox": [1, 1, 5, -2]},  # 2 degenerate
              {**good, "score": float("nan")}, {**good, "bbox": [1, float("inf"), 2, 2]},  # 2 non-finite
              {**good, "category_id": 77},  # unknown category
              {**good, "bbox": [20, 1, 5, 5]},  # wholly outside the 16 x 16 image
              {"bbox": [1, 1, 5], "category_id": 1, "score": 0.5}, {**good, "score": "high"}, "box",  # 3 malformed
              {k: v for k, v in good.items() if k != "score"}],  # malformed
        "2": [good],
        "999": [good, good],  # unknown image (2)
        "x": [good],  # malformed key
    }
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(released))  # NaN/Infinity as Python's json writes them
    with caplog.at_level(logging.INFO, logger="datasets.teacher_boxes"):
        tb = load_teacher_boxes({"t": path}, [1, 2], sizes=[[16, 16], [16, 16]], category_ids=[1, 2])
    lines = [r for r in caplog.records if str(path) in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    message = lines[0].getMessage()
    for count, kind in ((5, "malformed"), (2, "non_finite"), (2, "degenerate"), (2, "unknown_image"),
                        (1, "unknown_category"), (1, "outside")):
        assert f"{count} {BAD_KINDS[kind].split(' (')[0]}" in message, (kind, message)
    assert "2 box(es) kept of 15 entries" in message
    assert tb.image_ids.tolist() == [1, 2] and len(tb) == 2


@pytest.mark.parametrize("content, match", [
    (b"\x89PNG\r\n\x1a\n\x00\x00", "is not JSON detections"),
    (b"", "is not JSON detections"),
    (b'"just a string"', "is not JSON detections"),
    (b'[{"image_id": 1, "bbox": [1, 2, 3, 4], "category_id": 1, "score": 0.5}, {"image_id": 2, ', "not valid JSON"),
    (b'{"1": [{"bbox": [1, 2, 3, 4], "category_id": 1, "score": 0.5}]', "closing"),
    (b'{"images": [], "annotations": []}', "keys are not image ids"),
    (b"[1, 2, oops]", "not valid JSON"),
])
def test_unreadable_files_are_refused_naming_the_file(tmp_path, content, match):
    path = tmp_path / "teacher.json"
    path.write_bytes(content)
    with pytest.raises(TeacherFileError, match=match) as err:
        read_teacher_file(path, piece_bytes=32)
    assert str(path) in str(err.value)


def test_missing_file_and_folder_are_refused(tmp_path):
    with pytest.raises(TeacherFileError, match="not found"):
        read_teacher_file(tmp_path / "nope.json")
    with pytest.raises(TeacherFileError, match="is a folder"):
        read_teacher_file(tmp_path)


# ------------------------------------------------------------------------------------------------
# the data path
# ------------------------------------------------------------------------------------------------
def _synthetic_args(tmp_path: Path, *extra: str):
    return tiny_args("--dataset_file", "synthetic", "--coco_path", str(tmp_path / "data"), "--synthetic_train_size",
                     "6", "--synthetic_val_size", "3", "--synthetic_image_size", "64", *extra)


def _gt_teacher_file(dataset, path: Path, skip: set[int] = frozenset()) -> Path:
    """A teacher file that repeats the ground truth of every image (but ``skip``), in the annotation order."""
    results = [{"image_id": i, "bbox": a["bbox"], "category_id": a["category_id"], "score": 0.25 + 0.01 * k}
               for i in dataset.ids if i not in skip for k, a in enumerate(dataset.coco.imgToAnns.get(i, []))]
    path.write_text(json.dumps(results))
    return path


@pytest.mark.parametrize("contiguous", [False, True])
def test_teacher_boxes_follow_the_ground_truth_through_the_training_transforms(tmp_path, contiguous):
    extra = ("--contiguous_classes",) if contiguous else ()
    plain = datasets.build_dataset("train", _synthetic_args(tmp_path, *extra))
    skip = {plain.ids[0]}
    teacher = _gt_teacher_file(plain, tmp_path / "t.json", skip)
    args = _synthetic_args(tmp_path, *extra, "--ensemble", "--ensemble_mode", "parallel", "--ext_ann_files",
                           f"gt={teacher}", f"empty={teacher}")
    train = datasets.build_dataset("train", args)  # parallel mode: every teacher's boxes, unmerged
    assert isinstance(train.extra_box_sets, TeacherBoxes) and train.extra_box_sets.names == ["gt", "empty"]
    assert train.extra_box_sets.merge is None
    a, b = SeededDataset(plain, seed=0), SeededDataset(train, seed=0)
    for seed in range(3):  # several seeds and epochs: flips, both resize branches, crops
        a.seed = b.seed = seed
        for epoch in range(2):
            a.set_epoch(epoch)
            b.set_epoch(epoch)
            for index in range(len(plain)):
                (img_a, t_a), (img_b, t_b) = a[index], b[index]
                assert torch.equal(img_a, img_b) and all(torch.equal(t_b[k], v) for k, v in t_a.items())
                assert set(t_b) - set(t_a) == EXT_KEYS
                gt_image = int(t_b["image_id"]) not in skip
                n = len(t_b["boxes"]) if gt_image else 0
                # two teachers with the same boxes: teacher 0's copy, then teacher 1's
                assert t_b["ext_boxes"].shape == (2 * n, 4) and t_b["ext_boxes"].dtype == torch.float32
                for part, half in enumerate((slice(0, n), slice(n, 2 * n))):
                    assert torch.equal(t_b["ext_boxes"][half], t_b["boxes"] if gt_image else torch.zeros(0, 4))
                    assert torch.equal(t_b["ext_labels"][half], t_b["labels"][:n])
                    assert (t_b["ext_teacher"][half] == part).all()
                assert t_b["ext_labels"].dtype == torch.int64 and t_b["ext_teacher"].dtype == torch.int64
                assert t_b["ext_scores"].dtype == torch.float32
                if contiguous:
                    assert (t_b["ext_labels"] < 5).all()  # labels 0..4, as the ground truth


def test_validation_and_add_on_off_carry_no_teacher_boxes(tmp_path):
    plain = datasets.build_dataset("train", _synthetic_args(tmp_path))
    teacher = _gt_teacher_file(plain, tmp_path / "t.json")
    val = datasets.build_dataset("val", _synthetic_args(tmp_path, "--ensemble", "--ext_ann_files", f"gt={teacher}"))
    assert val.extra_box_sets is None and not EXT_KEYS & set(val[0][1])
    off = datasets.build_dataset("train", _synthetic_args(tmp_path, "--ext_ann_files", f"gt={teacher}"))
    assert off.extra_box_sets is None and not EXT_KEYS & set(off[0][1])


@pytest.mark.parametrize("mode", ["parallel", "merged"])
def test_images_without_teacher_boxes_get_empty_fields(tmp_path, mode):
    """An empty entry (no usable box) gives empty fields in both modes: no whole-image box (released)."""
    plain = datasets.build_dataset("train", _synthetic_args(tmp_path))
    teacher = tmp_path / "none.json"
    teacher.write_text(json.dumps({str(plain.ids[0]): [], str(plain.ids[1]): [{"bbox": [70, 70, 5, 5],
                                                                            "category_id": 1, "score": 0.5}]}))
    train = datasets.build_dataset("train", _synthetic_args(tmp_path, "--ensemble", "--ensemble_mode", mode,
                                                            "--ext_ann_files", f"t={teacher}"))
    for index in (0, 1):  # an empty list; a box wholly outside the 64 px image
        _, target = SeededDataset(train, seed=1)[index]
        assert target["ext_boxes"].shape == (0, 4) and target["ext_boxes"].dtype == torch.float32
        for key, dtype in (("ext_labels", torch.int64), ("ext_scores", torch.float32), ("ext_teacher", torch.int64)):
            assert target[key].shape == (0,) and target[key].dtype == dtype, key
        assert target.get(MERGED_KEY, False) == (mode == "merged")


def test_a_bad_teacher_file_stops_the_build(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("not json")
    args = _synthetic_args(tmp_path, "--ensemble", "--ext_ann_files", f"t={bad}")
    with pytest.raises(datasets.AnnotationError, match=str(bad)):
        datasets.build_dataset("train", args)


# ------------------------------------------------------------------------------------------------
# merged mode: the released merge, per image, before the transforms
# ------------------------------------------------------------------------------------------------
def _random_teachers(dataset, seed: int = 0) -> dict[str, dict[str, list]]:
    """Two teachers (released format) with many overlapping boxes, some sticking out of the 64 px image or
    wholly outside; image 0: no entry at all; image 1: only teacher a, an empty list; image 2: only teacher b;
    image 3: teacher a's entry holds only a box wholly outside the image (dropped at load, the entry still counts)."""
    rng = np.random.default_rng(seed)
    teachers: dict[str, dict[str, list]] = {"a": {}, "b": {}}
    for k, image_id in enumerate(dataset.ids):
        for name in ("a", "b"):
            if k == 0 or (k == 1 and name == "b") or (k == 2 and name == "a"):
                continue
            dets = [] if k == 1 or (k == 3 and name == "a") else [
                {"bbox": (rng.random(4) * [70, 70, 30, 30] + [-6, -6, 1, 1]).round(2).tolist(),
                 "category_id": int(rng.integers(1, 4)), "score": round(float(rng.random()), 4)}
                for _ in range(int(rng.integers(4, 14)))]
            teachers[name][str(image_id)] = dets + [{"bbox": [80, 1, 5, 5], "category_id": 1, "score": 0.99}]
    return teachers


class _ReleasedMerge:
    """The released data-set step, written from the spec (§5.1) on the raw file contents: per teacher with an
    entry clamp and drop empty boxes, concatenate, class-aware NMS 0.2 on the category ids (the offset trick)
    ranked by score + weight, keep floor(N / teachers with an entry); no entry at all: the whole-image box."""

    def __init__(self, teachers: dict[str, dict[str, list]], weights: dict[str, float], table: list[int] | None):
        self.teachers, self.weights, self.table = teachers, weights, table

    def __call__(self, image, target):
        w, h = image.size
        key = str(int(target["image_id"]))
        present = [(i, name) for i, name in enumerate(self.teachers) if key in self.teachers[name]]
        if not present:
            boxes, cats, scores, teacher = torch.tensor([[0.0, 0, w, h]]), torch.tensor([0]), torch.tensor([0.0]), \
                torch.tensor([-1])
        else:
            parts = []
            for i, name in present:
                dets = self.teachers[name][key]
                b = torch.as_tensor([d["bbox"] for d in dets], dtype=torch.float32).reshape(-1, 4)
                b[:, 2:] += b[:, :2]
                b[:, 0::2].clamp_(min=0, max=w)
                b[:, 1::2].clamp_(min=0, max=h)
                ok = (b[:, 3] > b[:, 1]) & (b[:, 2] > b[:, 0])
                s = torch.tensor([d["score"] for d in dets], dtype=torch.float32)[ok]
                parts.append((b[ok], torch.tensor([d["category_id"] for d in dets])[ok], s, s + self.weights[name],
                              torch.full((int(ok.sum()),), i)))
            boxes, cats, scores, ranking, teacher = (torch.cat(x) for x in zip(*parts))
            keep = torch.zeros(0, dtype=torch.int64)
            if len(boxes):
                offsets = cats.to(boxes) * (boxes.max() + 1)
                keep = torchvision.ops.nms(boxes + offsets[:, None], ranking, 0.2)
            keep = keep[:len(boxes) // len(present)]
            boxes, cats, scores, teacher = boxes[keep], cats[keep], scores[keep], teacher[keep]
        labels = cats
        if self.table is not None and present:  # --contiguous_classes: label = position of the category id
            labels = torch.tensor([self.table.index(c) for c in cats.tolist()], dtype=torch.int64)
        target = add_box_set(target, "ext_boxes", boxes,
                             {"ext_labels": labels, "ext_scores": scores, "ext_teacher": teacher})
        return {**target, MERGED_KEY: True}


@pytest.mark.parametrize("contiguous", [False, True])
def test_merged_mode_equals_the_released_merge_before_the_transforms(tmp_path, contiguous):
    extra = ("--contiguous_classes",) if contiguous else ()
    plain = datasets.build_dataset("train", _synthetic_args(tmp_path, *extra))
    teachers = _random_teachers(plain)
    files = []
    for name, content in teachers.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(content))
        files.append(f"{name}={tmp_path / name}.json")
    flags = ("--ensemble", "--ext_ann_files", *files, "--ext_ann_weights", "a=0", "b=0.3")
    merged = datasets.build_dataset("train", _synthetic_args(tmp_path, *extra, *flags))
    parallel = datasets.build_dataset("train", _synthetic_args(tmp_path, *extra, *flags, "--ensemble_mode", "parallel"))
    assert merged.extra_box_sets.merge.weights == (0.0, 0.3) and merged.extra_box_sets.merge.dummy
    plain.extra_box_sets = _ReleasedMerge(teachers, {"a": 0.0, "b": 0.3}, getattr(plain, "category_ids", None))
    runs = [SeededDataset(d, seed=0) for d in (plain, merged, parallel)]
    differs = 0
    for seed in range(4):  # flips, both resize branches, crops
        for epoch in range(2):
            for run in runs:
                run.seed = seed
                run.set_epoch(epoch)
            for index in range(len(plain)):
                (img_r, t_r), (img_m, t_m), (img_p, t_p) = (run[index] for run in runs)
                assert torch.equal(img_r, img_m) and torch.equal(img_r, img_p)  # the same random draws
                assert set(t_r) == set(t_m) and t_m[MERGED_KEY] is True and MERGED_KEY not in t_p
                for key, value in t_r.items():
                    same = torch.equal(t_m[key], value) if torch.is_tensor(value) else t_m[key] == value
                    assert same, (seed, epoch, index, key)
                if index == 0:  # no teacher entry: the whole-image box, still the whole (cropped) image
                    torch.testing.assert_close(t_m["ext_boxes"], torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
                    assert t_m["ext_labels"].tolist() == [0] and t_m["ext_teacher"].tolist() == [-1]
                if index == 1:  # an empty entry: nothing
                    assert len(t_m["ext_boxes"]) == 0
                # merging after the transforms (the add-on's fallback) is not the same after crops
                after = merged_targets([t_p], torch.tensor([0.0, 0.3]))[0]
                differs += not torch.equal(after["boxes"], t_m["ext_boxes"]) if index > 1 else 0
    assert differs > 0


def test_a_crop_can_remove_every_merged_box_and_no_dummy_replaces_them():
    image = PIL.Image.new("RGB", (40, 30))
    teachers = TeacherBoxes.from_detections(
        ["a", "b"], [Detections(np.array([7, 7]), np.array([[1, 1, 5, 5], [2, 1, 5, 5]], np.float32), np.array([1, 1]),
                                np.array([0.9, 0.8], np.float32)),
                     Detections(np.array([7]), np.array([[30, 20, 5, 5]], np.float32), np.array([2]),
                                np.array([0.4], np.float32))],
        merge=TeacherMerge((0.5, 0.5)))
    target = teachers(image, {"image_id": torch.tensor([7])})
    # 3 boxes, 2 teachers: the second class-1 box is suppressed (IoU 0.67 > 0.2), floor(3 / 2) = 1 kept
    assert target["ext_boxes"].tolist() == [[1, 1, 6, 6]] and target["ext_teacher"].tolist() == [0]
    _, cropped = T.crop(image, target, (10, 10, 20, 20))  # top, left, height, width: away from the kept box
    assert len(cropped["ext_boxes"]) == 0 and cropped[MERGED_KEY]
    assert len(merged_targets([cropped], torch.tensor([0.5, 0.5]))[0]["boxes"]) == 0  # the loss adds nothing
    # no entry: the whole-image box, unless --ensemble_no_dummy
    assert teachers(image, {"image_id": torch.tensor([8])})["ext_boxes"].tolist() == [[0, 0, 40, 30]]
    teachers.merge = TeacherMerge((0.5, 0.5), dummy=False)
    assert len(teachers(image, {"image_id": torch.tensor([8])})["ext_boxes"]) == 0
