"""run_with_submitit.py on submitit's local executor: preemption -> checkpoint -> requeue -> same result."""
import signal
import subprocess
import time

import pytest
import torch

import main as train_main
from flags import finalize_args, get_args_parser
from tests.conftest import synthetic_flags
from util.checkpoint import load_checkpoint

submitit = pytest.importorskip("submitit")


def _task_pids(controller_pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(controller_pid)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


@pytest.mark.slow
def test_preempted_job_requeues_and_finishes_identically(tmp_path):
    import run_with_submitit

    train_main.main(finalize_args(get_args_parser().parse_args(synthetic_flags(tmp_path, "reference",
                                                                               "--epochs", "3"))))
    flags = synthetic_flags(tmp_path, "job_out", "--epochs", "3") + [
        "--local", "--ngpus", "1", "--timeout", "30", "--job_dir", str(tmp_path / "jobs")]
    args = finalize_args(run_with_submitit.get_parser().parse_args(flags))
    job = run_with_submitit.submit(args)
    log = tmp_path / "job_out" / "log.txt"
    start = time.time()
    while not (log.is_file() and log.read_text().count("\n") >= 1):
        assert job.state not in ("FAILED", "DONE", "FINISHED"), job.stdout()
        assert time.time() - start < 600, "job made no progress"
        time.sleep(0.2)
    # Preemption: the scheduler's signal reaches the training task.
    tasks = _task_pids(job._process.pid)
    assert tasks, "no task process found"
    for pid in tasks:
        subprocess.run(["kill", f"-{signal.SIGUSR2.name[3:]}", str(pid)], check=True)
    job.result()  # raises if the requeued job failed
    assert "Requeued" in (job.stderr() or "") + (job.stdout() or "")
    ours = load_checkpoint(tmp_path / "job_out" / "checkpoint.pth")
    theirs = load_checkpoint(tmp_path / "reference" / "checkpoint.pth")
    assert ours["epoch"] == theirs["epoch"] == 2
    for name, value in theirs["model"].items():
        assert torch.equal(ours["model"][name], value), name
