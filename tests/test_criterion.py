"""Criterion: generated keys == weights, empty targets, losses of a perfect prediction."""
import math

import pytest
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


def test_quality_focal_loss_matches_a_hand_computation():
    """--cls_loss qfl (Co-DINO): BCE(z, y) |y - sigmoid(z)|^2 with y = IoU of the matched box at its class, summed
    over queries and classes, over num_boxes; the matched query's class target is its detached box's IoU."""
    logits = torch.tensor([[[0.5, -1.0, 2.0], [-0.3, 0.1, -2.0]]], requires_grad=True)
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.3, 0.3, 0.2, 0.2]]], requires_grad=True)
    target = {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.55, 0.5, 0.4, 0.3]])}
    crit = SetCriterion(3, HungarianMatcher(), {"loss_ce": 1.0, "loss_bbox": 5.0, "loss_giou": 2.0}, 0,
                        cls_loss="qfl")
    got = crit.loss_labels({"pred_logits": logits, "pred_boxes": boxes}, [target],
                           [(torch.tensor([0]), torch.tensor([0]))], torch.tensor(1.0))["loss_ce"]
    # query 0 (xyxy 0.3-0.7 x 0.3-0.7) vs GT (0.35-0.75 x 0.35-0.65): inter 0.35 * 0.3, union 0.16 + 0.12 - inter
    iou = (0.35 * 0.3) / (0.16 + 0.12 - 0.35 * 0.3)
    want = 0.0
    for q in range(2):
        for k in range(3):
            z = logits[0, q, k].item()
            y = iou if (q, k) == (0, 2) else 0.0
            p = 1 / (1 + math.exp(-z))
            bce = -(y * math.log(p) + (1 - y) * math.log(1 - p))
            want += bce * abs(y - p) ** 2
    assert got.item() == pytest.approx(want, rel=1e-5)
    got.backward()
    assert boxes.grad is None and logits.grad is not None  # the quality target is detached


def test_qfl_flag_on_sigmoid_hosts_only():
    from flags import FlagError, finalize_args, get_args_parser
    from models import build_model

    small = ["--backbone", "resnet18", "--backbone_from_scratch", "--hidden_dim", "32", "--nheads", "2",
             "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "32", "--num_queries", "5"]
    _, criterion, _ = build_model(finalize_args(get_args_parser().parse_args(["-m", "dino", "--cls_loss", "qfl",
                                                                               *small])))
    assert criterion.cls_loss == "qfl" and criterion.matcher.cls_loss == "focal"
    with pytest.raises(FlagError):
        build_model(finalize_args(get_args_parser().parse_args(["-m", "detr", "--cls_loss", "qfl", *small])))
