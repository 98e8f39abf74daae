"""H-DETR hybrid branch: one-to-one queries blind to the one-to-many group, eval independent of it, names."""
import pytest
import torch

from engine import _query_providers
from models import build_model
from models.addons import StepContext
from tests.addons.official_keys import R50, check_strict_load, official_shapes
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list

PLUSPLUS = ["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice", "--dropout", "0"]
HYBRID = ["--num_queries_one2many", "12", "--k_one2many", "3", "--lambda_one2many", "0.5"]


def _train_forward(model, criterion, images, targets):
    providers = _query_providers(criterion.addons, StepContext(targets=targets))
    return model(nested_tensor_from_tensor_list(images), providers=providers)


@pytest.fixture(scope="module")
def hybrid():
    torch.manual_seed(0)
    return build_model(tiny_args(*PLUSPLUS, *HYBRID))


def test_one2one_queries_blind_to_the_one2many_group(hybrid, batch):
    model, criterion, _ = hybrid
    images, targets = batch
    model.train()
    with torch.no_grad():
        a = _train_forward(model, criterion, images, targets)
        model.query_embed.weight[8:].add_(1.0)  # the one-to-many content queries
        b = _train_forward(model, criterion, images, targets)
        model.query_embed.weight[8:].sub_(1.0)
    assert a["groups"]["one2many"]["pred_logits"].shape == (2, 12, 5)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
    # (boxes of a fresh model are its references: the last box layer starts at zero)
    assert not torch.equal(a["groups"]["one2many"]["pred_logits"], b["groups"]["one2many"]["pred_logits"])


def test_evaluation_equals_the_baseline_with_the_one2one_rows(hybrid, batch):
    model, _, _ = hybrid
    base, _, _ = build_model(tiny_args(*PLUSPLUS))
    state = dict(model.state_dict())
    state["query_embed.weight"] = state["query_embed.weight"][:8]
    base.load_state_dict(state, strict=True)
    images, _ = batch
    with torch.no_grad():
        ours, theirs = model.eval()(nested_tensor_from_tensor_list(images)), base.eval()(
            nested_tensor_from_tensor_list(images))
    assert "groups" not in ours and ours["pred_logits"].shape[1] == 8
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(ours[key], theirs[key])


def test_group_takes_the_proposals_ranked_after_the_one2one_ones(hybrid, batch):
    model, criterion, _ = hybrid
    images, targets = batch
    seen = {}
    provider = _query_providers(criterion.addons, StepContext(targets=targets))[0]

    def spy(enc):
        groups = provider(enc)
        seen["enc"], seen["group"] = enc, groups[0]
        return groups

    with torch.no_grad():
        model.train()(nested_tensor_from_tensor_list(images), providers=[spy])
    enc = seen["enc"]
    scores = enc.enc_logits[..., 0].masked_fill(~torch.isfinite(enc.enc_coord_unact).all(-1), float("-inf"))
    idx = scores.topk(8 + 12, dim=1).indices[:, 8:]
    expected = torch.gather(enc.enc_coord_unact, 1, idx[..., None].expand(-1, -1, 4)).sigmoid()
    torch.testing.assert_close(seen["group"].reference, expected, rtol=0, atol=1e-6)


def test_losses_weights_and_repeated_targets(hybrid, batch):
    model, criterion, _ = hybrid
    images, targets = batch
    (addon,) = criterion.addons
    (group,) = addon.loss_groups(_train_forward(model.train(), criterion, images, targets),
                                 StepContext(targets=targets))
    assert [len(t["labels"]) for t in group.targets] == [9, 0]
    assert torch.equal(group.targets[0]["boxes"][3:6], targets[0]["boxes"])
    w = criterion.weight_dict
    assert (w["loss_ce_one2many"], w["loss_bbox_0_one2many"], w["loss_giou_one2many"]) == (1.0, 2.5, 1.0)
    assert "loss_ce_enc_one2many" not in w


@pytest.mark.parametrize("variant", [[], ["--with_box_refine", "--two_stage"]], ids=["one_stage", "two_stage"])
def test_training_step_every_parameter_gets_a_gradient(variant, batch):
    model, criterion, _ = build_model(tiny_args(*variant, *HYBRID))
    if not variant:
        assert model.query_embed.weight.shape == (8 + 12, 64)  # one-stage: [Q1 + Qm, 2C] as H-DETR
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    images, targets = batch
    losses = criterion(_train_forward(model.train(), criterion, images, targets), targets)
    assert {"loss_ce_one2many", "loss_giou_0_one2many"} <= set(losses)
    criterion.total_loss(losses).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad


def test_official_h_detr_checkpoint_names_load_strictly():
    args = tiny_args(*PLUSPLUS, "--num_queries_one2many", "1500")
    for flag, value in R50 + [("dim_feedforward", 2048)]:
        setattr(args, flag, value)
    model, _, _ = build_model(args)
    shapes = {"query_embed.weight": [1800, 256], **official_shapes(2048)}
    assert len(shapes) == 631
    check_strict_load(model, shapes)
    assert sum(p.numel() for p in model.parameters()) == 47_946_073


def test_addons_flag_without_one2many_queries_is_an_error():
    with pytest.raises(ValueError, match="num_queries_one2many"):
        build_model(tiny_args("--addons", "hybrid"))
