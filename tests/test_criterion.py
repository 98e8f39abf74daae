"""Criterion: generated keys == weights, empty targets, losses of a perfect prediction."""
import math

import torch

from models.addons import LossSpec, loss_key
from models.criterion import SetCriterion
from models.matcher import HungarianMatcher

COEFS = {"loss_ce": 2.0, "loss_bbox": 5.0, "loss_giou": 2.0}


def _outputs(b=2, q=6, k=5, aux=2, enc=True):
    g = torch.Generator().manual_seed(0)

    def one(n=q):
        return {"pred_logits": torch.randn(b, n, k, generator=g, requires_grad=True),
                "pred_boxes": (torch.rand(b, n, 4, generator=g) * 0.4 + 0.1).requires_grad_()}
    out = one()
    out["aux_outputs"] = [one() for _ in range(aux)]
    if enc:
        out["enc_outputs"] = one(20)
    return out


def test_keys_are_generated_with_weights(batch):
    _, targets = batch
    crit = SetCriterion(5, HungarianMatcher(), COEFS, num_aux_layers=2, two_stage=True)
    losses = crit(_outputs(), targets)
    weighted = {k for k in losses if k.startswith("loss_")}
    assert weighted <= set(crit.weight_dict)
    expected = {loss_key(t, layer, s) for t in COEFS for layer, s in
                [(None, ""), (0, ""), (1, ""), (None, "enc")]}
    assert weighted == expected
    assert crit.weight_dict["loss_giou_1"] == 2.0 and crit.weight_dict["loss_bbox_enc"] == 5.0
    assert loss_key("loss_giou", 3, "dn") == "loss_giou_3_dn"
    assert LossSpec("o2m", 1, COEFS, weight=0.5).weight_dict()["loss_bbox_0_o2m"] == 2.5


def test_empty_target_is_finite_and_has_no_box_loss(batch):
    _, targets = batch
    crit = SetCriterion(5, HungarianMatcher(), COEFS, num_aux_layers=2, two_stage=True)
    out = _outputs(b=1)
    losses = crit(out, targets[1:])  # only the empty image
    assert all(math.isfinite(v.item()) for v in losses.values())
    assert losses["loss_bbox"].item() == 0 and losses["loss_giou"].item() == 0
    assert losses["loss_ce"].item() > 0  # every query is pushed to background
    crit.total_loss(losses).backward()
    assert torch.isfinite(out["pred_logits"].grad).all()


def test_mixed_batch_with_empty_target_backward(batch):
    _, targets = batch
    crit = SetCriterion(5, HungarianMatcher(), COEFS, num_aux_layers=2, two_stage=True)
    out = _outputs()
    losses = crit(out, targets)
    total = crit.total_loss(losses)
    total.backward()
    assert torch.isfinite(total) and out["pred_boxes"].grad.abs().sum() > 0
    assert out["pred_boxes"].grad[1].abs().sum() == 0  # no box gradient from the empty image


def test_perfect_prediction_has_zero_box_loss():
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    logits = torch.full((1, 3, 5), -10.0)
    logits[0, 0, 2] = 10.0
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.1, 0.1, 0.1, 0.1], [0.9, 0.9, 0.1, 0.1]]])
    crit = SetCriterion(5, HungarianMatcher(), COEFS, num_aux_layers=0)
    losses = crit({"pred_logits": logits, "pred_boxes": boxes}, targets)
    assert losses["loss_bbox"].item() < 1e-6 and losses["loss_giou"].item() < 1e-6
    assert losses["loss_ce"].item() < 1e-3 and losses["class_error"].item() == 0
