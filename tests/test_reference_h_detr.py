"""Training steps of the official H-DETR (tests/data/reference/h_detr_pp*_train.pt) are reproduced.

Made here (2026-12-05) like the other reference files: HDETR/H-Deformable-DETR @f58ceb1 on CPU (its CUDA op replaced
by the grid_sample core it ships; its Swin, mmcv and wandb imports stubbed; no ImageNet download), the deterministic
weights, dino_4scale.pt's images and targets (large enough for 600 proposals). Deformable-DETR++ (``--with_box_refine
--two_stage --mixed_selection --look_forward_twice --dropout 0``, H-DETR's 2048-wide FFN), alone and with the hybrid
branch (``--num_queries_one2many 300 --k_one2many 6``, its loss as the engine's ``train_hybrid`` computes it). Ours
runs the engine's calling convention (the add-ons' step context). Checked: the total (1e-4), every weighted term,
the one-to-many ones included (2e-5 relative: they agree to 4e-7), and every parameter's gradient norm (1e-3
relative; look forward twice and the refinement's detach points act in the backward only).
"""
from __future__ import annotations

import pytest
import torch

from models.addons import StepContext
from tests.test_reference import REF_DIR, load_reference
from util.misc import nested_tensor_from_tensor_list

NAMES = ["h_detr_pp_train", "h_detr_pp_hybrid_train"]
pytestmark = pytest.mark.skipif(not all((REF_DIR / f"{n}.pt").is_file() for n in NAMES),
                                reason="reference files absent")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_training_step_matches(name):
    ref, model, criterion, _ = load_reference(name)
    model.train()
    samples = nested_tensor_from_tensor_list(ref["images"])
    ctx = StepContext(images=samples, targets=ref["targets"])
    outputs = model(samples, ref["targets"], ctx=ctx)
    losses = criterion(outputs, ref["targets"], ctx=ctx)
    total = criterion.total_loss(losses)
    total.backward()
    assert total.item() == pytest.approx(float(ref["total"]), rel=1e-4)
    weighted = {k: w for k, w in ref["weight_dict"].items() if w and k in ref["losses"]}
    assert len(weighted) == (39 if "hybrid" in name else 21)
    for key, w in weighted.items():
        assert criterion.weight_dict[key] == w, key
        assert losses[key].item() * w == pytest.approx(float(ref["losses"][key]) * w, rel=2e-5, abs=1e-6), key
    params = dict(model.named_parameters())
    assert set(ref["grad_norms"]) == {n for n, p in params.items() if p.requires_grad}
    for pname, norm in ref["grad_norms"].items():
        grad = params[pname].grad
        ours = 0.0 if grad is None else grad.norm().item()
        assert ours == pytest.approx(float(norm), rel=1e-3, abs=1e-7), pname
    grad_norm = torch.stack([p.grad.norm() for p in params.values() if p.grad is not None]).norm()
    assert grad_norm.item() == pytest.approx(float(ref["grad_norm"]), rel=1e-4)
