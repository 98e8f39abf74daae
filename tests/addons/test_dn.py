"""Denoising add-on: layout, noise, mask isolation, losses, train-only, bitwise baseline when off."""
import copy
import math

import pytest
import torch

import engine
from models import build_model
from models.addons import StepContext, loss_key
from models.addons.dn import DenoisingConfig, DenoisingQueries, cdn_box_noise, dn_box_noise
from models.registry import ADDONS
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list

HOST = ("--with_box_refine", "--two_stage")


def _targets(*counts):
    g = torch.Generator().manual_seed(3)
    out = []
    for n in counts:
        centre = torch.rand(n, 2, generator=g) * 0.5 + 0.25
        size = torch.rand(n, 2, generator=g) * 0.2 + 0.1
        out.append({"labels": torch.randint(0, 5, (n,), generator=g), "boxes": torch.cat([centre, size], 1)})
    return out


def _queries(mode="dn", **kw):
    return DenoisingQueries(5, 32, DenoisingConfig(mode, **kw))


@pytest.fixture(scope="module")
def dn_model():
    torch.manual_seed(0)
    model, criterion, post = build_model(tiny_args(*HOST, "--use_dn", "--dropout", "0"))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-zero box heads, so that boxes depend on the queries' content
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model, criterion, post


def _forward(model, images, group_fn):
    return model(nested_tensor_from_tensor_list(images), providers=[group_fn])


# ------------------------------------------------------------------------------------------ layout
def test_dn_groups_and_padding_follow_gt_count():
    group = _queries("dn", num_groups=5)(_targets(3, 0, 1), 3, torch.device("cpu"))
    assert group.size == 15 and group.meta["num_groups"] == 5 and group.meta["pad"] == 3
    valid = group.meta["valid"]
    assert valid.sum(1).tolist() == [15, 0, 5]  # DN-DETR: padding slots are not supervised
    q, gt = group.meta["indices"][2]
    assert q.tolist() == [0, 3, 6, 9, 12] and gt.tolist() == [0] * 5
    assert group.meta["num_boxes"] == 5 * 4
    assert torch.equal(group.tgt[1], torch.zeros(15, 32))  # the empty image: padding only
    blocks = torch.arange(15) // 3
    assert torch.equal(group.attn_mask, blocks[:, None] != blocks[None])
    assert group.see_main


def test_cdn_budget_layout_and_negatives():
    group = _queries("cdn", budget=100)(_targets(3, 7), 2, torch.device("cpu"))
    assert group.meta["num_groups"] == 100 // 7 and group.size == 2 * 7 * 14
    assert group.meta["valid"] is None  # negatives and padding are supervised as no-object
    q, gt = group.meta["indices"][0]
    assert q[:3].tolist() == [0, 1, 2] and q[3:6].tolist() == [14, 15, 16] and gt[:6].tolist() == [0, 1, 2] * 2
    blocks = torch.arange(group.size) // 14  # positives and negatives of one group see each other
    assert torch.equal(group.attn_mask, blocks[:, None] != blocks[None])


def test_cap_limits_queries_of_crowded_images():
    targets = _targets(300, 2)
    group = _queries("cdn", budget=100, max_queries=50)(targets, 2, torch.device("cpu"))
    assert group.size <= 50 and group.meta["num_groups"] == 1 and group.meta["pad"] == 25
    q, gt = group.meta["indices"][0]
    assert len(q) == 25 and len(set(gt.tolist())) == 25 and gt.max() < 300
    dn = _queries("dn", num_groups=5, max_queries=40)(targets, 2, torch.device("cpu"))
    assert dn.size == 40 and dn.meta["num_groups"] == 1
    assert DenoisingConfig("dn", num_groups=5, max_queries=40).layout(10) == (4, 10)


def test_no_gt_gives_no_slots():
    queries = _queries("cdn")
    group = queries(_targets(0, 0), 2, torch.device("cpu"))  # the originals' P = 0
    assert group.size == 0 and group.meta["num_boxes"] == 0 and group.attn_mask is None
    assert group.meta["indices"][0][0].numel() == 0
    group.tgt.sum().backward()
    assert queries.label_enc.weight.grad is not None  # stays in the graph (DDP needs no unused-param hack)


def test_box_noise_bounds():
    torch.manual_seed(1)
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.1]]).repeat(2000, 1)
    noised = dn_box_noise(boxes, 0.4)
    assert ((noised[:, :2] - boxes[:, :2]).abs() <= boxes[:, 2:] / 2 * 0.4 + 1e-6).all()
    assert ((noised[:, 2:] / boxes[:, 2:] - 1).abs() <= 0.4 + 1e-6).all()
    corners = torch.tensor([0.4, 0.45, 0.6, 0.55])
    half = torch.tensor([0.1, 0.05, 0.1, 0.05])
    for negative, lo, hi in [(False, 0.0, 0.4), (True, 0.4, 0.8)]:
        out = cdn_box_noise(boxes, 0.4, torch.full((2000,), negative))
        moved = ((torch.cat([out[:, :2] - out[:, 2:] / 2, out[:, :2] + out[:, 2:] / 2], 1) - corners).abs() / half)
        assert moved.min() >= lo - 1e-4 and moved.max() <= hi + 1e-4


# ---------------------------------------------------------------------------- isolation in the host
def test_main_queries_blind_to_denoising_queries(dn_model, batch):
    model, criterion, _ = dn_model
    images, targets = batch
    model.eval()  # deterministic (dropout is 0 anyway); providers are passed explicitly
    dn = criterion.addons[0]
    torch.manual_seed(0)
    a = _forward(model, images, lambda enc: dn.query_groups(enc, StepContext(targets=targets)))
    torch.manual_seed(1)  # other noise
    moved = [{**t, "boxes": t["boxes"] * 0.5 + 0.2} for t in targets]
    b = _forward(model, images, lambda enc: dn.query_groups(enc, StepContext(targets=moved)))
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
        assert not torch.equal(a["groups"]["dn"][key], b["groups"]["dn"][key])
    with torch.no_grad():
        base = model(nested_tensor_from_tensor_list(images))
    torch.testing.assert_close(a["pred_boxes"], base["pred_boxes"], rtol=1e-5, atol=1e-6)


def test_denoising_groups_blind_to_each_other(dn_model, batch):
    model, criterion, _ = dn_model
    images, targets = batch
    model.eval()
    dn = criterion.addons[0]

    def perturbed(enc, shift):
        torch.manual_seed(0)
        (group,) = dn.query_groups(enc, StepContext(targets=targets))
        group.tgt = group.tgt.clone()
        group.tgt[:, 3:] += shift  # every group but the first (3 GT -> 3 slots per group)
        return group

    a = _forward(model, images, lambda enc: perturbed(enc, 0.0))
    b = _forward(model, images, lambda enc: perturbed(enc, 1.0))
    assert torch.equal(a["groups"]["dn"]["pred_boxes"][:, :3], b["groups"]["dn"]["pred_boxes"][:, :3])
    assert not torch.equal(a["groups"]["dn"]["pred_boxes"][:, 3:], b["groups"]["dn"]["pred_boxes"][:, 3:])


# -------------------------------------------------------------------------------------------- losses
def test_loss_keys_and_weights_are_generated(dn_model, batch):
    model, criterion, _ = dn_model
    images, targets = batch
    model.train()
    out = _forward(model, images, lambda enc: criterion.addons[0].query_groups(enc, StepContext(targets=targets)))
    losses = criterion(out, targets)
    expected = {loss_key(t, layer, "dn") for t in ("loss_ce", "loss_bbox", "loss_giou") for layer in (None, 0)}
    assert {k for k in losses if k.startswith("loss_") and k.endswith("_dn")} == expected
    for key in expected:
        assert criterion.weight_dict[key] == criterion.weight_dict[key.replace("_dn", "")]
    assert all(math.isfinite(v.item()) for v in losses.values())


@pytest.mark.parametrize("mode", ["dn", "cdn"])
def test_padding_and_negative_supervision(dn_model, batch, mode):
    _, criterion, _ = dn_model
    _, targets = batch
    dn = copy.copy(criterion.addons[0])
    dn.queries = _queries(mode, num_groups=2, budget=6)
    group = dn.queries(targets, 2, torch.device("cpu"))
    logits = torch.zeros(2, group.size, 5)
    boxes = torch.full((2, group.size, 4), 0.5)
    out = {"groups": {"dn": {"pred_logits": logits, "pred_boxes": boxes}}, "group_meta": {"dn": group.meta}}


    def loss_ce(pred_logits):
        out["groups"]["dn"]["pred_logits"] = pred_logits
        group = dn.loss_groups(out, StepContext(targets=targets))[0]
        return criterion.group_losses(group, torch.tensor(1.0))["loss_ce_dn"]

    base = loss_ce(logits)
    changed = logits.clone()
    changed[1] = 5.0  # image 1 has no GT: all its slots are padding
    pad = loss_ce(changed)
    if mode == "dn":
        assert pad == base  # padding slots (the empty image) are not supervised
    else:
        assert pad > base  # padding and negatives are pushed to no-object


@pytest.mark.parametrize("flags", [HOST + ("--use_dn",), ("-m", "dn_dab_deformable_detr", "--use_dn"),
                                   ("-m", "dino", "--use_dn", "--contrastive")], ids=["deformable", "dn_dab", "dino"])
def test_empty_batch_trains(flags):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*flags))
    model.train()
    images = [torch.randn(3, 64, 64), torch.randn(3, 48, 56)]
    targets = _targets(0, 0)
    out = _forward(model, images, lambda enc: criterion.addons[0].query_groups(enc, StepContext(targets=targets)))
    assert out["groups"]["dn"]["pred_logits"].shape[1] == 0  # no denoising slots, as the originals
    losses = criterion(out, targets)
    for term in ("loss_ce", "loss_bbox", "loss_giou"):  # zero terms under stable keys, aux layers too
        assert losses[f"{term}_dn"].item() == 0 and losses[f"{term}_0_dn"].item() == 0
    assert losses["cardinality_error_dn"].item() == 0
    model.zero_grad()
    criterion.total_loss(losses).backward()
    assert _label_table(model).weight.grad is not None


def test_training_forward_without_targets_has_no_group(dn_model, batch):
    model, criterion, _ = dn_model
    images, _ = batch
    model.train()
    with torch.no_grad():  # the official DINO runs no denoising for model(samples)
        out = _forward(model, images, lambda enc: criterion.addons[0].query_groups(enc, StepContext(targets=None)))
    assert "groups" not in out


def test_denoising_is_off_at_eval(dn_model, batch):
    model, criterion, post = dn_model
    images, targets = batch
    model.eval()
    with torch.no_grad():
        out = model(nested_tensor_from_tensor_list(images))  # evaluate() never passes providers
    assert "groups" not in out and out["pred_logits"].shape[1] == 8
    assert not any(k.endswith("_dn") for k in criterion(out, targets))


# ------------------------------------------------------------------------------ bitwise baseline
def _train_step(args, monkeypatch=None, hide_addons=False):
    if hide_addons:  # as if no add-on module existed
        monkeypatch.setattr(ADDONS, "_items", {})
    torch.manual_seed(0)
    model, criterion, _ = build_model(args)
    if hide_addons:
        monkeypatch.undo()
    g = torch.Generator().manual_seed(0)
    images = nested_tensor_from_tensor_list([torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 56, generator=g)])
    loader = [(images, _targets(3, 0))]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    torch.manual_seed(1)
    engine.train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, 0.1, addons=criterion.addons)
    return model


def test_addons_off_is_bitwise_baseline(monkeypatch):
    args = tiny_args(*HOST)
    plain = _train_step(args, monkeypatch, hide_addons=True)
    available = _train_step(args)
    assert list(plain.state_dict()) == list(available.state_dict())
    for (name, p), q in zip(plain.state_dict().items(), available.state_dict().values()):
        assert torch.equal(p, q), name
    with_dn = _train_step(tiny_args(*HOST, "--use_dn"))
    extra = set(with_dn.state_dict()) - set(plain.state_dict())
    assert extra == {"addons.dn.label_enc.weight"}


def test_one_stage_host_is_rejected():
    with pytest.raises(ValueError, match="anchor"):
        build_model(tiny_args("--use_dn"))


# ------------------------------------------------------------------------------ indicator bit
def _decoder_input(model, criterion, images, targets):
    """The content queries [B, T, C] entering the decoder in a training forward, and the DN group."""
    seen = {}
    def hook(module, args):
        seen["tgt"] = args[0]

    handle = model.transformer.decoder.register_forward_pre_hook(hook)
    providers = engine._query_providers(criterion.addons, StepContext(targets=targets))
    with torch.no_grad():
        out = model.train()(nested_tensor_from_tensor_list(images), providers=providers)
    handle.remove()
    return seen["tgt"], out["group_meta"]["dn"]


def _label_table(model):
    """The label table denoising uses: the host's ``label_enc`` (official models) or the add-on's own."""
    host = getattr(model, "label_enc", None)
    return host if isinstance(host, torch.nn.Embedding) else model.addons.dn.label_enc


@pytest.mark.parametrize("host", ["dab_deformable_detr", "dn_dab_deformable_detr"])
def test_dn_detr_indicator_bit(host, batch):
    images, targets = batch
    model, criterion, _ = build_model(tiny_args("-m", host, "--use_dn"))
    assert model.tgt_embed.weight.shape == (8, 31) and _label_table(model).weight.shape == (6, 31)
    tgt, meta = _decoder_input(model, criterion, images, targets)
    main, dn = tgt[:, :8], tgt[:, 8:]
    assert tgt.shape[-1] == 32 and torch.equal(main[..., -1], torch.zeros(2, 8))
    real = meta["valid"]  # slots holding a noised GT: indicator 1; padding slots: all zeros
    assert real.any() and (~real).any()
    assert torch.equal(dn[..., -1][real], torch.ones(int(real.sum())))
    assert not dn[~real].any()


@pytest.mark.parametrize("host", ["dab_deformable_detr", "dino"])
def test_contrastive_denoising_has_no_indicator(host):
    # DINO's contrastive denoising: full-width label table and content
    model, _, _ = build_model(tiny_args("-m", host, "--use_dn", "--contrastive"))
    assert _label_table(model).weight.shape == (6, 32)
    assert (model.transformer.tgt_embed if model.two_stage else model.tgt_embed).weight.shape == (8, 32)


def test_official_label_enc_key_loads_into_the_table():
    model, _, _ = build_model(tiny_args("-m", "dn_dab_deformable_detr", "--use_dn"))
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    own = [k for k in state if k.endswith("label_enc.weight")]
    assert len(own) == 1  # one table, one key
    state["label_enc.weight"] = state.pop(own[0])  # the official checkpoints' key
    model.load_state_dict(state, strict=True)  # a plain strict load, as users' scripts do
    assert torch.equal(_label_table(model).weight, state["label_enc.weight"])
    assert torch.equal(model.tgt_embed.weight, state["tgt_embed.weight"])
