"""Model zoo: ``build_model(args) -> (model, criterion, postprocessors)`` via the registry."""
from __future__ import annotations

import copy
from typing import Any

from torch import nn

from util.compile import compile_model
from util.errors import FlagError
from util.validation import validate_args

from . import (  # noqa: F401  (register the models)
    conditional_detr,
    dab_deformable_detr,
    dab_detr,
    deformable_detr,
    detr,
    dino,
    yolos,
)
from .registry import ADDONS, MODELS, register_addon, register_model  # noqa: F401
from .soft_nms import SoftNMSPostProcess

# Class logits when --num_classes is not given and no annotation file was read (main.py reads the file):
# the official rule for COCO (max category id + 1 = 91); the synthetic set's ids are 1..5.
DEFAULT_NUM_CLASSES = {"coco": 91, "synthetic": 6}


def build_model(args: Any) -> tuple[nn.Module, nn.Module, dict[str, nn.Module]]:
    """Build ``MODELS[args.model]`` with its criterion and post-processors from parsed flags alone.

    ``args`` is what ``main.get_args_parser().parse_args(flags)`` returns; nothing else is needed (no data).
    An unset ``--num_classes`` follows the official rule of ``--dataset_file`` (COCO: 91 logits).
    """
    validate_args(args)  # impossible flag values are refused before anything is built
    if getattr(args, "num_classes", None) is None:
        if args.dataset_file not in DEFAULT_NUM_CLASSES:
            raise ValueError(f"--num_classes is needed for --dataset_file {args.dataset_file!r}")
        args = copy.copy(args)
        args.num_classes = DEFAULT_NUM_CLASSES[args.dataset_file]
    model, criterion, postprocessors = MODELS.get(args.model)(args)
    if getattr(args, "cls_loss", "focal") == "qfl":  # every sigmoid host: its classification terms become QFL
        if getattr(criterion, "cls_loss", "focal") != "focal":
            raise FlagError(f"--cls_loss qfl needs a sigmoid classifier; -m {args.model} uses {criterion.cls_loss}")
        criterion.cls_loss = "qfl"
    if getattr(args, "soft_nms", 0.0) > 0:
        top = postprocessors["bbox"]
        if not hasattr(top, "num_select"):
            raise FlagError(f"--soft_nms needs a sigmoid top-k post-processor; -m {args.model} has "
                            f"{type(top).__name__}")
        postprocessors = {**postprocessors, "bbox": SoftNMSPostProcess(args.soft_nms, args.num_queries,
                                                                       top.num_select)}
    if getattr(args, "compile", False):
        compile_model(model, args.compile_mode, args.compile_backend)
    return model, criterion, postprocessors
