"""DAB-Deformable-DETR and DINO: anchor sine embedding, gradient routing, DINO's encoder outputs, DN isolation."""
import math

import pytest
import torch

from engine import _query_providers
from models import build_model
from models.addons import StepContext
from models.anchor_transformer import sine_embed_boxes
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list


def _randomize(model, scale=0.05):
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def test_sine_embedding_order_y_x_w_h():
    box = torch.tensor([0.1, 0.7, 0.3, 0.9])
    emb = sine_embed_boxes(box, 32)
    assert emb.shape == (64,)
    one = sine_embed_boxes(torch.tensor([0.7, 0.7, 0.7, 0.7]), 32)[:16]
    assert torch.allclose(emb[:16], one)  # y first
    assert torch.allclose(emb[16:32], sine_embed_boxes(torch.tensor([0.1] * 4), 32)[:16])
    assert emb[0] == pytest.approx(math.sin(2 * math.pi * 0.7)) and emb[1] == pytest.approx(math.cos(2 * math.pi * 0.7))


@pytest.mark.parametrize("lft", [False, True])
def test_look_forward_twice_routes_box_gradient_one_layer_back(lft, batch):
    flags = ["-m", "dab_deformable_detr", "--dropout", "0"] + (["--look_forward_twice"] if lft else [])
    model, _, _ = build_model(tiny_args(*flags))
    _randomize(model)
    images, _ = batch
    model.train()
    out = model(nested_tensor_from_tensor_list(images))
    out["pred_boxes"].sum().backward()  # the last layer's boxes only
    grad = model.bbox_embed[0].layers[-1].weight.grad
    # Layer 0's box head reaches the last prediction only through the (undetached) refined anchor.
    assert (grad is not None and grad.abs().sum() > 0) == lft


def test_dino_encoder_outputs_and_real_label_targets(batch):
    model, criterion, _ = build_model(tiny_args("-m", "dino"))
    images, targets = batch
    out = model(nested_tensor_from_tensor_list(images))
    assert out["enc_outputs"]["pred_logits"].shape == (2, 8, 5)  # the top-Q proposals, all classes
    assert not criterion.enc_class_agnostic
    assert model.class_embed[0] is model.class_embed[-1]  # one head shared by the decoder layers
    assert model.transformer.enc_out_class_embed is not model.class_embed[0]
    losses = criterion(out, targets)
    assert {"loss_ce_enc", "loss_bbox_enc", "loss_giou_enc"} <= set(losses)


@pytest.mark.parametrize("name", ["dab_deformable_detr", "dino"])
def test_denoising_on_anchor_models_is_isolated_and_train_only(name, batch):
    model, criterion, _ = build_model(tiny_args("-m", name, "--use_dn", "--contrastive", "--dropout", "0"))
    _randomize(model)
    images, targets = batch
    model.eval()
    samples = nested_tensor_from_tensor_list(images)
    results = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        results.append(model(samples, providers=_query_providers(criterion.addons, StepContext(targets=targets))))
    a, b = results
    assert torch.equal(a["pred_boxes"], b["pred_boxes"]) and torch.equal(a["pred_logits"], b["pred_logits"])
    assert not torch.equal(a["groups"]["dn"]["pred_boxes"], b["groups"]["dn"]["pred_boxes"])
    with torch.no_grad():
        plain = model(samples)
    assert "groups" not in plain
    torch.testing.assert_close(plain["pred_logits"], a["pred_logits"], rtol=1e-5, atol=1e-5)


def test_dab_rejects_two_stage():
    with pytest.raises(ValueError, match="one-stage"):
        build_model(tiny_args("-m", "dab_deformable_detr", "--two_stage"))
