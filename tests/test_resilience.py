"""Crash safety and exact resume on CPU: killed runs, killed checkpoint writes, corrupt files, NaN losses."""
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import main as train_main
from flags import finalize_args, get_args_parser
from models.criterion import SetCriterion
from tests.conftest import ROOT, synthetic_flags
from util.checkpoint import find_resume_checkpoint, load_checkpoint


def _args(flags):
    return finalize_args(get_args_parser().parse_args(flags))


def _log(path):
    return [json.loads(line) for line in (path / "log.txt").read_text().splitlines()]


def _train_losses(entries):
    return [{k: v for k, v in e.items() if k.startswith("train_loss")} for e in entries]


def _wait_for(predicate, timeout=300.0):
    start = time.time()
    while not predicate():
        if time.time() - start > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_run_resumes_to_identical_weights_and_log(tmp_path):
    reference = tmp_path / "reference"
    train_main.main(_args(synthetic_flags(tmp_path, "reference", "--epochs", "3")))

    flags = synthetic_flags(tmp_path, "killed", "--epochs", "3")
    proc = subprocess.Popen([sys.executable, str(ROOT / "main.py"), *flags], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    killed = tmp_path / "killed"
    try:
        _wait_for(lambda: (killed / "log.txt").is_file() and (killed / "log.txt").read_text().count("\n") >= 1)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert len(_log(killed)) < 3
    train_main.main(_args(flags + ["--auto_resume"]))

    ours, theirs = load_checkpoint(killed / "checkpoint.pth"), load_checkpoint(reference / "checkpoint.pth")
    assert ours["epoch"] == theirs["epoch"] == 2
    for name, value in theirs["model"].items():
        assert torch.equal(ours["model"][name], value), name
    assert _train_losses(_log(killed)) == _train_losses(_log(reference))


@pytest.mark.slow
def test_sigkill_while_writing_checkpoint_keeps_previous(tmp_path):
    flags = synthetic_flags(tmp_path, "out", "--epochs", "1")
    train_main.main(_args(flags))
    out = tmp_path / "out"
    # A process that dies half-way through writing the next checkpoint.
    script = (
        "import sys, time, torch; sys.path.insert(0, %r)\n"
        "from util import checkpoint\n"
        "def slow_save(obj, f):\n"
        "    f.write(b'partial checkpoint bytes'); f.flush(); time.sleep(600)\n"
        "torch.save = slow_save\n"
        "checkpoint.save_atomic({'model': {}}, %r)\n" % (str(ROOT), str(out / "checkpoint.pth")))
    proc = subprocess.Popen([sys.executable, "-c", script])
    tmp_file = out / "checkpoint.pth.tmp"
    try:
        _wait_for(lambda: tmp_file.is_file() and tmp_file.stat().st_size > 0, timeout=120)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert load_checkpoint(out / "checkpoint.pth")["epoch"] == 0  # the previous checkpoint is intact
    train_main.main(_args(synthetic_flags(tmp_path, "out", "--epochs", "2", "--auto_resume")))
    assert [e["epoch"] for e in _log(out)] == [0, 1]


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_skipped(tmp_path, caplog):
    train_main.main(_args(synthetic_flags(tmp_path, "out", "--epochs", "2")))
    out = tmp_path / "out"
    for name in ("checkpoint.pth", "checkpoint0001.pth"):
        data = (out / name).read_bytes()
        (out / name).write_bytes(data[: len(data) // 3])  # truncated, as after a full disk
    with caplog.at_level(logging.WARNING):
        path, ckpt = find_resume_checkpoint(out)
    assert path.name == "checkpoint0000.pth" and ckpt["epoch"] == 0
    assert "skipping unreadable checkpoint" in caplog.text
    train_main.main(_args(synthetic_flags(tmp_path, "out", "--epochs", "2", "--auto_resume")))
    assert [e["epoch"] for e in _log(out)] == [0, 1]  # the stale epoch-1 line was replaced


def _nan_criterion(monkeypatch, bad_calls):
    """Make the criterion return a NaN loss_giou on the given (0-based) training calls."""
    original = SetCriterion.forward
    calls = {"n": 0}

    def forward(self, outputs, targets, ctx=None):
        losses = original(self, outputs, targets)
        if self.training:
            if calls["n"] in bad_calls:
                losses["loss_giou"] = losses["loss_giou"] * float("nan")
            calls["n"] += 1
        return losses
    monkeypatch.setattr(SetCriterion, "forward", forward)


def test_nonfinite_step_is_skipped_and_logged(tmp_path, monkeypatch, caplog):
    _nan_criterion(monkeypatch, bad_calls={1})
    with caplog.at_level(logging.WARNING):
        stats = train_main.main(_args(synthetic_flags(tmp_path, "out", "--epochs", "1", "--max_iters_per_epoch",
                                                      "3")))
    assert stats["train_nonfinite_steps"] == 1
    assert "non-finite loss" in caplog.text and "loss_giou" in caplog.text
    assert torch.isfinite(torch.tensor(stats["train_loss"]))


@pytest.mark.slow
def test_consecutive_nonfinite_steps_stop_with_intact_checkpoint(tmp_path, monkeypatch):
    train_main.main(_args(synthetic_flags(tmp_path, "out", "--epochs", "1")))
    _nan_criterion(monkeypatch, bad_calls=set(range(100)))
    with pytest.raises(train_main.NonFiniteLossError, match="3 consecutive non-finite"):
        train_main.main(_args(synthetic_flags(tmp_path, "out", "--epochs", "2", "--auto_resume",
                                              "--max_nonfinite_steps", "3", "--max_iters_per_epoch", "5")))
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pth")["epoch"] == 0


@pytest.mark.slow
def test_cli_exits_with_message_on_nonfinite(tmp_path):
    flags = synthetic_flags(tmp_path, "out", "--epochs", "1", "--max_nonfinite_steps", "1", "--lr", "1e30",
                            "--max_iters_per_epoch", "4", "--clip_max_norm", "0")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "main.py"), *flags], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training stopped" in proc.stdout and "non-finite" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_command_line_schedule_wins_unless_asked(tmp_path, caplog):
    train_main.main(_args(synthetic_flags(tmp_path, "out", "--epochs", "1", "--lr", "1e-4")))
    with caplog.at_level(logging.INFO):  # official: the command line's lr overrides the checkpoint's
        train_main.main(_args(synthetic_flags(tmp_path, "out", "--epochs", "2", "--lr", "5e-4", "--auto_resume")))
    assert "schedule taken from the command line" in caplog.text
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pth")["optimizer"]["param_groups"][0]["lr"] == 5e-4
    caplog.clear()
    with caplog.at_level(logging.INFO):
        train_main.main(_args(synthetic_flags(tmp_path, "out", "--epochs", "3", "--lr", "1e-3", "--auto_resume",
                                              "--schedule_from_checkpoint")))
    assert "the checkpoint's schedule is used" in caplog.text
    assert load_checkpoint(tmp_path / "out" / "checkpoint.pth")["optimizer"]["param_groups"][0]["lr"] == 5e-4
