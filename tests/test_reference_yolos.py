"""hustvl/YOLOS's computations (tests/data/reference/yolos_ti*.pt) are reproduced by ``-m yolos``.

As tests/test_reference_detr.py: the model comes from ``main.get_args_parser().parse_args(ref["flags"])`` alone, the
deterministic weights load strictly under the official names, and outputs (1e-5), every weighted loss term, the
softmax post-processing and, for the training step, the total (1e-4) and every parameter's gradient norm (1e-3
relative) match the official code: YOLOS-Ti (position embeddings stored at 800 x 1333, interpolated to each
input) and YOLOS-Ti with mid position embeddings (``--mid_pe_size 512 864``).
"""
from __future__ import annotations

import pytest
import torch

from tests.test_reference import REF_DIR, load_reference
from util.misc import nested_tensor_from_tensor_list

pytestmark = pytest.mark.skipif(not (REF_DIR / "yolos_ti.pt").is_file(), reason="reference files absent")


@pytest.fixture(scope="module", params=["yolos_ti", "yolos_ti_mid_pe"])
def evaluated(request):
    ref, model, criterion, post = load_reference(request.param)
    model.eval()
    with torch.no_grad():
        out = model(nested_tensor_from_tensor_list(ref["images"]))
        losses = criterion(out, ref["targets"])
        results = post["bbox"](out, ref["target_sizes"])
    return ref, criterion, out, losses, results


def test_defaults_are_the_official_ones():
    import main

    args = main.get_args_parser().parse_args(["-m", "yolos"])
    official = torch.load(REF_DIR / "yolos_ti.pt", weights_only=True)["official_config"]
    for key in ("lr", "lr_backbone", "batch_size", "weight_decay", "epochs", "clip_max_norm", "sched", "lr_drop",
                "warmup_lr", "min_lr", "warmup_epochs", "decay_rate", "backbone_name", "mid_pe_size",
                "set_cost_class", "set_cost_bbox", "set_cost_giou", "bbox_loss_coef", "giou_loss_coef", "eos_coef"):
        assert getattr(args, key) == official[key], key
    assert args.num_queries == official["det_token_num"] == 100 and args.cls_loss == "softmax"


def test_outputs_match(evaluated):
    ref, _, out, _, _ = evaluated
    assert out["pred_logits"].shape == (2, 100, 92)  # 91 COCO logits + "no object"
    torch.testing.assert_close(out["pred_logits"], ref["outputs"]["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pred_boxes"], ref["outputs"]["pred_boxes"], rtol=1e-5, atol=1e-5)


def test_every_weighted_loss_term_and_weight_matches(evaluated):
    ref, criterion, _, losses, _ = evaluated
    weighted = {k: w for k, w in ref["weight_dict"].items() if w}
    assert set(weighted) == {"loss_ce", "loss_bbox", "loss_giou"}  # YOLOS has no auxiliary outputs
    for key, w in weighted.items():
        assert criterion.weight_dict[key] == w, key
        assert losses[key].item() * w == pytest.approx(float(ref["losses"][key]) * w, rel=1e-6, abs=1e-6), key
    for key in ("class_error", "cardinality_error"):
        assert losses[key].item() == pytest.approx(float(ref["losses"][key]), rel=1e-5, abs=1e-6), key


def test_postprocessed_results_match(evaluated):
    ref, _, _, _, results = evaluated
    for ours, theirs in zip(results, ref["results"]):
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-5, atol=1e-5)
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-5, atol=1e-3)  # pixels


def test_training_step_matches():
    ref, model, criterion, _ = load_reference("yolos_ti_train")
    model.train()
    outputs = model(nested_tensor_from_tensor_list(ref["images"]), ref["targets"])
    losses = criterion(outputs, ref["targets"])
    total = criterion.total_loss(losses)
    total.backward()
    assert total.item() == pytest.approx(float(ref["total"]), rel=1e-4)
    params = dict(model.named_parameters())
    assert set(ref["grad_norms"]) == {n for n, p in params.items() if p.requires_grad}
    for name, norm in ref["grad_norms"].items():
        grad = params[name].grad
        ours = 0.0 if grad is None else grad.norm().item()
        assert ours == pytest.approx(float(norm), rel=1e-3, abs=1e-7), name
    grad_norm = torch.stack([p.grad.norm() for p in params.values() if p.grad is not None]).norm()
    assert grad_norm.item() == pytest.approx(float(ref["grad_norm"]), rel=1e-4)
