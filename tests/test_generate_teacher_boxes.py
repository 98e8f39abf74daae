"""tools/generate_teacher_boxes.py: generation with a checkpoint, shards and restart, conversion, and a training
run on the file it writes. A tiny randomly initialised Deformable-DETR on a tiny synthetic set; CPU only.
"""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import datasets
from datasets.teacher_boxes import Detections, read_teacher_file
from flags import FlagError, finalize_args, get_args_parser
from models import build_model
from tests.conftest import TINY, synthetic_flags
from util.misc import collate_fn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import generate_teacher_boxes as gen  # noqa: E402

MODEL = [f for f in TINY if f not in ("--num_classes", "5")] + ["--backbone_from_scratch", "--topk", "20"]


def _data_flags(root: Path) -> list[str]:
    return ["--dataset_file", "synthetic", "--coco_path", str(root / "data"), "--synthetic_train_size", "5",
            "--synthetic_val_size", "2", "--synthetic_image_size", "64", "--batch_size", "2", "--num_workers", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(root, checkpoint) of a random tiny model (6 logits: synthetic ids 1..5)."""
    root = tmp_path_factory.mktemp("teach_gen")
    args = finalize_args(get_args_parser().parse_args(MODEL + _data_flags(root) + ["--num_classes", "6"]))
    torch.manual_seed(0)
    model, _, _ = build_model(args)
    torch.save({"model": model.state_dict(), "args": vars(args)}, root / "ckpt.pth")
    return root, root / "ckpt.pth"


def _argv(root: Path, ckpt: Path, output: Path, *extra: str) -> list[str]:
    return MODEL + _data_flags(root) + ["--resume", str(ckpt), "--output", str(output), "--shard_size", "2",
                                        "--batch_size", "1", *extra]


def _expected(root: Path, ckpt: Path, split: str = "train", **limits) -> Detections:
    """The same detections computed here: eval transforms, the model's post-processing, threshold/NMS/top N."""
    args = finalize_args(get_args_parser().parse_args(MODEL + _data_flags(root) + ["--num_classes", "6",
                                                                                  "--train_transforms", "val"]))
    dataset = datasets.build_dataset(split, args)
    model, _, post = build_model(args)
    model.load_state_dict(torch.load(ckpt, weights_only=True)["model"])
    model.eval()
    parts = []
    with torch.no_grad():
        for samples, targets in DataLoader(dataset, batch_size=1, collate_fn=collate_fn):  # the tool's batches
            sizes = torch.stack([t["orig_size"] for t in targets])
            for target, result in zip(targets, post["bbox"](model(samples), sizes)):
                keep = gen.select_detections(result["boxes"], result["scores"], result["labels"],
                                             limits.get("score_threshold", 0.0), 0.3, 50)
                xyxy = result["boxes"][keep]
                parts.append(Detections(np.full(len(keep), int(target["image_id"])),
                                        torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1).numpy(),
                                        result["labels"][keep].numpy(), result["scores"][keep].numpy()))
    return Detections.concat(parts)


def _assert_same(a: Detections, b: Detections) -> None:
    for field in ("image_ids", "boxes", "category_ids", "scores"):
        assert np.array_equal(getattr(a, field), getattr(b, field)), field


def test_select_detections_is_class_aware_nms_then_top_n():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 11, 10], [0, 0, 10, 10], [50, 50, 60, 60], [0, 0, 9, 10.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.05])
    labels = torch.tensor([1, 1, 2, 1, 3])
    assert gen.select_detections(boxes, scores, labels, 0.0, 0.3, 50).tolist() == [0, 2, 3, 4]  # 1 overlaps 0
    assert gen.select_detections(boxes, scores, labels, 0.1, 0.3, 2).tolist() == [0, 2]
    assert gen.select_detections(boxes, scores, labels, 0.0, 1.0, 0).tolist() == [0, 1, 2, 3, 4]  # no NMS


def test_generated_file_loads_to_the_model_detections(setup, tmp_path):
    root, ckpt = setup
    out = tmp_path / "t.json"
    gen.main(_argv(root, ckpt, out))
    assert not (tmp_path / "t.json.shards").exists()  # merged, then removed
    loaded = read_teacher_file(out)
    expected = _expected(root, ckpt)
    assert len(expected) > 5 and loaded.malformed == 0
    _assert_same(loaded, expected)
    assert json.loads(out.read_text()).keys() <= {str(i) for i in expected.image_ids.tolist()}


def test_generated_coco_format_val_split_with_threshold(setup, tmp_path):
    root, ckpt = setup
    gen.main(_argv(root, ckpt, tmp_path / "v.json", "--split", "val", "--format", "coco", "--score_threshold",
                   "0.02"))
    assert isinstance(json.loads((tmp_path / "v.json").read_text()), list)
    _assert_same(read_teacher_file(tmp_path / "v.json"), _expected(root, ckpt, "val", score_threshold=0.02))


def test_an_interrupted_run_resumes_from_its_shards(setup, tmp_path, caplog):
    root, ckpt = setup
    out = tmp_path / "t.json"
    gen.main(_argv(root, ckpt, out, "--keep_shards"))
    full = read_teacher_file(out)
    shards = tmp_path / "t.json.shards"
    assert sorted(p.name for p in shards.glob("shard_*")) == [f"shard_00000{k}.npz" for k in range(3)]
    # "killed" after shards 0 and 2: shard 1 (images 2, 3) and the output are missing; shard 0 is marked to see it
    # reused
    out.unlink()
    (shards / "shard_000001.npz").unlink()
    marked, covered = gen.load_shard(shards / "shard_000000.npz")
    marked.scores = np.full_like(marked.scores, 0.125)
    gen.save_shard(shards / "shard_000000.npz", [marked], covered.tolist())
    with caplog.at_level(logging.INFO):
        gen.main(_argv(root, ckpt, out))
    assert any("2 image(s) of 5 to run on this process (1 shard(s) missing)" in r.getMessage() for r in caplog.records)
    again = read_teacher_file(out)
    first = np.isin(full.image_ids, covered)
    assert (again.scores[first] == 0.125).all()
    full.scores[first] = 0.125
    _assert_same(again, full)


def test_shards_of_another_run_are_refused(setup, tmp_path):
    root, ckpt = setup
    out = tmp_path / "t.json"
    earlier = finalize_args(gen.build_parser().parse_args(_argv(root, ckpt, out)))
    gen._check_manifest(tmp_path / "t.json.shards", gen._manifest(earlier, 5))  # as the earlier run left it
    args = finalize_args(gen.build_parser().parse_args(_argv(root, ckpt, out, "--top_n", "10")))
    with pytest.raises(FlagError, match="another run.*top_n 50 -> 10"):
        gen.generate(args)  # refused before the model is built


def test_conversion_round_trips(tmp_path):
    results = [{"image_id": 3, "bbox": [1.5, 2.0, 3.25, 4.0], "category_id": 7, "score": 0.5},
               {"image_id": 1, "bbox": [0.0, 0.0, 10.0, 10.0], "category_id": 1, "score": 0.75},
               {"image_id": 3, "bbox": [5.0, 5.0, 0.0, 1.0], "category_id": 7, "score": 0.5},  # degenerate: dropped
               {"image_id": 3, "bbox": [5.0, 5.0, 2.0, 1.0], "category_id": 2, "score": 0.125}]
    (tmp_path / "results.json").write_text(json.dumps(results))
    gen.main(["--convert", str(tmp_path / "results.json"), "--output", str(tmp_path / "released.json")])
    released = json.loads((tmp_path / "released.json").read_text())
    assert list(released) == ["1", "3"] and [d["category_id"] for d in released["3"]] == [7, 2]
    gen.main(["--convert", str(tmp_path / "released.json"), "--format", "coco", "--output", str(tmp_path / "c.json")])
    back = json.loads((tmp_path / "c.json").read_text())
    kept = [results[1], results[0], results[3]]  # sorted by image id, file order within an image
    assert back == kept


def test_a_bad_file_to_convert_exits_naming_it(tmp_path, capsys):
    (tmp_path / "bad.json").write_text("{oops")
    with pytest.raises(SystemExit) as err:
        gen.main(["--convert", str(tmp_path / "bad.json"), "--output", str(tmp_path / "o.json")])
    assert err.value.code == 1 and str(tmp_path / "bad.json") in capsys.readouterr().err


@pytest.mark.slow
def test_training_with_a_generated_teacher_file(setup, tmp_path):
    """main.py on the synthetic set, 2 iterations, with --ensemble and the tool's file."""
    import main as main_module

    root, ckpt = setup
    teacher = tmp_path / "t.json"
    gen.main(_argv(root, ckpt, teacher))
    flags = synthetic_flags(tmp_path, "run", "--epochs", "1", "--ensemble", "--ext_ann_files", f"t1={teacher}")
    flags[flags.index("--coco_path") + 1] = str(root / "data")
    flags[flags.index("--synthetic_train_size") + 1] = "5"
    flags[flags.index("--synthetic_val_size") + 1] = "2"
    stats = main_module.main(finalize_args(get_args_parser().parse_args(flags + ["--backbone_from_scratch"])))
    assert any(k.endswith("_ensemble") for k in stats), sorted(stats)
    assert np.isfinite(stats["train_loss"])
