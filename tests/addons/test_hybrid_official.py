"""H-DETR's one-to-many loss is official by default: every term and every gradient, bitwise.

tests/data/hybrid_official_one2many_loss.pt holds, for two small cases (an image without ground truth among them),
what the released H-Deformable-DETR computes (as shipped in LeonHLJ/Teach-DETR @8e15829: engine.py
``train_hybrid``'s ``criterion(inputs, outputs_one2many, multi_targets, True)`` with the ground truth repeated k = 6
times, models/deformable_detr.py ``SetCriterion`` with its ``HungarianMatcher(2, 5, 2)``) on fixed one-to-many outputs
of the last and two aux layers (6 classes, 20 queries). It was produced once, outside this repository, on CPU (its
CUDA op, Swin and Mask R-CNN imports stubbed), recording every weighted term and the gradients of the weighted
total (lambda_one2many 1) with respect to the outputs. Ours runs the whole criterion (the add-on's group, the
repeated targets, the normaliser, the staged matching).
"""
from pathlib import Path

import pytest
import torch

from models import build_model
from tests.conftest import tiny_args

CASES = torch.load(Path(__file__).resolve().parents[1] / "data" / "hybrid_official_one2many_loss.pt")["cases"]


@pytest.fixture(scope="module")
def criterion():
    return build_model(tiny_args("--with_box_refine", "--two_stage", "--num_queries_one2many", "20", "--k_one2many",
                                 "6", "--num_classes", "6", "--dec_layers", "3"))[1]


@pytest.mark.parametrize("case", CASES, ids=[f"case{c['seed']}" for c in CASES])
def test_one2many_terms_and_gradients_are_the_official_ones(criterion, case):
    assert case["k"] == 6
    leaves = [{k: v.clone().requires_grad_() for k, v in layer.items()} for layer in case["layers"]]
    main = {k: torch.zeros(len(case["targets"]), 5, v.shape[-1]) for k, v in case["layers"][0].items()}
    outputs = {**main, "aux_outputs": [dict(main), dict(main)],
               "groups": {"one2many": {**leaves[0], "aux_outputs": leaves[1:]}}}
    losses = criterion(outputs, case["targets"])
    total = 0
    for name, value in case["losses"].items():  # official keys: loss_ce, loss_ce_0, ...
        ours = f"{name}_one2many"
        assert torch.equal(losses[ours], value.reshape(())), name
        total = total + losses[ours] * criterion.weight_dict[ours]
    assert torch.equal(total, case["total"])
    total.backward()
    for mine, theirs in zip(leaves, case["grads"]):
        for key in mine:
            assert torch.equal(mine[key].grad, theirs[key]), key
