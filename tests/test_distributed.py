"""Two gloo processes through tools/run_dist_launch.sh: same training as one process, same evaluation."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import main as train_main
from flags import finalize_args, get_args_parser
from tests.conftest import ROOT, synthetic_flags
from util.checkpoint import load_checkpoint

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(nproc: int, flags: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "GPUS_PER_NODE": str(nproc), "MASTER_PORT": str(_free_port()), "PYTHON": sys.executable,
           "OMP_NUM_THREADS": "1"}
    cmd = ["bash", str(ROOT / "tools" / "run_dist_launch.sh"), str(nproc), "python", "-u", str(ROOT / "main.py"),
           *flags]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _flags(tmp_path, out, *extra):
    # Exactness needs: no augmentation-dependent padding (same-size images), no dropout (per-rank RNG),
    # frozen BatchNorm (no batch statistics), and SGD (Adam would amplify float-order noise in ~0 grads).
    return synthetic_flags(tmp_path, out, "--train_transforms", "val", "--dropout", "0", "--sgd", "--lr", "1e-3",
                           "--synthetic_train_size", "12", "--synthetic_val_size", "7", "--hidden_dim", "64",
                           "--max_iters_per_epoch", "3", "--epochs", "1", *extra)


@pytest.mark.slow
def test_two_processes_match_one_process_with_double_batch(tmp_path):
    flags = [f for f in _flags(tmp_path, "ddp") if f != "--backbone_from_scratch"]
    _launch(2, flags + ["--batch_size", "2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = [f for f in _flags(tmp_path, "single") if f != "--backbone_from_scratch"]
        train_main.main(finalize_args(get_args_parser().parse_args(single + ["--batch_size", "4"])))
    finally:
        torch.set_num_threads(threads)  # the session's own: later tests compare with subprocesses
    ddp = load_checkpoint(tmp_path / "ddp" / "checkpoint.pth")["model"]
    one = load_checkpoint(tmp_path / "single" / "checkpoint.pth")["model"]
    init = None
    for name, value in one.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-6, msg=name)
        init = name
    assert init is not None

    # --eval on two processes (7 images: the sampler pads with a duplicate) == on one process.
    ckpt = str(tmp_path / "single" / "checkpoint.pth")
    _launch(2, _flags(tmp_path, "eval2", "--eval", "--resume", ckpt))
    train_main.main(finalize_args(get_args_parser().parse_args(_flags(tmp_path, "eval1", "--eval", "--resume",
                                                                      ckpt))))
    e2 = torch.load(tmp_path / "eval2" / "eval.pth", weights_only=False)
    e1 = torch.load(tmp_path / "eval1" / "eval.pth", weights_only=False)
    assert e1["precision"].shape == e2["precision"].shape
    assert (e1["precision"] == e2["precision"]).all()
    assert (e1["recall"] == e2["recall"]).all()


@pytest.mark.slow
def test_two_processes_keep_the_ema_of_one_process(tmp_path):
    """--use_ema under DDP: the EMA (never a DDP parameter) follows the all-reduced weights on every rank."""
    ema = ["--use_ema", "--ema_decay", "0.5"]
    _launch(2, [f for f in _flags(tmp_path, "ddp", *ema) if f != "--backbone_from_scratch"] + ["--batch_size", "2"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = [f for f in _flags(tmp_path, "single", *ema) if f != "--backbone_from_scratch"]
        train_main.main(finalize_args(get_args_parser().parse_args(single + ["--batch_size", "4"])))
    finally:
        torch.set_num_threads(threads)  # the session's own: later tests compare with subprocesses
    ddp, one = (load_checkpoint(tmp_path / run / "checkpoint.pth") for run in ("ddp", "single"))
    assert ddp["ema_updates"] == one["ema_updates"] == 3
    for name, value in one["ema_model"].items():
        torch.testing.assert_close(ddp["ema_model"][name], value, rtol=1e-4, atol=1e-6, msg=name)
    assert any(not torch.equal(v, one["model"][k]) for k, v in one["ema_model"].items())
