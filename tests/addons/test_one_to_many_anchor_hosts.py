"""H-DETR's hybrid branch and MS-DETR on the anchor-query hosts (dab_deformable_detr, dino)."""
import pytest
import torch

import engine
from models import build_model
from models.addons import StepContext
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list

HOSTS = {"dab": ["-m", "dab_deformable_detr", "--dropout", "0"],
         "dino": ["-m", "dino", "--dropout", "0", "--no-use_dn"]}
HYBRID = ["--num_queries_one2many", "12", "--k_one2many", "2"]
MS = ["--use_ms_detr", "--use_aux_ffn"]


def _extra_rows(model):
    """The one-to-many rows of the host's query table(s)."""
    if model.two_stage:
        return [model.transformer.tgt_embed.weight]
    return [model.tgt_embed.weight, model.refpoint_embed.weight]


def _forward(model, criterion, images, targets):
    providers = engine._query_providers(criterion.addons, StepContext(targets=targets))
    return model(nested_tensor_from_tensor_list(images), providers=providers)


@pytest.mark.parametrize("host", HOSTS.values(), ids=HOSTS.keys())
def test_one2one_queries_blind_to_the_one2many_group(host, batch):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*host, *HYBRID))
    images, targets = batch
    assert all(t.shape[0] == 8 + 12 for t in _extra_rows(model))
    model.train()
    with torch.no_grad():
        a = _forward(model, criterion, images, targets)
        for table in _extra_rows(model):
            table[8:].add_(0.5)
        b = _forward(model, criterion, images, targets)
    assert a["groups"]["one2many"]["pred_logits"].shape == (2, 12, 5)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
        assert torch.equal(a["aux_outputs"][0][key], b["aux_outputs"][0][key])
    assert not torch.equal(a["groups"]["one2many"]["pred_logits"], b["groups"]["one2many"]["pred_logits"])


@pytest.mark.parametrize("host", HOSTS.values(), ids=HOSTS.keys())
def test_evaluation_equals_the_baseline_with_the_one2one_rows(host, batch):
    torch.manual_seed(0)
    model, _, _ = build_model(tiny_args(*host, *HYBRID))
    base, _, _ = build_model(tiny_args(*host))
    state = dict(model.state_dict())
    for name in ("tgt_embed.weight", "refpoint_embed.weight", "transformer.tgt_embed.weight"):
        if name in state:
            state[name] = state[name][:8]
    base.load_state_dict(state, strict=True)
    images, _ = batch
    with torch.no_grad():
        ours = model.eval()(nested_tensor_from_tensor_list(images))
        theirs = base.eval()(nested_tensor_from_tensor_list(images))
    assert "groups" not in ours and ours["pred_logits"].shape[1] == 8
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(ours[key], theirs[key])


def test_dino_group_takes_the_proposals_ranked_after_the_one2one_ones(batch):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*HOSTS["dino"], *HYBRID))
    images, targets = batch
    seen = {}
    provider = engine._query_providers(criterion.addons, StepContext(targets=targets))[0]

    def spy(enc):
        groups = provider(enc)
        seen["enc"], seen["group"] = enc, groups[0]
        return groups

    with torch.no_grad():
        out = model.train()(nested_tensor_from_tensor_list(images), providers=[spy])
    enc = seen["enc"]
    scores = enc.enc_logits.max(-1)[0]  # DINO ranks every token, padded and border ones included
    idx = scores.topk(8 + 12, dim=1).indices
    coords = torch.gather(enc.enc_coord_unact, 1, idx[..., None].expand(-1, -1, 4)).sigmoid()
    torch.testing.assert_close(out["enc_outputs"]["pred_boxes"], coords[:, :8], rtol=0, atol=0)
    torch.testing.assert_close(seen["group"].reference, coords[:, 8:], rtol=0, atol=1e-6)
    assert seen["group"].query_pos is None  # the anchor decoder derives it, as for the main queries
    assert torch.equal(seen["group"].tgt[0], model.transformer.tgt_embed.weight[8:])


@pytest.mark.parametrize("host", HOSTS.values(), ids=HOSTS.keys())
def test_ms_detr_predictions_and_gradients(host, batch):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*host, *MS))
    images, targets = batch
    out = model.train()(nested_tensor_from_tensor_list(images))
    o2m = out["o2m_outputs"]
    assert o2m["pred_logits"].shape == (2, 8, 5) and len(o2m["aux_outputs"]) == 1
    losses = criterion(out, targets)
    assert {"loss_ce_o2m", "loss_giou_0_o2m"} <= set(losses)
    criterion.total_loss(losses).backward()
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert not [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    with torch.no_grad():  # the one-to-one predictions never read the auxiliary FFN (dropout 0: deterministic)
        a = model(nested_tensor_from_tensor_list(images))
        for layer in model.transformer.decoder.layers:
            layer.linear4.weight.add_(1.0)
        b = model(nested_tensor_from_tensor_list(images))
        assert "o2m_outputs" not in model.eval()(nested_tensor_from_tensor_list(images))  # evaluation never runs it
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["o2m_outputs"]["pred_logits"], b["o2m_outputs"]["pred_logits"])


@pytest.mark.parametrize("host", HOSTS.values(), ids=HOSTS.keys())
def test_dn_hybrid_and_ms_detr_train_together(host, batch):
    images, targets = batch
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*host, *HYBRID, *MS, "--use_dn", "--contrastive"))
    assert [a.name for a in criterion.addons] == ["dn", "hybrid", "ms_detr"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loader = [(nested_tensor_from_tensor_list(images), targets)]
    stats = engine.train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, 0.1,
                                   addons=criterion.addons, print_freq=100)
    assert stats["nonfinite_steps"] == 0
    assert {"loss_ce_dn", "loss_ce_one2many", "loss_ce_o2m"} <= set(stats)
