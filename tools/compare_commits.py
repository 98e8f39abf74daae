"""Check that a refactor changed nothing: losses and every gradient, bitwise, against another commit.

    python tools/compare_commits.py HEAD~1            # every model x add-on configuration below
    python tools/compare_commits.py f6e69cc --only teach od co_detr

The other commit is checked out in a temporary git worktree; each configuration is built there and
here from the same flags, the other tree's weights are loaded here (strictly: parameter names must not
change), then one training step (forward with the targets, criterion, weighted total, backward) runs in
both from the same global-generator seed (denoising noise, MS-DETR's sampling and dropout draw from it).
Exit status 1 on any difference.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The pure-PyTorch attention: the other tree has no compiled op, and it is deterministic.
TINY = ("--backbone resnet18 --hidden_dim 32 --nheads 4 --enc_layers 1 --dec_layers 2 --dim_feedforward 64 "
        "--num_queries 8 --num_classes 5 --device cpu --backbone_from_scratch --msda_impl pytorch")
CONFIGS = {
    "deformable": "",
    "deformable_refine_two_stage": "--with_box_refine --two_stage",
    "deformable_pp_dn": "--with_box_refine --two_stage --mixed_selection --look_forward_twice --use_dn",
    "deformable_hybrid": "--with_box_refine --two_stage --num_queries_one2many 6",
    "deformable_ms_detr": "--with_box_refine --two_stage --use_ms_detr --use_aux_ffn",
    "deformable_all": "--with_box_refine --two_stage --use_dn --contrastive --num_queries_one2many 6 --use_ms_detr "
                      "--use_aux_ffn",
    "deformable_one_stage_hybrid_ms": "--num_queries_one2many 6 --use_ms_detr --use_aux_ffn",
    "dab": "-m dab_deformable_detr",
    "dab_dn_hybrid_ms": "-m dab_deformable_detr --use_dn --num_queries_one2many 6 --use_ms_detr --use_aux_ffn",
    "dn_dab": "-m dn_dab_deformable_detr --use_dn",
    "dino": "-m dino",
    "dino_hybrid_ms": "-m dino --num_queries_one2many 6 --use_ms_detr --use_aux_ffn",
    "dino_no_dn": "-m dino --no-use_dn",
    "detr": "-m detr",
    "conditional_detr": "-m conditional_detr",
    "dn_dab_detr": "-m dn_dab_detr --use_dn",
    "yolos": "-m yolos --backbone_name tiny --init_pe_size 64 96 --mid_pe_size 64 64",
    # the add-ons the criterion reaches through the step context (teacher boxes in the targets, the EMA teacher)
    "teach": "--with_box_refine --two_stage --ensemble --ext_ann_files t=unused.json",
    "teach_dino": "-m dino --ensemble --ext_ann_files t=unused.json",
    "od": "--with_box_refine --two_stage --use_ema --addons od",
    "co_detr": "--with_box_refine --two_stage --addons co_detr",
    "co_dino": "-m dino --use_dn --addons co_detr",
}
# With the pretrained models' frozen BatchNorm and stem max pool (weights=None still: nothing is downloaded), fp32
# and CPU bf16 autocast (--amp).
FROZEN = TINY.replace(" --backbone_from_scratch", "")
FROZEN_CONFIGS = {
    "frozen_bn_deformable_two_stage": "--with_box_refine --two_stage",
    "frozen_bn_deformable_two_stage_amp": "--with_box_refine --two_stage --amp",
    "frozen_bn_dino_amp": "-m dino --amp",
    "frozen_bn_detr_amp": "-m detr --amp",
    "frozen_bn_conditional_detr": "-m conditional_detr",
}

PROBE = r'''
import sys, torch
sys.path.insert(0, ".")
import main
from models import build_model
from util.misc import nested_tensor_from_tensor_list
flags, weights, out_file = sys.argv[1].split(), sys.argv[2], sys.argv[3]
torch.set_num_threads(1)  # one thread: the kernels' reductions run in one fixed order (bitwise reproducible)
torch.manual_seed(0)
model, criterion, _ = build_model(main.get_args_parser().parse_args(flags))
if weights == "save":
    torch.save(model.state_dict(), out_file + ".weights")
else:
    model.load_state_dict(torch.load(weights, weights_only=True), strict=True)
g = torch.Generator().manual_seed(0)
images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 56, generator=g), torch.randn(3, 56, 40, generator=g)]
targets = [{"labels": torch.tensor([1, 3, 4]),
            "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2], [0.7, 0.8, 0.3, 0.2]])},
           {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
           {"labels": torch.tensor([2, 2]), "boxes": torch.tensor([[0.3, 0.6, 0.2, 0.2], [0.35, 0.6, 0.25, 0.3]])}]
if "--ensemble" in flags:  # merged teacher boxes, as the data path delivers them
    for t, n in zip(targets, (3, 2, 1)):
        t.update({"ext_boxes": torch.rand(n, 4, generator=g) * 0.3 + 0.2, "ext_merged": True,
                  "ext_labels": torch.randint(0, 4, (n,), generator=g), "ext_scores": torch.rand(n, generator=g),
                  "ext_teacher": torch.zeros(n, dtype=torch.int64)})
model.train()
samples = nested_tensor_from_tensor_list(images)
kwargs = {}
if "--addons" in flags or "--ensemble" in flags:  # the add-ons' step context (and an EMA teacher with --use_ema)
    from models.addons.base import StepContext
    from util.ema import ModelEMA
    ema = ModelEMA(model, 0.9, 0).module if "--use_ema" in flags else None
    ctx = StepContext(images=samples, targets=targets, epoch=0, step=0, ema=ema)
    for addon in criterion.addons:
        addon.before_forward(model, ctx)
    kwargs = {"ctx": ctx}
torch.manual_seed(123)
with torch.autocast("cpu", dtype=torch.bfloat16, enabled="--amp" in flags):
    outputs = model(samples, targets, **kwargs)
losses = criterion(outputs, targets, **kwargs)
total = sum(losses[k] * criterion.weight_dict[k] for k in sorted(losses) if k in criterion.weight_dict)
total.backward()
grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
torch.save({"losses": {k: v.detach() for k, v in losses.items()}, "weight_dict": criterion.weight_dict,
            "grads": grads, "rng": torch.get_rng_state()}, out_file)
'''


def run_probe(tree: Path, flags: str, weights: str, out: Path) -> None:
    subprocess.run([sys.executable, "-c", PROBE, flags, weights, str(out)], cwd=tree, check=True,
                   stderr=subprocess.DEVNULL)


def compare(a: dict, b: dict) -> list[str]:
    import torch

    problems = []
    for part in ("losses", "grads"):
        if set(a[part]) != set(b[part]):
            problems.append(f"{part}: keys differ: {sorted(set(a[part]) ^ set(b[part]))[:6]}")
        for k in set(a[part]) & set(b[part]):
            if not torch.equal(a[part][k], b[part][k]):
                problems.append(f"{part} {k}: max diff {(a[part][k] - b[part][k]).abs().max().item():.3g}")
    if a["weight_dict"] != b["weight_dict"]:
        problems.append("weight_dict differs")
    if not torch.equal(a["rng"], b["rng"]):
        problems.append("global generator state after the step differs (draws in another order)")
    return problems


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ref", help="the other commit (e.g. HEAD~1)")
    parser.add_argument("--only", nargs="*", default=None, help="configuration names")
    args = parser.parse_args()
    failed = 0
    with tempfile.TemporaryDirectory() as tmp:
        other = Path(tmp) / "other"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(other), args.ref], cwd=ROOT, check=True)
        try:
            configs = [(name, f"{TINY} {extra}") for name, extra in CONFIGS.items()]
            configs += [(name, f"{FROZEN} {extra}") for name, extra in FROZEN_CONFIGS.items()]
            for name, flags in configs:
                if args.only and name not in args.only:
                    continue
                theirs, ours = Path(tmp) / f"{name}.theirs", Path(tmp) / f"{name}.ours"
                run_probe(other, flags, "save", theirs)
                run_probe(ROOT, flags, str(theirs) + ".weights", ours)
                problems = compare(torch.load(theirs, weights_only=True), torch.load(ours, weights_only=True))
                print(f"{name:32s} {'bitwise equal' if not problems else 'DIFFERS: ' + '; '.join(problems[:4])}")
                failed += bool(problems)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=ROOT, check=False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
