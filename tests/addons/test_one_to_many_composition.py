"""One-to-many add-ons off => bitwise baseline; hybrid + MS-DETR + a denoising-style group train together."""
import pytest
import torch

import engine
from models import build_model
from models.addons import StepContext
from models.query_groups import QueryGroup
from models.registry import ADDONS
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list

HOST = ["--with_box_refine", "--two_stage", "--dropout", "0"]
BOTH = ["--num_queries_one2many", "12", "--k_one2many", "2", "--use_ms_detr", "--use_aux_ffn"]
# every one-to-many flag given a non-default value, but neither add-on switched on
INACTIVE = ["--k_one2many", "6", "--lambda_one2many", "2", "--use_aux_ffn", "--o2m_matcher_k", "3",
            "--o2m_cls_loss_coef", "7"]


def _step(model, criterion, images, targets, extra_providers=()):
    ctx = StepContext(targets=targets)
    providers = engine._query_providers(criterion.addons, ctx) + list(extra_providers)
    out = model(nested_tensor_from_tensor_list(images), providers=providers)
    losses = criterion(out, targets)
    criterion.total_loss(losses).backward()
    return out, losses


@pytest.mark.parametrize("host", [[], HOST], ids=["one_stage", "two_stage"])
def test_addons_off_is_bitwise_baseline(host, batch):
    images, targets = batch
    runs = []
    for extra in ([], INACTIVE):
        torch.manual_seed(0)
        model, criterion, _ = build_model(tiny_args(*host, *extra))
        assert criterion.addons == []
        runs.append((model, criterion, *_step(model.train(), criterion, images, targets)))
    (m0, c0, out0, loss0), (m1, c1, out1, loss1) = runs
    assert c0.weight_dict == c1.weight_dict
    assert set(out0) == set(out1) and "o2m_outputs" not in out1
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(out0[key], out1[key])
    assert all(torch.equal(loss0[k], loss1[k]) for k in loss0) and set(loss0) == set(loss1)
    for (n0, p0), (n1, p1) in zip(m0.named_parameters(), m1.named_parameters()):
        assert n0 == n1 and torch.equal(p0, p1) and (p0.grad is None) == (p1.grad is None)
        assert p0.grad is None or torch.equal(p0.grad, p1.grad)


def _dummy_group(enc):
    """A stand-in for a denoising group: 6 box queries in 2 mutually blind blocks of 3."""
    g = torch.Generator().manual_seed(5)
    b, c = enc.memory.shape[0], enc.memory.shape[2]
    blocks = torch.arange(6) // 3
    return QueryGroup("dummy", torch.randn(b, 6, c, generator=g), torch.rand(b, 6, 4, generator=g) * 0.5 + 0.25,
                      attn_mask=blocks[:, None] != blocks[None])


def test_hybrid_and_ms_detr_with_another_group(batch):
    images, targets = batch
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*HOST, *BOTH))
    assert [a.name for a in criterion.addons] == ["hybrid", "ms_detr"]
    out, losses = _step(model.train(), criterion, images, targets, [_dummy_group])
    assert set(out["groups"]) == {"one2many", "dummy"} and out["o2m_outputs"]["pred_logits"].shape[1] == 8
    assert {"loss_ce_one2many", "loss_ce_o2m", "loss_ce_enc", "loss_giou_0_one2many", "loss_bbox_0_o2m"} <= set(losses)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)
    with torch.no_grad():  # the one-to-one queries see neither group
        alone = model(nested_tensor_from_tensor_list(images))
        both = model(nested_tensor_from_tensor_list(images),
                     providers=engine._query_providers(criterion.addons, StepContext(targets=targets)) + [_dummy_group])
    torch.testing.assert_close(both["pred_logits"], alone["pred_logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif("dn" not in ADDONS, reason="the denoising add-on is not in this tree")
def test_training_step_with_denoising(batch):
    images, targets = batch
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*HOST, *BOTH, "--use_dn"))
    assert [a.name for a in criterion.addons] == ["dn", "hybrid", "ms_detr"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = [(nested_tensor_from_tensor_list(images), targets)]
    stats = engine.train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, 0.1,
                                   addons=criterion.addons, print_freq=100)
    assert stats["nonfinite_steps"] == 0
    assert {"loss_ce_dn", "loss_ce_one2many", "loss_ce_o2m"} <= set(stats)
