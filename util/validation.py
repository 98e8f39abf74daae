"""Validation of parsed flags: impossible values and combinations are refused before anything is built.

Reads only the flags (no model or data code), so every layer may call it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from util.errors import FlagError


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
                 "weight_decay", "clip_max_norm", "num_queries_one2many", "dn_max_queries", "ema_warmup_steps",
                 "log_instability"):
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
    within("ema_decay", 0, 1, "in [0, 1] (the weight of the old EMA at each update; DINO: 0.9997)")
    within("soft_nms", 0, 1, "an IoU in [0, 1] (0: off; Co-DINO: 0.8)")
    for dest in ("min_lr", "warmup_lr", "warmup_epochs"):
        at_least(dest, 0)
    if v.get("num_patterns") and v.get("model") not in ("dab_detr", "dn_dab_detr"):
        problems.append(f"--num_patterns: only 0 is supported (DAB pattern embeddings; -m dab_detr and dn_dab_detr "
                        f"have them), got {v['num_patterns']}")
    if _addon_on(args, "hybrid", (v.get("num_queries_one2many") or 0) > 0):
        at_least("k_one2many", 1, " with the hybrid branch on (--num_queries_one2many > 0)")
    if _addon_on(args, "dn", bool(v.get("use_dn"))):
        if v.get("contrastive"):
            at_least("dn_number", 1, " with contrastive denoising on (--contrastive)")
        else:
            at_least("scalar", 1, " with denoising on (--use_dn)")
    if _addon_on(args, "ms_detr", bool(v.get("use_ms_detr"))):
        at_least("o2m_matcher_k", 1, " with MS-DETR on (--use_ms_detr)")
    if _addon_on(args, "od", False):
        at_least("od_aux_per_gt", 1, " with OD-DETR on (--addons od)")
        within("od_pd_score_threshold", 0, 1, "in [0, 1] (a sigmoid score) with OD-DETR on (--addons od)")
        for dest in ("od_mqf_beta", "od_md_teacher_box_coef", "od_pd_cls_coef", "od_pd_bbox_coef",
                     "od_pd_giou_coef", "od_aux_loss_coef"):
            at_least(dest, 0, " with OD-DETR on (--addons od)")
    problems += teach_flag_problems(v, _addon_on(args, "teach", bool(v.get("ensemble"))))
    if _addon_on(args, "co_detr", False):
        if v.get("model") not in (None, "deformable_detr", "dino"):
            problems.append(f"--addons co_detr runs on -m deformable_detr (--two_stage) and -m dino "
                            f"(Co-Deformable-DETR, Co-DINO), got -m {v['model']}")
        if v.get("co_heads") is not None and not v["co_heads"]:
            problems.append("--co_heads must name at least one auxiliary head (rcnn, atss)")
        at_least("max_pos_coords", 1, " with Co-DETR on")
        at_least("num_dec_layer", 1, " with Co-DETR on")
    if v.get("input_scale") is not None and not v["input_scale"] > 0:
        problems.append(f"--input_scale must be > 0 (a multiplier of the official sizes), got {v['input_scale']}")
    for dest in ("train_max_size", "val_size", "val_max_size"):
        at_least(dest, 1, " (pixels)")
    for dest in ("train_scales", "crop_scales", "crop_size"):
        if v.get(dest) is not None and min(v[dest]) < 1:
            problems.append(f"--{dest} must be positive pixel sizes, got {' '.join(map(str, v[dest]))}")
    crop = v.get("crop_size")
    if crop is not None and min(crop) >= 1 and crop[0] > crop[1]:
        problems.append(f"--crop_size MIN MAX needs MIN <= MAX, got {crop[0]} {crop[1]}")
    problems += run_flag_problems(v)
    problems += backbone_flag_problems(v)
    return problems


def backbone_flag_problems(v: dict[str, Any]) -> list[str]:
    """Backbone speed flags on a model without the part they act on: YOLOS (a ViT: no CNN body, no BatchNorm);
    --amp_backbone_half also on backbones without frozen BatchNorm (timm, --backbone_from_scratch)."""
    problems: list[str] = []
    on = [f"--{dest}" for dest in ("amp_backbone_half", "channels_last") if v.get(dest)]
    if on and v.get("model") == "yolos":
        problems.append(f"{'/'.join(on)}: -m yolos is a plain ViT, with no CNN backbone or BatchNorm to act on")
    elif v.get("amp_backbone_half"):
        if v.get("backbone") not in (None, "resnet18", "resnet34", "resnet50", "resnet101"):
            problems.append(f"--amp_backbone_half acts on the frozen BatchNorm of --backbone resnet18/34/50/101, got "
                            f"{v['backbone']} (which has none)")
        elif v.get("backbone_from_scratch"):
            problems.append("--amp_backbone_half acts on the frozen BatchNorm; with --backbone_from_scratch it is "
                            "trainable (nn.BatchNorm2d, which already keeps the autocast dtype)")
    return problems


def teach_flag_problems(v: dict[str, Any], on: bool) -> list[str]:
    """Teach-DETR (--ensemble): teacher files given, weights only for named teachers, non-negative weights."""
    problems: list[str] = []
    files, weights = v.get("ext_ann_files"), v.get("ext_ann_weights")
    if on and (v.get("lambda_ensemble") or 0) < 0:
        problems.append(f"--lambda_ensemble must be >= 0, got {v['lambda_ensemble']}")
    if on and not files and not v.get("eval") and isinstance(files, dict):
        problems.append("--ensemble (Teach-DETR) needs the teachers' detections: --ext-ann-files NAME=FILE.json "
                        "[NAME=FILE.json ...] (or one JSON object)")
    if isinstance(files, dict) and isinstance(weights, dict):
        unknown = sorted(set(weights) - set(files))
        if unknown:
            problems.append(f"--ext-ann-weights names teachers that --ext-ann-files does not give: {unknown} "
                            f"(teachers: {sorted(files)})")
        negative = {k: w for k, w in weights.items() if w < 0}
        if negative:
            problems.append(f"--ext-ann-weights must be >= 0, got {negative}")
    return problems


def validate_args(args: Any) -> None:
    """Refuse impossible flag values and combinations before anything is built.

    Raises:
        FlagError: every problem found, in one line.
    """
    problems = flag_problems(args)
    if problems:
        raise FlagError("; ".join(problems))


def run_flag_problems(v: dict[str, Any]) -> list[str]:
    """Values that cannot work together: --device, the resume flags, the matcher costs, --dilation, --msda_impl
    (values only; the paths are checked by :func:`validate_run`)."""
    problems: list[str] = []
    device = v.get("device")
    if isinstance(device, str):
        try:
            kind = torch.device(device).type
        except (RuntimeError, ValueError):
            kind = None
        if kind in (None, "meta"):
            problems.append(f"--device must be cpu, cuda or cuda:N (or another torch device: mps, xpu), got {device!r}")
    if v.get("auto_resume") and v.get("output_dir") == "":
        problems.append("--auto_resume needs --output_dir (the folder whose newest checkpoint it continues from)")
    if v.get("resume_weights_only") and not v.get("resume") and not v.get("auto_resume"):
        problems.append("--resume_weights_only needs --resume FILE (or --auto_resume)")
    if v.get("eval_ema") and not v.get("eval"):
        problems.append("--eval_ema evaluates a checkpoint's EMA weights: it needs --eval --resume FILE (training "
                        "evaluates the EMA every epoch with --use_ema)")
    costs = [v.get(f"set_cost_{k}") for k in ("class", "bbox", "giou")]
    if None not in costs and not any(costs):
        problems.append("--set_cost_class, --set_cost_bbox and --set_cost_giou are all 0: the matcher needs one cost")
    if v.get("dilation") and v.get("backbone") not in (None, "resnet50", "resnet101"):
        problems.append(f"--dilation (DC5) needs --backbone resnet50 or resnet101 (Bottleneck ResNets), got "
                        f"{v['backbone']}")
    impl = v.get("msda_impl")
    if impl is not None and impl not in ("auto", "pytorch", "cpu", "cuda"):
        problems.append(f"--msda_impl must be auto, pytorch, cpu or cuda, got {impl!r}")
    elif impl == "cuda" and isinstance(device, str) and device.startswith("cpu"):
        problems.append("--msda_impl cuda runs on CUDA tensors only; with --device cpu use auto, pytorch or cpu")
    return problems


def validate_run(args: Any) -> None:
    """Refuse a run that cannot work here, before anything is made (paths are looked at, nothing is created):
    --output_dir that is a file or inside one, --resume that is a folder or (without --auto_resume) missing,
    --eval with no checkpoint to evaluate. (Kept apart from :func:`validate_args`, which config scripts with
    placeholder paths also pass.)

    Raises:
        FlagError: every problem found, in one line.
    """
    v, problems = vars(args), []
    if v.get("eval") and not v.get("resume") and not v.get("auto_resume"):
        problems.append("--eval: nothing to evaluate (a model that was not trained): pass --resume FILE, a checkpoint "
                        "of this model")
    out = v.get("output_dir")
    if out:
        existing = next((p for p in [Path(out), *Path(out).parents] if p.exists()), None)
        if existing is not None and not existing.is_dir():
            where = "is a file" if existing == Path(out) else f"is inside {existing}, which is a file"
            problems.append(f"--output_dir {out} {where}; give a folder (it is created when missing)")
    resume = v.get("resume")
    if resume and Path(resume).is_dir():
        problems.append(f"--resume {resume} is a folder; give a checkpoint file, or --output_dir {resume} "
                        "--auto_resume for its newest checkpoint")
    elif resume and not Path(resume).exists() and not v.get("auto_resume"):
        problems.append(f"--resume {resume}: no such file")
    if problems:
        raise FlagError("; ".join(problems))
