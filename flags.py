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
from typing import Sequence

from models.registry import ADDONS, MODELS, model_defaults
from util.ema import add_args as add_ema_args
from util.errors import FlagError  # noqa: F401  (re-exported: raised by validate_args)
from util.lr_schedule import add_args as add_schedule_args
from util.validation import flag_problems, validate_args  # noqa: F401  (re-exported)


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
    g.add_argument("--fused_optimizer", default=False, action=argparse.BooleanOptionalAction,
                   help="opt-in: AdamW in torch's fused kernel (one pass per parameter; the same formula, rounded "
                        "differently in the last bit, so a run drifts from the official one); default: torch's "
                        "loop, as the official code")
    g.add_argument("--amp", action="store_true", help="mixed precision (see --amp_dtype)")
    g.add_argument("--amp_dtype", default="bf16", type=_str2dtype, help="bf16 (no scaler) or fp16 (GradScaler)")
    g.add_argument("--use_fp16", action="store_true", help="H-DETR's flag: same as --amp --amp_dtype fp16")
    g.add_argument("--amp_backbone_half", action="store_true",
                   help="opt-in, with --amp: the ResNet's frozen BatchNorm keeps the autocast dtype, so the backbone "
                        "runs in bf16/fp16 (its maps are handed on in fp32); default: the fp32 BatchNorm promotes "
                        "every backbone activation to fp32, as the official code")
    g.add_argument("--channels_last", action="store_true",
                   help="opt-in: the CNN backbone runs in the channels-last memory format (faster bf16/fp16 convs on "
                        "tensor-core GPUs; convs round differently); checkpoints load with and without it")


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
    g.add_argument("--pre_norm", action="store_true", help="DETR: pre-norm transformer layers (default post-norm)")
    g.add_argument("--num_queries", "--num_queries_one2one", dest="num_queries", default=300, type=int)
    g.add_argument("--dec_n_points", default=4, type=int)
    g.add_argument("--enc_n_points", default=4, type=int)
    g.add_argument("--masks", action="store_true", help="accepted, segmentation (unsupported)")
    g.add_argument("--no_aux_loss", dest="aux_loss", action="store_false")
    g.add_argument("--mixed_selection", action="store_true", help="H-DETR/DINO mixed query selection")
    g.add_argument("--look_forward_twice", action="store_true", help="H-DETR/DINO look forward twice")
    g.add_argument("--use_checkpoint", action="store_true", help="activation checkpointing (less memory)")
    g.add_argument("--compile", action="store_true",
                   help="torch.compile the backbone and every encoder/decoder layer in place (off: see README)")
    g.add_argument("--compile_mode", default="default", choices=["default", "reduce-overhead", "max-autotune"])
    g.add_argument("--compile_backend", default="inductor", help="torch.compile backend (inductor; eager for tests)")
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
    g.add_argument("--soft_nms", default=0.0, type=float, metavar="IOU",
                   help="evaluation: class-wise linear soft-NMS at this IoU over the top --num_queries (query, class) "
                        "pairs, keeping the model's top-k count (Co-DINO: 0.8); 0: off, the DETRs' NMS-free top-k")
    g.add_argument("--cls_loss", default="focal", choices=("focal", "softmax", "qfl"),
                   help="classification loss and matching cost: sigmoid focal (Deformable-DETR and later), DETR's "
                        "softmax cross-entropy with a 'no object' logit (detr, yolos), or qfl: Co-DINO's quality "
                        "focal loss (beta 2, the matched class's target is the box's IoU; focal matching cost)")
    g.add_argument("--eos_coef", default=0.1, type=float,
                   help="--cls_loss softmax: relative weight of the 'no object' class (DETR)")
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
    g.add_argument("--resume_weights_only", action="store_true",
                   help="load only the weights that fit from --resume/--auto_resume (another model: its flags may "
                        "differ) and start a new optimizer, schedule and epoch count")
    g.add_argument("--overwrite", action="store_true",
                   help="start at epoch 0 even if --output_dir holds an earlier run (its log.txt and checkpoints "
                        "are deleted)")
    g.add_argument("--schedule_from_args", action="store_true",
                   help="on resume, take lr/lr_drop from the command line (the official behaviour, also the default "
                        "when they differ from the checkpoint's)")
    g.add_argument("--schedule_from_checkpoint", action="store_true",
                   help="on resume, keep the checkpoint's lr/lr_drop even when the command line differs "
                        "(deliberate difference; official: the command line wins)")
    g.add_argument("--start_epoch", default=0, type=int, metavar="N")
    g.add_argument("--eval", action="store_true")
    g.add_argument("--num_workers", default=2, type=int)
    g.add_argument("--cache_mode", default=False, action="store_true", help="keep images in memory")
    g.add_argument("--print_freq", default=10, type=int, help="iterations between progress lines")
    g.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard scalars to output_dir/tensorboard (needs: pip install tensorboard)")
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
    add_schedule_args(p)
    add_ema_args(p)
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
