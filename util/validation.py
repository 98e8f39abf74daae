"""Validation of parsed flags: impossible values and combinations are refused before anything is built.

Reads only the flags (no model or data code), so every layer may call it.
"""
from __future__ import annotations

from typing import Any

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
