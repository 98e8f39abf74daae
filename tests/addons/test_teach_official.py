"""Teach-DETR's ensemble loss is official by default: every term and every gradient, bitwise.

tests/data/teach_official_ensemble_loss.pt holds, for three small cases (an image without teacher boxes among
them), what the official criterion computes: LeonHLJ/Teach-DETR @8e15829 H-Deformable-DETR/models/deformable_detr.py
``SetCriterion.forward(..., is_ensemble=True)`` with its ``HungarianMatcher(2, 5, 2)``, as its engine's
``train_hybrid`` calls it with the (merged) teacher boxes, on fixed outputs of the last, two aux and the encoder
layers (6 classes, 12 queries). It was produced once, outside this repository, on CPU (its CUDA op, Swin and
Mask R-CNN imports stubbed: the criterion does not use them), recording every weighted term, and the gradients of
the weighted total (its weight_dict, lambda_ensemble 1) with respect to the outputs.
"""
from pathlib import Path

import pytest
import torch

from models import build_model
from models.addons import StepContext
from tests.conftest import tiny_args

CASES = torch.load(Path(__file__).resolve().parents[1] / "data" / "teach_official_ensemble_loss.pt")["cases"]


@pytest.fixture(scope="module")
def teach():
    _, criterion, _ = build_model(tiny_args("--with_box_refine", "--two_stage", "--ensemble", "--ext_ann_files",
                                            "t=unused.json", "--num_classes", "6", "--dec_layers", "3"))
    return criterion, next(a for a in criterion.addons if type(a).__name__ == "TeachDETR")


@pytest.mark.parametrize("case", CASES, ids=[f"case{c['seed']}" for c in CASES])
def test_ensemble_terms_and_gradients_are_the_official_ones(teach, case):
    criterion, addon = teach
    leaves = [{k: v.clone().requires_grad_() for k, v in layer.items()} for layer in case["layers"]]
    outputs = {**leaves[0], "aux_outputs": leaves[1:-1], "enc_outputs": leaves[-1]}
    targets = [{"labels": t["labels"], "boxes": t["boxes"], "ext_boxes": t["boxes"], "ext_labels": t["labels"],
                "ext_scores": t["scores"], "ext_teacher": torch.zeros(len(t["labels"]), dtype=torch.long),
                "ext_merged": True} for t in case["teacher"]]
    losses = addon.extra_losses(outputs, StepContext(targets=targets))
    total = 0
    for name, value in case["losses"].items():  # official keys: loss_ce, loss_ce_0, ..., loss_ce_enc
        ours = name.replace("_enc", "_enc_ensemble") if name.endswith("_enc") else f"{name}_ensemble"
        assert torch.equal(losses[ours], value.reshape(losses[ours].shape)), name
        total = total + losses[ours] * criterion.weight_dict[ours]
    assert set(losses) >= {f"{k}_ensemble" for k in case["losses"] if not k.endswith("_enc")}
    assert torch.equal(total, case["total"])
    total.backward()
    for mine, theirs in zip(leaves, case["grads"]):
        for key in mine:
            assert torch.equal(mine[key].grad, theirs[key]), key
