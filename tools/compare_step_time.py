"""Training-step time of this tree against another commit, side by side in one run.

    python tools/compare_step_time.py 39f92e9                       # both configurations below
    python tools/compare_step_time.py 39f92e9 --only small --rounds 8 --steps 3 --threads 1

Each tree runs in its own long-lived worker process (the other commit in a temporary git worktree, with this
tree's compiled op copied in: the op's CPU sources must be the same in both, which is checked), building the same
model from the same flags and seed and stepping on the same batch. Rounds alternate other, this, other, this,
... so that load from other processes hits both alike; a round times ``--steps`` training steps (forward with
the targets, criterion, weighted total, backward, gradient clipping 0.1, AdamW step) after one untimed step.
Prints each side's median seconds per step and the ratio other / this (> 1: this tree is faster).
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {
    # the synthetic benchmark's model (`make demo`'s ++ configuration), batch 8 of 128 px, 1-6 objects each
    "small": ("--backbone resnet18 --backbone_from_scratch --hidden_dim 64 --nheads 8 --enc_layers 2 --dec_layers 3 "
              "--dim_feedforward 256 --num_queries 30 --num_classes 6 --device cpu --with_box_refine --two_stage "
              "--dropout 0.0 --mixed_selection --look_forward_twice", 8, (128, 128)),
    # README's CPU benchmark model: R50, 2 + 2 layers, batch 1 of 320 x 512
    "r50_320x512": ("--backbone resnet50 --enc_layers 2 --dec_layers 2 --num_classes 91 --device cpu", 1, (320, 512)),
}

# Environment of a worker (tools/compare_official_step.py): STEP_WORKER_PRELUDE, code run first in the tree (patches
# an official tree needs on a CPU); STEP_WORKER_SAVE / STEP_WORKER_LOAD, a file to save the built model's state
# dict to / to load it from (strictly), so that both sides step the same weights.
WORKER = r'''
import inspect, os, sys, time, torch
sys.path.insert(0, ".")
exec(os.environ.get("STEP_WORKER_PRELUDE", ""))
import main
from models import build_model
from util.misc import nested_tensor_from_tensor_list
flags = sys.argv[1].split()
batch, h, w, threads = (int(a) for a in sys.argv[2:6])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
args = main.get_args_parser().parse_args(flags + ["--lr", "1e-4", "--weight_decay", "1e-4"])
model, criterion, _ = build_model(args)
if os.environ.get("STEP_WORKER_SAVE"):
    torch.save(model.state_dict(), os.environ["STEP_WORKER_SAVE"])
if os.environ.get("STEP_WORKER_LOAD"):
    model.load_state_dict(torch.load(os.environ["STEP_WORKER_LOAD"], weights_only=True))
device = torch.device(args.device)
model.to(device)
criterion.to(device)
model.train()
takes_targets = len(inspect.signature(model.forward).parameters) > 1  # ours (add-ons); the seeds' take the images
try:  # each tree's own optimizer, as its main.py builds it
    from util.optim import build_optimizer
    optimizer = build_optimizer(model.parameters(), args)
except ImportError:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-4)
g = torch.Generator().manual_seed(0)
images = [torch.randn(3, h, w, generator=g) for _ in range(batch)]
targets = []
for _ in range(batch):
    n = int(torch.randint(1, 7, (1,), generator=g))
    boxes = torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2, torch.rand(n, 2, generator=g) * 0.2 + 0.05], 1)
    targets.append({"labels": torch.randint(1, 6, (n,), generator=g), "boxes": boxes})
samples = nested_tensor_from_tensor_list(images).to(device)
targets = [{k: v.to(device) for k, v in t.items()} for t in targets]

def step():
    outputs = model(samples, targets) if takes_targets else model(samples)
    losses = criterion(outputs, targets)
    total = sum(losses[k] * criterion.weight_dict[k] for k in losses if k in criterion.weight_dict)
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)
    optimizer.step()
    float(total)

step()
print("ready", flush=True)
for line in sys.stdin:
    steps = int(line)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    print((time.perf_counter() - start) / steps, flush=True)
'''


def start_worker(tree: Path, flags: str, batch: int, size: tuple[int, int], threads: int,
                 env: dict[str, str] | None = None) -> subprocess.Popen:
    """A worker building the model of ``flags`` in ``tree`` (``env``: the STEP_WORKER_* variables above)."""
    log = tempfile.TemporaryFile(mode="w+")  # its stderr: the reason, if it fails
    proc = subprocess.Popen([sys.executable, "-c", WORKER, flags, str(batch), str(size[0]), str(size[1]), str(threads)],
                            cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                            text=True, env={**os.environ, **(env or {})})
    if proc.stdout.readline().strip() != "ready":
        proc.kill()
        proc.wait()
        log.seek(0)
        tail = "".join(log.readlines()[-15:])
        raise RuntimeError(f"the worker in {tree} failed to build the model (flags: {flags}):\n{tail}")
    return proc


def timed(proc: subprocess.Popen, steps: int) -> float:
    proc.stdin.write(f"{steps}\n")
    proc.stdin.flush()
    return float(proc.stdout.readline())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", help="the other commit (e.g. the one before a change)")
    p.add_argument("--only", nargs="*", default=None, choices=list(CONFIGS))
    p.add_argument("--rounds", default=6, type=int)
    p.add_argument("--steps", default=3, type=int, help="timed steps per round")
    p.add_argument("--threads", default=0, type=int, help="torch threads of each worker (0: torch's default)")
    args = p.parse_args()
    ops = "models/ops"
    # The workers run on the CPU: the CPU kernel and the shared operator code must match (the CUDA part may differ).
    cpu_sources = [f"{ops}/src/cpu", f"{ops}/src/ms_deform_attn.cpp", f"{ops}/src/ms_deform_attn.h"]
    if subprocess.run(["git", "diff", "--quiet", args.ref, "--", *cpu_sources], cwd=ROOT).returncode:
        print(f"the deformable-attention CPU sources differ between {args.ref} and this tree: the compiled op cannot "
              "be shared; compare with the pure-PyTorch op instead (add --msda_impl pytorch to the flags)")
        return 2
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(other), args.ref], cwd=ROOT, check=True)
        try:
            for lib in (ROOT / ops).glob("*.so"):
                shutil.copy2(lib, other / ops / lib.name)
            print(f"| configuration | {args.ref} s/step | this tree s/step | ratio (> 1: this tree faster) |")
            print("|---|---|---|---|")
            for name, (flags, batch, size) in CONFIGS.items():
                if args.only and name not in args.only:
                    continue
                workers = {"other": start_worker(other, flags, batch, size, args.threads),
                           "this": start_worker(ROOT, flags, batch, size, args.threads)}
                times: dict[str, list[float]] = {"other": [], "this": []}
                for _ in range(args.rounds):
                    for side, proc in workers.items():
                        times[side].append(timed(proc, args.steps))
                for proc in workers.values():
                    proc.stdin.close()
                    proc.wait()
                a, b = statistics.median(times["other"]), statistics.median(times["this"])
                print(f"| {name} | {a:.4f} | {b:.4f} | {a / b:.3f} |", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
