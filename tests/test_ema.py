"""EMA of the weights (util/ema.py): the update and its warm-up by hand, the engine's update order and skipped
steps, two DDP ranks, checkpoints without EMA, log.txt's test_ema_* keys, --eval_ema and exact resume."""
import json
import logging
import signal
import subprocess
import sys

import pytest
import torch
from torch import nn

import engine
import main as train_main
from models.addons import AddOn
from tests.conftest import ROOT, synthetic_flags, tiny_args
from tests.test_resilience import _args, _log, _train_losses, _wait_for
from util.checkpoint import CheckpointError, load_checkpoint
from util.ema import ModelEMA, ema_enabled, load_ema_weights, start_ema


def _toy() -> nn.Sequential:
    """Linear (weight starts at 0) + BatchNorm (float running stats and an integer counter)."""
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.zero_()
    return model


def _set(model: nn.Module, value: float) -> None:
    with torch.no_grad():
        model[0].weight.fill_(value)


def test_update_formula_by_hand():
    model = _toy()
    ema = ModelEMA(model, decay=0.9)
    assert not ema.module.training and ema.updates == 0
    assert all(not p.requires_grad and p.dtype == torch.float32 for p in ema.module.parameters())
    assert not {id(p) for p in ema.module.parameters()} & {id(p) for p in model.parameters()}
    for value, expected in ((1.0, 0.1), (1.0, 0.19), (3.0, 0.471)):  # 0.9*e + 0.1*w
        _set(model, value)
        with torch.no_grad():
            model[1].running_mean.fill_(2.0)
            model[1].num_batches_tracked.fill_(7)
        ema.update(model)
        torch.testing.assert_close(ema.module[0].weight, torch.full((2, 2), expected), rtol=0, atol=1e-6)
    torch.testing.assert_close(ema.module[1].running_mean, torch.full((2,), 2 * (1 - 0.9 ** 3)))  # buffers too
    assert ema.module[1].num_batches_tracked.item() == 7  # integer buffers are copied
    assert torch.equal(ema.module[0].bias, model[0].bias)  # an entry that never changed stays bitwise equal
    assert ema.updates == 3


def test_warmup_by_hand():
    model = _toy()
    ema = ModelEMA(model, decay=0.9, warmup_steps=2)
    # m_t = 0.9 * (1 - exp(-t / 2)): m_1 = 0.354122, m_2 = 0.568909
    assert ema.next_decay() == pytest.approx(0.354122, abs=1e-6)
    _set(model, 1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module[0].weight, torch.full((2, 2), 1 - 0.354122), rtol=0, atol=1e-6)
    assert ema.next_decay() == pytest.approx(0.568909, abs=1e-6)
    ema.update(model)  # 0.568909 * 0.645878 + 0.431091 * 1
    torch.testing.assert_close(ema.module[0].weight, torch.full((2, 2), 0.798537), rtol=0, atol=1e-6)
    assert ModelEMA(model, decay=0.9).next_decay() == 0.9  # no warm-up: DINO's plain decay


class _ToyModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, samples, targets=None, ctx=None):
        return {"x": self.w * samples.sum()}


class _ToyCriterion(nn.Module):
    weight_dict = {"loss_a": 1.0}

    def __init__(self, bad=()) -> None:
        super().__init__()
        self.bad, self.calls = set(bad), 0

    def forward(self, outputs, targets, ctx=None):
        loss = ((outputs["x"] - 3.0) ** 2).sum()
        if self.calls in self.bad:
            loss = loss * float("nan")
        self.calls += 1
        return {"loss_a": loss}


class _Recorder(AddOn):
    """Sees, at each hook, whether ctx.ema is the EMA model and how many updates it had."""
    name = "recorder"

    def __init__(self, ema: ModelEMA) -> None:
        self.ema, self.before, self.after, self.weights = ema, [], [], []

    def before_forward(self, model, ctx) -> None:
        self.before.append(ctx.ema is self.ema.module)

    def after_step(self, model, ctx) -> None:
        self.after.append((ctx.ema is self.ema.module, self.ema.updates))
        self.weights.append(model.w.item())


class _Scaler:
    """A GradScaler stand-in: skips the optimizer step on the listed calls (and lowers the scale), grows it on
    the others."""

    def __init__(self, skip) -> None:
        self.skip, self.calls, self.value = set(skip), 0, 1024.0

    def scale(self, loss):
        return loss

    def unscale_(self, optimizer) -> None:
        pass

    def get_scale(self) -> float:
        return self.value

    def step(self, optimizer) -> None:
        if self.calls not in self.skip:
            optimizer.step()

    def update(self) -> None:
        self.value = self.value / 2 if self.calls in self.skip else self.value * 2
        self.calls += 1


def _train(bad=(), scaler=None, steps=5):
    model = _ToyModel()
    ema = ModelEMA(model, decay=0.5)
    recorder = _Recorder(ema)
    data = [(torch.ones(1, 2), [{}]) for _ in range(steps)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    engine.train_one_epoch(model, _ToyCriterion(bad), data, optimizer, torch.device("cpu"), 0, 0.0,
                           addons=[recorder], scaler=scaler, print_freq=100, ema=ema)
    return model, ema, recorder


def test_engine_updates_after_the_optimizer_and_before_after_step_hooks():
    model, ema, recorder = _train(bad={1})  # the non-finite step 1 is skipped: no update
    assert recorder.before == [True] * 5
    assert recorder.after == [(True, 1), (True, 2), (True, 3), (True, 4)]
    expected = 1.0  # the EMA by hand, from the weights after each optimizer step
    for w in recorder.weights:
        expected = 0.5 * expected + 0.5 * w
    assert ema.updates == 4
    assert ema.module.w.item() == pytest.approx(expected, abs=1e-7)


def test_steps_the_scaler_skipped_do_not_update_the_ema():
    _, ema, recorder = _train(scaler=_Scaler(skip={0, 3}))
    assert ema.updates == 3
    assert [n for _, n in recorder.after] == [0, 1, 2, 2, 3]


# One rank of a 2-process gloo run (a light script: only torch and util.ema are imported).
DDP_RANK = r"""
import sys, torch, torch.distributed as dist
from torch import nn
sys.path.insert(0, sys.argv[4])
from util.ema import ModelEMA
rank, init_file, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)
dist.init_process_group("gloo", init_method="file://" + init_file, rank=rank, world_size=2)
torch.manual_seed(rank)  # another initialisation per rank: DDP broadcasts rank 0's
model = nn.Linear(3, 2)
ddp = nn.parallel.DistributedDataParallel(model)
ema = ModelEMA(model, decay=0.5)
assert not {id(p) for p in ema.module.parameters()} & {id(p) for p in ddp.parameters()}
assert all(m is not ema.module for m in ddp.modules())
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
for _ in range(3):
    loss = ddp(torch.randn(4, 3)).pow(2).sum()  # each rank its own data
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ema.update(ddp)
torch.save({"ema": ema.state_dict(), "model": model.state_dict()}, out + "/rank%d.pt" % rank)
dist.barrier()  # both ranks are done with gloo
# CI saw a rank abort in interpreter teardown ("terminate called without an active exception", also with the
# barrier and destroy_process_group): the result is written, so leave without the C++ static destructors.
sys.stdout.flush()
sys.stderr.flush()
import os
os._exit(0)
"""


@pytest.mark.slow  # two processes importing torch: ~5 s on an idle machine
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
def test_two_gloo_ranks_hold_identical_emas(tmp_path):
    init_file = tmp_path / "rendezvous"
    procs = [subprocess.Popen([sys.executable, "-c", DDP_RANK, str(rank), str(init_file), str(tmp_path), str(ROOT)],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["ema"]["ema_updates"] == r1["ema"]["ema_updates"] == 3
    for name, value in r0["ema"]["ema_model"].items():
        assert torch.equal(value, r1["ema"]["ema_model"][name]), name
        assert not torch.equal(value, r0["model"][name]), name  # an average, not the weights


def test_checkpoint_without_ema_starts_the_ema_from_its_weights(caplog):
    args = tiny_args("--use_ema", "--ema_decay", "0.5")
    model = _toy()
    _set(model, 2.0)
    with caplog.at_level(logging.INFO):
        ema = start_ema(args, model, {"model": model.state_dict(), "epoch": 3}, "old.pth", restored=True)
    assert "old.pth has no EMA weights; the EMA starts from its model weights" in caplog.text
    assert ema.updates == 0 and torch.equal(ema.module[0].weight, model[0].weight)

    saved = {"model": {}, "ema_model": {k: v + 1 if v.is_floating_point() else v
                                        for k, v in model.state_dict().items()}, "ema_updates": 9}
    ema = start_ema(args, model, saved, "new.pth", restored=True)  # an exact resume: the saved EMA
    assert ema.updates == 9 and torch.equal(ema.module[0].weight, model[0].weight + 1)
    caplog.clear()
    with caplog.at_level(logging.INFO):
        ema = start_ema(args, model, saved, "new.pth", restored=False)  # --resume_weights_only
    assert "is loaded as weights only" in caplog.text
    assert ema.updates == 0 and torch.equal(ema.module[0].weight, model[0].weight)
    assert start_ema(tiny_args(), model, saved, "new.pth", restored=True) is None  # EMA off


def test_an_addon_that_needs_ema_switches_it_on(monkeypatch):
    class Teacher(AddOn):
        name, needs_ema = "teacher", True

    assert not ema_enabled(tiny_args())
    monkeypatch.setattr("models.addons.builder.enabled_addons", lambda args: [Teacher])
    assert ema_enabled(tiny_args())
    assert not ema_enabled(tiny_args("--eval"))  # evaluation never builds an EMA


def test_eval_ema_needs_ema_weights_and_eval():
    with pytest.raises(CheckpointError, match="has no EMA weights"):
        load_ema_weights(_toy(), {"model": {}}, "plain.pth")
    with pytest.raises(train_main.FlagError, match="--eval_ema .* needs --eval"):
        train_main.main(tiny_args("--eval_ema"))


@pytest.mark.slow
def test_log_has_test_ema_keys_and_eval_ema_evaluates_the_ema(tmp_path):
    flags = synthetic_flags(tmp_path, "out", "--epochs", "1", "--use_ema", "--ema_decay", "0.5")
    train_main.main(_args(flags))
    entry = _log(tmp_path / "out")[0]
    assert {"test_ema_loss", "test_ema_coco_eval_bbox"} <= set(entry)
    assert entry["test_ema_loss"] != entry["test_loss"]
    ckpt_path = tmp_path / "out" / "checkpoint.pth"
    assert load_checkpoint(ckpt_path)["ema_updates"] == 2
    assert (tmp_path / "out" / "eval" / "latest_ema.pth").is_file()
    common = ["--resume", str(ckpt_path), "--eval", "--output_dir", str(tmp_path / "eval")]
    ema_stats = train_main.main(_args(synthetic_flags(tmp_path, "eval") + common + ["--eval_ema"]))
    assert ema_stats["test_ema_loss"] == entry["test_ema_loss"]
    assert ema_stats["test_ema_coco_eval_bbox"] == entry["test_ema_coco_eval_bbox"]
    plain = train_main.main(_args(synthetic_flags(tmp_path, "eval") + common))
    assert plain["test_loss"] == entry["test_loss"]


@pytest.mark.slow
def test_killed_run_with_ema_resumes_bitwise(tmp_path):
    extra = ["--epochs", "3", "--use_ema", "--ema_decay", "0.9", "--ema_warmup_steps", "3", "--log_instability", "4"]
    train_main.main(_args(synthetic_flags(tmp_path, "reference", *extra)))
    flags = synthetic_flags(tmp_path, "killed", *extra)
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

    ours, theirs = load_checkpoint(killed / "checkpoint.pth"), load_checkpoint(tmp_path / "reference" /
                                                                              "checkpoint.pth")
    assert ours["epoch"] == theirs["epoch"] == 2 and ours["ema_updates"] == theirs["ema_updates"] == 6
    for part in ("model", "ema_model"):
        for name, value in theirs[part].items():
            assert torch.equal(ours[part][name], value), (part, name)
    for name, value in theirs["instability"]["previous"].items():
        assert torch.equal(ours["instability"]["previous"][name], value), name
    log, ref = _log(killed), _log(tmp_path / "reference")
    assert _train_losses(log) == _train_losses(ref)
    for key in ("instability", "instability_ema", "test_ema_loss"):
        assert [e.get(key) for e in log] == [e.get(key) for e in ref], key
    assert "instability" not in ref[0] and "instability_ema" in ref[1]  # the first epoch has no previous one


@pytest.mark.parametrize("flags,flag", [(["--ema_decay", "1.5"], "--ema_decay"),
                                        (["--ema_decay", "-0.1"], "--ema_decay"),
                                        (["--ema_warmup_steps", "-1"], "--ema_warmup_steps"),
                                        (["--log_instability", "-1"], "--log_instability"),
                                        (["--eval_ema"], "--eval_ema")])
def test_bad_ema_flags_are_refused(flags, flag):
    with pytest.raises(train_main.FlagError, match=flag):
        train_main.validate_args(tiny_args(*flags))


@pytest.mark.slow
def test_a_lost_log_line_is_rebuilt_with_the_ema_and_instability_keys(tmp_path):
    flags = synthetic_flags(tmp_path, "out", "--epochs", "2", "--use_ema", "--ema_decay", "0.5", "--log_instability",
                            "4")
    train_main.main(_args(flags))
    out = tmp_path / "out"
    lines = (out / "log.txt").read_text().splitlines()
    (out / "log.txt").write_text(lines[0] + "\n")  # the run died after its last checkpoint, before the log line
    train_main.main(_args(flags + ["--auto_resume"]))  # nothing to train: the line is rebuilt
    rebuilt, lost = _log(out)[-1], json.loads(lines[1])
    for key in ("instability", "instability_ema", "test_loss", "test_ema_loss", "test_ema_coco_eval_bbox"):
        assert rebuilt[key] == lost[key], key
