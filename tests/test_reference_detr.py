"""facebookresearch/detr's computations (tests/data/reference/detr*.pt) are reproduced by ``-m detr``.

As tests/test_reference.py: the model comes from ``main.get_args_parser().parse_args(ref["flags"])`` alone, the
deterministic weights load strictly under the official names, and outputs (1e-5), every weighted loss term
(1e-6 relative), class and cardinality errors, the softmax post-processing and, for the training step, the
total (1e-4) and every parameter's gradient norm (1e-3 relative) match the official code.
"""
from __future__ import annotations

import pytest
import torch

from tests.test_reference import REF_DIR, load_reference
from util.misc import nested_tensor_from_tensor_list

pytestmark = pytest.mark.skipif(not (REF_DIR / "detr.pt").is_file(), reason="reference files absent")


@pytest.fixture(scope="module")
def evaluated():
    ref, model, criterion, post = load_reference("detr")
    model.eval()
    with torch.no_grad():
        out = model(nested_tensor_from_tensor_list(ref["images"]))
        losses = criterion(out, ref["targets"])
        results = post["bbox"](out, ref["target_sizes"])
    return ref, criterion, out, losses, results


def test_defaults_are_the_official_ones():
    ref = torch.load(REF_DIR / "detr.pt", weights_only=True)
    import main

    args = main.get_args_parser().parse_args(["-m", "detr"])
    official = ref["official_config"]
    for key in ("lr", "lr_backbone", "batch_size", "weight_decay", "epochs", "lr_drop", "clip_max_norm", "dropout",
                "dim_feedforward", "hidden_dim", "nheads", "enc_layers", "dec_layers", "num_queries", "pre_norm",
                "aux_loss", "set_cost_class", "set_cost_bbox", "set_cost_giou", "bbox_loss_coef", "giou_loss_coef",
                "eos_coef", "position_embedding", "dilation", "backbone"):
        assert getattr(args, key) == official[key], key
    assert args.cls_loss == "softmax" and args.cls_loss_coef == 1 and args.num_feature_levels == 1


def test_outputs_match(evaluated):
    ref, _, out, _, _ = evaluated
    expected = ref["outputs"]
    assert out["pred_logits"].shape == (2, 100, 92)  # 91 COCO logits + "no object"
    torch.testing.assert_close(out["pred_logits"], expected["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out["pred_boxes"], expected["pred_boxes"], rtol=1e-5, atol=1e-5)
    assert len(out["aux_outputs"]) == len(expected["aux_outputs"]) == 5
    for ours, theirs in zip(out["aux_outputs"], expected["aux_outputs"]):
        torch.testing.assert_close(ours["pred_logits"], theirs["pred_logits"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"], rtol=1e-5, atol=1e-5)


def test_every_weighted_loss_term_and_weight_matches(evaluated):
    ref, criterion, _, losses, _ = evaluated
    weighted = {k: w for k, w in ref["weight_dict"].items() if w}
    assert len(weighted) == 18
    for key, w in weighted.items():
        assert criterion.weight_dict[key] == w, key
        assert losses[key].item() * w == pytest.approx(float(ref["losses"][key]) * w, rel=1e-6, abs=1e-6), key
    for key in [k for k in ref["losses"] if k.startswith(("class_error", "cardinality_error"))]:
        assert losses[key].item() == pytest.approx(float(ref["losses"][key]), rel=1e-5, abs=1e-6), key


def test_postprocessed_results_match(evaluated):
    ref, _, _, _, results = evaluated
    for ours, theirs in zip(results, ref["results"]):
        assert ours["scores"].shape == (100,)  # one detection per query
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-5, atol=1e-5)
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-5, atol=1e-3)  # pixels


def test_training_step_matches():
    ref, model, criterion, _ = load_reference("detr_train")
    model.train()
    outputs = model(nested_tensor_from_tensor_list(ref["images"]), ref["targets"])
    losses = criterion(outputs, ref["targets"])
    total = criterion.total_loss(losses)
    total.backward()
    assert total.item() == pytest.approx(float(ref["total"]), rel=1e-4)
    for key, w in ref["weight_dict"].items():
        if w:
            assert losses[key].item() * w == pytest.approx(float(ref["losses"][key]) * w, rel=1e-3, abs=1e-6), key
    params = dict(model.named_parameters())
    assert set(ref["grad_norms"]) == {n for n, p in params.items() if p.requires_grad}
    for name, norm in ref["grad_norms"].items():
        grad = params[name].grad
        ours = 0.0 if grad is None else grad.norm().item()
        # abs 1e-7: decoder layer 0's self-attention sees zero content (value = bias only), so its in_proj_weight
        # gradient is float noise (~5e-10) in both implementations.
        assert ours == pytest.approx(float(norm), rel=1e-3, abs=1e-7), name
    grad_norm = torch.stack([p.grad.norm() for p in params.values() if p.grad is not None]).norm()
    assert grad_norm.item() == pytest.approx(float(ref["grad_norm"]), rel=1e-4)
