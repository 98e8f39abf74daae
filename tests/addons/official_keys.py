"""Official state-dict key lists (shared/specs) with the H-DETR / MS-DETR deltas of specs/deformable_family.md §2."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import ROOT

KEYS_FILE = ROOT / "tests" / "data" / "official_keys" / "deformable_detr_two_stage_refine.txt"
R50 = [("backbone", "resnet50"), ("hidden_dim", 256), ("nheads", 8), ("enc_layers", 6), ("dec_layers", 6),
       ("num_queries", 300), ("num_classes", 91)]


def official_shapes(ffn: int) -> dict[str, list[int]]:
    """Two-stage + refine Deformable-DETR R50 keys, with every FFN widened to ``ffn``."""
    if not KEYS_FILE.is_file():
        pytest.skip("shared/specs missing")
    shapes = {}
    for line in KEYS_FILE.read_text().splitlines():
        name, shape = line.split()
        dims = [int(x) for x in shape.strip("[]").split(",")] if shape != "[]" else []
        if name.endswith("linear1.weight"):
            dims = [ffn, dims[1]]
        elif name.endswith("linear1.bias"):
            dims = [ffn]
        elif name.endswith("linear2.weight"):
            dims = [dims[0], ffn]
        shapes[name] = dims
    return shapes


def check_strict_load(model: torch.nn.Module, shapes: dict[str, list[int]]) -> None:
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == shapes
    model.load_state_dict({k: torch.zeros(v) for k, v in shapes.items()}, strict=True)
