"""Slurm (or local) submission through submitit, with requeue on preemption/time-out and auto-resume.

    python run_with_submitit.py --nodes 2 --ngpus 8 --partition gpu --timeout 2880 \
        --job_dir /shared/jobs/r50 --output_dir /shared/exps/r50 --coco_path /data/coco --with_box_refine

Every main.py flag is accepted. On the preemption or time-out signal, submitit calls ``checkpoint()``,
which resubmits the same job with ``--auto_resume``: it continues from the newest good checkpoint of
its own ``--output_dir`` (by default ``<job_dir>/output``), so at most the work since the last
checkpoint is lost. Nothing points at a hard-coded shared folder.
"""
from __future__ import annotations

import argparse
import copy
import os
import uuid
from pathlib import Path

import submitit

import main as train_main
from flags import finalize_args, get_args_parser


def get_parser() -> argparse.ArgumentParser:
    parser = get_args_parser()
    g = parser.add_argument_group("submitit")
    g.add_argument("--ngpus", default=8, type=int, help="GPUs (tasks) per node")
    g.add_argument("--nodes", default=1, type=int, help="number of nodes")
    g.add_argument("--timeout", default=60 * 72, type=int, help="job duration in minutes")
    g.add_argument("--partition", default=None, type=str, help="Slurm partition")
    g.add_argument("--job_dir", default="", type=str, help="submitit logs (default: ./submitit_jobs/<uuid>)")
    g.add_argument("--cpus_per_task", default=10, type=int)
    g.add_argument("--mem_per_gpu", default=40, type=int, help="GiB of host memory per GPU")
    g.add_argument("--comment", default="", type=str, help="Slurm comment")
    g.add_argument("--slurm_args", default=[], nargs="*", help="extra sbatch options as key=value")
    g.add_argument("--local", action="store_true", help="run with submitit's local executor (no Slurm)")
    return parser


class Trainer:
    """The submitted callable: sets up the distributed environment and runs main(); checkpointable."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = copy.deepcopy(args)  # main() mutates its args; requeues start from these

    def __call__(self) -> dict:
        args = copy.deepcopy(self.args)
        self._setup_distributed_env()
        return train_main.main(args)

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called on preemption/time-out: resubmit the same training, resuming from its own output_dir."""
        args = copy.deepcopy(self.args)
        args.auto_resume = True
        return submitit.helpers.DelayedSubmission(type(self)(args))

    @staticmethod
    def _setup_distributed_env() -> None:
        env = submitit.JobEnvironment()
        if env.num_tasks <= 1:
            return
        os.environ.update({"RANK": str(env.global_rank), "WORLD_SIZE": str(env.num_tasks),
                           "LOCAL_RANK": str(env.local_rank), "MASTER_ADDR": env.hostnames[0]})
        digits = "".join(c for c in str(env.job_id) if c.isdigit())[-4:] or "0"
        os.environ.setdefault("MASTER_PORT", str(20000 + int(digits)))  # distinct per job on shared nodes


def submit(args: argparse.Namespace) -> submitit.Job:
    job_dir = Path(args.job_dir or Path("submitit_jobs") / uuid.uuid4().hex[:8]).resolve()
    job_dir.mkdir(parents=True, exist_ok=True)
    args.job_dir = str(job_dir)
    if not args.output_dir:
        args.output_dir = str(job_dir / "output")
    executor = submitit.AutoExecutor(folder=job_dir / "%j", cluster="local" if args.local else None,
                                     slurm_max_num_timeout=30)
    params = {"timeout_min": args.timeout, "tasks_per_node": args.ngpus, "nodes": args.nodes, "name": "detr"}
    if not args.local:
        params.update(gpus_per_node=args.ngpus, cpus_per_task=args.cpus_per_task, mem_gb=args.mem_per_gpu * args.ngpus,
                      slurm_signal_delay_s=120)
        if args.partition:
            params["slurm_partition"] = args.partition
        if args.comment:
            params["slurm_comment"] = args.comment
        if args.slurm_args:
            params["slurm_additional_parameters"] = dict(kv.split("=", 1) for kv in args.slurm_args)
    executor.update_parameters(**params)
    return executor.submit(Trainer(args))


def cli() -> None:
    args = finalize_args(get_parser().parse_args())
    job = submit(args)
    print(f"submitted job {job.job_id}; logs in {args.job_dir}, outputs in {args.output_dir}")


if __name__ == "__main__":
    cli()
