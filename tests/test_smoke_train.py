"""End to end on CPU: train 2 iterations on the synthetic set, checkpoint, resume, --eval --resume."""
import json
import pickle

import pytest
import torch

import main as train_main
from flags import finalize_args, get_args_parser
from tests.conftest import TINY
from util.checkpoint import load_checkpoint


def _args(tmp_path, *extra):
    flags = [f for f in TINY if f not in ("--num_classes", "5")]
    flags += ["--dataset_file", "synthetic", "--coco_path", str(tmp_path / "data"), "--synthetic_train_size", "8",
              "--synthetic_val_size", "4", "--synthetic_image_size", "64", "--batch_size", "2", "--num_workers", "0",
              "--max_iters_per_epoch", "2", "--output_dir", str(tmp_path / "out"), "--print_freq", "1",
              "--backbone_from_scratch"]
    return finalize_args(get_args_parser().parse_args(flags + list(extra)))


@pytest.mark.slow
@pytest.mark.parametrize("variant", [["--with_box_refine", "--two_stage"], []], ids=["refine_two_stage", "plain"])
def test_train_checkpoint_resume_eval(tmp_path, variant):
    stats = train_main.main(_args(tmp_path, "--epochs", "1", *variant))
    out = tmp_path / "out"
    assert (out / "checkpoint.pth").is_file() and (out / "checkpoint0000.pth").is_file()
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert len(log) == 1 and log[0]["epoch"] == 0 and len(log[0]["test_coco_eval_bbox"]) == 12
    assert torch.isfinite(torch.tensor(log[0]["train_loss"]))
    ckpt = load_checkpoint(out / "checkpoint.pth")
    assert set(ckpt) >= {"model", "optimizer", "lr_scheduler", "epoch", "args", "rng"}
    assert isinstance(ckpt["args"], dict) and ckpt["epoch"] == 0

    # --resume continues from the checkpoint: epoch 1 follows epoch 0.
    train_main.main(_args(tmp_path, "--epochs", "2", "--resume", str(out / "checkpoint.pth"), *variant))
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1]
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 1

    # --eval --resume reproduces the AP logged for the checkpoint's epoch.
    eval_stats = train_main.main(_args(tmp_path, "--eval", "--resume", str(out / "checkpoint.pth"), *variant))
    assert eval_stats["test_coco_eval_bbox"] == pytest.approx(log[-1]["test_coco_eval_bbox"], abs=1e-9)
    assert stats["test_coco_eval_bbox"] == pytest.approx(log[0]["test_coco_eval_bbox"], abs=1e-9)


@pytest.mark.slow
def test_auto_resume_continues(tmp_path):
    train_main.main(_args(tmp_path, "--epochs", "1"))
    train_main.main(_args(tmp_path, "--epochs", "2", "--auto_resume"))
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert [entry["epoch"] for entry in log] == [0, 1]


def test_official_checkpoint_with_namespace_loads(tmp_path):
    import argparse

    path = tmp_path / "official.pth"
    torch.save({"model": {"w": torch.ones(2)}, "epoch": 3, "args": argparse.Namespace(lr=2e-4)}, path)
    ckpt = load_checkpoint(path)
    assert ckpt["args"] == {"lr": 2e-4} and ckpt["epoch"] == 3
    evil = tmp_path / "evil.pth"
    torch.save({"model": {}, "args": object()}, evil)  # arbitrary objects are never unpickled
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(evil)
