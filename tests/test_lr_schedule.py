"""--sched: StepLR (every DETR) and YOLOS's warm-up cosine, epoch by epoch against the official loop's values."""
from __future__ import annotations

import io
import math

import pytest
import torch

from flags import finalize_args, get_args_parser
from util.lr_schedule import WarmupCosineLR, build_lr_scheduler, load_schedule_state, restart_schedule

BASES = (1e-4, 1e-5)


def optimizer() -> torch.optim.Optimizer:
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in BASES]
    return torch.optim.AdamW(groups, lr=BASES[0])


def rates(opt: torch.optim.Optimizer, sched, epochs: int) -> list[list[float]]:
    """Each epoch's learning rates, the scheduler stepped after every epoch as main.py does."""
    out = []
    for _ in range(epochs):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out


def official(base: float, epoch: int, epochs: int, warmup: int, warmup_lr: float, min_lr: float) -> float:
    """hustvl/YOLOS: scheduler.step(e) after epoch e sets timm's cosine value at t = e for epoch e + 1."""
    if epoch == 0:
        return warmup_lr if warmup else base
    t = epoch - 1
    if t < warmup:
        return warmup_lr + t * (base - warmup_lr) / warmup
    if t >= epochs:
        return min_lr
    return min_lr + 0.5 * (base - min_lr) * (1 + math.cos(math.pi * t / epochs))


@pytest.mark.parametrize("warmup", [0, 2])
def test_warmup_cosine_matches_the_official_loop(warmup):
    opt = optimizer()
    sched = WarmupCosineLR(opt, epochs=6, min_lr=1e-7, warmup_epochs=warmup, warmup_lr=1e-6)
    got = rates(opt, sched, 9)
    want = [[official(b, e, 6, warmup, 1e-6, 1e-7) for b in BASES] for e in range(9)]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-12, abs=0)
    if not warmup:  # the official off-by-one: epochs 0 and 1 both at the base rate, the floor after the cycle
        assert got[0] == got[1] == list(BASES)
        assert got[4] == pytest.approx([(b + 1e-7) / 2 for b in BASES])  # t = 3 = half the cycle
        assert got[8] == [1e-7, 1e-7]


def test_flags_step_by_default_and_warmupcos_for_yolos():
    parse = get_args_parser().parse_args
    plain = finalize_args(parse([]))
    yolos = finalize_args(parse(["-m", "yolos"]))
    assert plain.sched == "step" and yolos.sched == "warmupcos"
    assert (yolos.warmup_lr, yolos.min_lr, yolos.warmup_epochs, yolos.decay_rate) == (1e-6, 1e-7, 0, 0.1)
    assert isinstance(build_lr_scheduler(plain, optimizer()), torch.optim.lr_scheduler.StepLR)
    sched = build_lr_scheduler(finalize_args(parse(["-m", "yolos", "--sched", "step"])), optimizer())
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    opt = optimizer()
    assert isinstance(build_lr_scheduler(yolos, opt), WarmupCosineLR)
    # the official spellings with dashes are accepted
    dashed = parse(["--sched", "warmupcos", "--warmup-lr", "2e-6", "--min-lr", "0", "--warmup-epochs", "3"])
    assert (dashed.warmup_lr, dashed.min_lr, dashed.warmup_epochs) == (2e-6, 0.0, 3)


def test_state_round_trip_continues_the_same_schedule():
    opt = optimizer()
    sched = WarmupCosineLR(opt, epochs=5, warmup_epochs=1)
    rates(opt, sched, 3)
    buf = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict()}, buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)
    opt2 = optimizer()
    sched2 = WarmupCosineLR(opt2, epochs=5, warmup_epochs=1)
    opt2.load_state_dict(state["optimizer"])
    sched2.load_state_dict(state["lr_scheduler"])
    assert rates(opt2, sched2, 4) == rates(opt, sched, 4)


def test_restart_schedule_takes_the_command_line():
    class Args:
        epochs, lr_drop = 10, 2

    opt = optimizer()
    sched = WarmupCosineLR(opt, epochs=5)
    rates(opt, sched, 3)
    restart_schedule(Args, opt, sched, [2e-4, 2e-5])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([official(b, 3, 10, 0, 1e-6, 1e-7)
                                                                 for b in (2e-4, 2e-5)])
    opt = optimizer()
    step = torch.optim.lr_scheduler.StepLR(opt, 4)
    rates(opt, step, 3)
    restart_schedule(Args, opt, step, [2e-4, 2e-5])
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2e-5, 2e-6])


def test_official_yolos_scheduler_state_resumes_where_it_stopped():
    """hustvl/YOLOS checkpoints hold timm's scheduler state (no last_epoch: its loop calls step(epoch)); resumed
    after epoch 2, the next epochs run at the official loop's rates, not from the start of the cosine."""
    timm_state = {"t_initial": 6, "lr_min": 1e-7, "warmup_t": 0, "warmup_lr_init": 1e-6, "decay_rate": 0.1,
                  "base_values": list(BASES), "t_in_epochs": True, "noise_range_t": None}
    opt = optimizer()
    sched = WarmupCosineLR(opt, epochs=6)
    load_schedule_state(sched, opt, timm_state, epoch=2)
    got = rates(opt, sched, 4)  # epochs 3, 4, 5, 6
    want = [[official(b, e, 6, 0, 1e-6, 1e-7) for b in BASES] for e in range(3, 7)]
    for g, w in zip(got, want):
        assert g == pytest.approx(w, rel=1e-12, abs=0)
    # our own checkpoints carry last_epoch and load as they are
    opt2 = optimizer()
    sched2 = WarmupCosineLR(opt2, epochs=6)
    rates(opt2, sched2, 3)
    opt3 = optimizer()
    sched3 = WarmupCosineLR(opt3, epochs=6)
    opt3.load_state_dict(opt2.state_dict())
    load_schedule_state(sched3, opt3, sched2.state_dict(), epoch=2)
    assert rates(opt3, sched3, 3) == rates(opt2, sched2, 3)
