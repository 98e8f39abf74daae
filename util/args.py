"""Command-line flags: every official Deformable-DETR flag with its default, H-DETR's "++" flags,
and this project's own (AMP, resume, op implementation); registered models and add-ons add groups.

``-m NAME`` brings the defaults of the repository that model comes from (``register_model(defaults=...)``) for
every flag the command line does not give; every on/off flag has a ``--no-<flag>``; ``validate_args`` refuses
impossible values before anything is built.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from typing import Any, Sequence

from models.registry import ADDONS, MODELS, model_defaults
from util.errors import FlagError  # noqa: F401  (re-exported: raised by validate_args)


def _str2dtype(v: str) -> str:
    if v not in ("bf16", "fp16"):
        raise argparse.ArgumentTypeError("--amp_dtype must be bf16 or fp16")
    return v


def add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation (official defaults)")
    g.add_argument("--lr", default=2e-4, type=float)
    g.add_argument("--lr_backbone_names", default=["backbone.0"], type=str, nargs="+")
    g.add_argument("--lr_backbone", default=2e-5, type=float)
    g.add_argument("--lr_linear_proj_names", default=["reference_points", "sampling_offsets"], type=str, nargs="+")
    g.add_argument("--lr_linear_proj_mult", default=0.1, type=float)
    g.add_argument("--batch_size", default=2, type=int, help="per process")
    g.add_argument("--weight_decay", default=1e-4, type=float)
    g.add_argument("--epochs", default=50, type=int)
    g.add_argument("--lr_drop", default=40, type=int)
    g.add_argument("--lr_drop_epochs", default=None, type=int, nargs="+", help="accepted, unused (as official)")
    g.add_argument("--clip_max_norm", default=0.1, type=float, help="gradient clipping max norm (0: off)")
    g.add_argument("--sgd", action="store_true")
    g.add_argument("--amp", action="store_true", help="mixed precision (see --amp_dtype)")
    g.add_argument("--amp_dtype", default="bf16", type=_str2dtype, help="bf16 (no scaler) or fp16 (GradScaler)")
    g.add_argument("--use_fp16", action="store_true", help="H-DETR's flag: same as --amp --amp_dtype fp16")


def add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model (official Deformable-DETR flags + H-DETR ++)")
    g.add_argument("-m", "--model", default="deformable_detr", choices=MODELS.names())
    g.add_argument("--with_box_refine", default=False, action="store_true")
    g.add_argument("--two_stage", default=False, action="store_true")
    g.add_argument("--frozen_weights", type=str, default=None, help="accepted, segmentation only (unsupported)")
    g.add_argument("--backbone", default="resnet50", type=str,
                   help="resnet18/34/50/101, or a timm model: swin_tiny, swin_small, swin_large, timm:<name>")
    g.add_argument("--pretrained_backbone_path", default=None, type=str,
                   help="local file with backbone weights (nothing is downloaded)")
    g.add_argument("--backbone_from_scratch", action="store_true",
                   help="no pretrained weights: trainable BatchNorm and all ResNet stages trained")
    g.add_argument("--drop_path_rate", default=0.2, type=float, help="timm backbones (Swin)")
    g.add_argument("--dilation", action="store_true", help="DC5: dilate the last ResNet stage")
    g.add_argument("--position_embedding", default="sine", type=str, choices=("sine", "learned"))
    g.add_argument("--position_embedding_scale", default=2 * math.pi, type=float, help="accepted, unused")
    g.add_argument("--num_feature_levels", default=4, type=int)
    g.add_argument("--enc_layers", default=6, type=int)
    g.add_argument("--dec_layers", default=6, type=int)
    g.add_argument("--dim_feedforward", default=1024, type=int)
    g.add_argument("--hidden_dim", default=256, type=int)
    g.add_argument("--dropout", default=0.1, type=float)
    g.add_argument("--nheads", default=8, type=int)
    g.add_argument("--num_queries", "--num_queries_one2one", dest="num_queries", default=300, type=int)
    g.add_argument("--dec_n_points", default=4, type=int)
    g.add_argument("--enc_n_points", default=4, type=int)
    g.add_argument("--masks", action="store_true", help="accepted, segmentation (unsupported)")
    g.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")
    g.add_argument("--mixed_selection", action="store_true", help="H-DETR/DINO mixed query selection")
    g.add_argument("--look_forward_twice", action="store_true", help="H-DETR/DINO look forward twice")
    g.add_argument("--use_checkpoint", action="store_true", help="activation checkpointing (less memory)")
    g.add_argument("--num_classes", default=None, type=int,
                   help="class logits; default: 91 for COCO, max category id + 1 of the annotation file")
    g.add_argument("--topk", "--topk_eval", dest="topk", default=100, type=int, help="detections per image")
    g.add_argument("--msda_impl", default="auto", type=str,
                   help="deformable-attention implementation: auto, pytorch, cpu, cuda")
    g.add_argument("--addons", default=[], nargs="*", choices=ADDONS.names(),
                   help="training add-ons (the seed papers' own flags also switch them on)")

    g = p.add_argument_group("matcher and loss (official defaults)")
    g.add_argument("--set_cost_class", default=2, type=float)
    g.add_argument("--set_cost_bbox", default=5, type=float)
    g.add_argument("--set_cost_giou", default=2, type=float)
    g.add_argument("--mask_loss_coef", default=1, type=float)
    g.add_argument("--dice_loss_coef", default=1, type=float)
    g.add_argument("--cls_loss_coef", default=2, type=float)
    g.add_argument("--bbox_loss_coef", default=5, type=float)
    g.add_argument("--giou_loss_coef", default=2, type=float)
    g.add_argument("--focal_alpha", default=0.25, type=float)
    for term, main in (("cls", "--cls_loss_coef"), ("bbox", "--bbox_loss_coef"), ("giou", "--giou_loss_coef")):
        g.add_argument(f"--enc_{term}_loss_coef", default=None, type=float,
                       help=f"encoder-proposal loss (MS-DETR's flag); default: the value of {main}")


def add_run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data and run")
    g.add_argument("--dataset_file", default="coco", choices=("coco", "synthetic"))
    g.add_argument("--coco_path", default=None, type=str,
                   help="data root (default ./data/coco, or data/synthetic for the synthetic set)")
    g.add_argument("--coco_panoptic_path", type=str, help="accepted, unused")
    g.add_argument("--remove_difficult", action="store_true", help="accepted, unused")
    g.add_argument("--output_dir", default="", help="where to save checkpoints and log.txt; empty: no saving")
    g.add_argument("--device", default="cuda", help="cuda or cpu (cuda falls back to cpu when absent)")
    g.add_argument("--seed", default=42, type=int)
    g.add_argument("--resume", default="", help="checkpoint to resume from (local path)")
    g.add_argument("--auto_resume", action="store_true", help="continue from output_dir's newest good checkpoint")
    g.add_argument("--schedule_from_args", action="store_true",
                   help="on resume, take lr/lr_drop from the command line instead of the checkpoint")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N")
    g.add_argument("--eval", action="store_true")
    g.add_argument("--num_workers", default=2, type=int)
    g.add_argument("--cache_mode", default=False, action="store_true", help="keep images in memory")
    g.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines")
    g.add_argument("--max_iters_per_epoch", default=0, type=int, help="stop an epoch early (smoke tests)")
    g.add_argument("--eval_every", default=1, type=int, help="evaluate every N epochs (and after the last)")
    g.add_argument("--save_every", default=5, type=int, help="keep checkpoint{epoch:04}.pth every N epochs")
    g.add_argument("--find_unused_params", action="store_true", help="DDP find_unused_parameters (DINO's flag)")
    g.add_argument("--max_nonfinite_steps", default=10, type=int,
                   help="stop after this many consecutive non-finite losses (each is skipped)")


class _Unset:
    """Stands for "not on the command line" while the model's defaults are applied."""

    def __repr__(self) -> str:
        return "<model default>"


_UNSET = _Unset()


class ModelDefaultsParser(argparse.ArgumentParser):
    """An ArgumentParser that applies the chosen model's defaults to every flag the command line does not give.

    ``parse_known_args`` (and so ``parse_args``) parses once to find ``-m/--model``, then again with the model's
    flags marked unset; those still unset get the model's value. The applied ones (not given by the user) are
    stored as ``args.model_defaults`` (a plain dict). The parser is left as it was.
    """

    def parse_known_args(self, args: Sequence[str] | None = None,
                         namespace: argparse.Namespace | None = None) -> tuple[argparse.Namespace, list[str]]:
        args = sys.argv[1:] if args is None else list(args)
        probe, _ = super().parse_known_args(args, copy.copy(namespace))
        name = getattr(probe, "model", None)
        values = dict(model_defaults(name).values) if name is not None else {}
        actions = [a for a in self._actions if a.dest in values and a.default is not argparse.SUPPRESS]
        unknown = set(values) - {a.dest for a in actions}
        if unknown:
            raise KeyError(f"model {name!r} declares defaults for unknown flags: {sorted(unknown)}")
        saved = [(a, a.default) for a in actions]
        try:
            for a in actions:
                a.default = _UNSET
            ns, extra = super().parse_known_args(args, namespace)
        finally:
            for a, default in saved:
                a.default = default
        applied = {}
        for dest, value in values.items():
            if getattr(ns, dest) is _UNSET:
                setattr(ns, dest, value)
                applied[dest] = value
        ns.model_defaults = applied
        return ns, extra


def add_negations(p: argparse.ArgumentParser) -> None:
    """Give every on/off (store-true) flag ``--X`` a ``--no-X``, so that a model default can be turned off."""
    for action in list(p._actions):
        if action.nargs != 0 or action.const is not True or action.default not in (False, None):
            continue  # not a store-true flag (BooleanOptionalAction has its own --no-X)
        negs = [f"--no-{o[2:]}" for o in action.option_strings if o.startswith("--")]
        negs = [o for o in negs if o not in p._option_string_actions]
        if negs:
            p.add_argument(*negs, dest=action.dest, action="store_false", default=argparse.SUPPRESS,
                           help=argparse.SUPPRESS)


def describe_model_defaults(args: argparse.Namespace) -> str:
    """One line naming the model, the source of its defaults and those applied (for the run's log)."""
    info = model_defaults(args.model)
    applied = getattr(args, "model_defaults", None) or {}
    if not info.values:
        return f"model {args.model}: defaults of {info.source}"
    listed = " ".join(f"{k}={v}" for k, v in applied.items()) or "none (all given on the command line)"
    return f"model {args.model}: defaults of {info.source}: {listed}"


def get_args_parser() -> argparse.ArgumentParser:
    """The full parser: base flags, data flags, and each registered model's and add-on's group."""
    import datasets  # noqa: F401  (data flags)

    p = ModelDefaultsParser("Deformable-DETR family training and evaluation", add_help=True,
                            epilog="-m NAME applies the defaults of the repository NAME comes from to every flag "
                                   "not given; every on/off flag --X can be turned off with --no-X.")
    add_training_args(p)
    add_model_args(p)
    add_run_args(p)
    if hasattr(datasets, "add_args"):
        datasets.add_args(p)
    seen = set()
    for _, builder in MODELS.items():
        add = getattr(builder, "add_args", None)
        if add is not None and add not in seen:
            seen.add(add)
            add(p)
    for _, cls in ADDONS.items():
        cls.add_args(p)
    add_negations(p)
    return p


def finalize_args(args: argparse.Namespace) -> argparse.Namespace:
    """Resolve aliases after parsing (H-DETR's --use_fp16, data-dependent defaults)."""
    if args.use_fp16:
        args.amp, args.amp_dtype = True, "fp16"
    return args



def _addon_on(args: Any, name: str, seed_flag_on: bool) -> bool:
    return seed_flag_on or name in (getattr(args, "addons", None) or [])


def flag_problems(args: Any) -> list[str]:
    """What is wrong with the flags, one message per problem naming the flag and the supported values.

    Flags absent from ``args`` (a hand-made namespace) are not checked.
    """
    v = vars(args)
    problems: list[str] = []

    def at_least(dest: str, low: float, what: str = "") -> None:
        if v.get(dest) is not None and v[dest] < low:
            problems.append(f"--{dest} must be >= {low:g}{what}, got {v[dest]}")

    def within(dest: str, low: float, high: float, text: str) -> None:
        if v.get(dest) is not None and not low <= v[dest] <= high:
            problems.append(f"--{dest} must be {text}, got {v[dest]}")

    within("num_feature_levels", 1, 5, "1 to 5 (backbone levels plus extra stride-2 levels)")
    at_least("enc_layers", 0)
    for dest in ("dec_layers", "nheads", "num_queries", "dec_n_points", "enc_n_points", "dim_feedforward", "topk",
                 "num_select", "batch_size", "lr_drop", "save_every", "eval_every", "print_freq",
                 "max_nonfinite_steps", "num_classes", "synthetic_train_size", "synthetic_val_size"):
        at_least(dest, 1)
    for dest in ("epochs", "start_epoch", "num_workers", "max_iters_per_epoch", "lr", "lr_linear_proj_mult",
                 "weight_decay", "clip_max_norm", "num_queries_one2many", "dn_max_queries"):
        at_least(dest, 0)
    at_least("synthetic_image_size", 32, " (the backbone's stride)")
    if v.get("dataset_file") == "synthetic" and not v.get("eval") and (v.get("batch_size") or 0) >= 1:
        at_least("synthetic_train_size", v["batch_size"], " (--batch_size: one full batch)")
    hidden, heads = v.get("hidden_dim"), v.get("nheads")
    if hidden is not None and (hidden < 32 or hidden % 32):
        problems.append(f"--hidden_dim must be a positive multiple of 32 (GroupNorm(32) in the input projection), "
                        f"got {hidden}")
    elif hidden is not None and heads and heads >= 1 and hidden % heads:
        problems.append(f"--nheads must divide --hidden_dim {hidden}, got {heads}")
    if v.get("dropout") is not None and not 0 <= v["dropout"] < 1:
        problems.append(f"--dropout must be in [0, 1), got {v['dropout']}")
    if v.get("drop_path_rate") is not None and not 0 <= v["drop_path_rate"] < 1:
        problems.append(f"--drop_path_rate must be in [0, 1), got {v['drop_path_rate']}")
    within("seed", 0, 2**32 - 1, "in [0, 2**32 - 1] (numpy's seed range)")
    if v.get("num_patterns"):
        problems.append(f"--num_patterns: only 0 is supported (DAB pattern embeddings), got {v['num_patterns']}")
    if _addon_on(args, "hybrid", (v.get("num_queries_one2many") or 0) > 0):
        at_least("k_one2many", 1, " with the hybrid branch on (--num_queries_one2many > 0)")
    if _addon_on(args, "dn", bool(v.get("use_dn"))):
        if v.get("contrastive"):
            at_least("dn_number", 1, " with contrastive denoising on (--contrastive)")
        else:
            at_least("scalar", 1, " with denoising on (--use_dn)")
    if _addon_on(args, "ms_detr", bool(v.get("use_ms_detr"))):
        at_least("o2m_matcher_k", 1, " with MS-DETR on (--use_ms_detr)")
    return problems


def validate_args(args: Any) -> None:
    """Refuse impossible flag values and combinations before anything is built.

    Raises:
        FlagError: every problem found, in one line.
    """
    problems = flag_problems(args)
    if problems:
        raise FlagError("; ".join(problems))
