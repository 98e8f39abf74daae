"""Extra query groups: one block mask, no leakage into main queries or between groups."""
import pytest
import torch

from models import build_model
from models.query_groups import QueryGroup, build_group_attn_mask
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list


def _group(name, n, seed, dim=32, ref_dim=4, with_pos=False, attn_mask=None):
    g = torch.Generator().manual_seed(seed)
    ref = torch.rand(2, n, ref_dim, generator=g) * 0.6 + 0.2
    pos = torch.randn(2, n, dim, generator=g) if with_pos else None
    return QueryGroup(name, torch.randn(2, n, dim, generator=g), ref, pos, attn_mask)


@pytest.fixture(scope="module")
def two_stage_model():
    model, _, _ = build_model(tiny_args("--with_box_refine", "--two_stage"))
    return model.eval()


def _run(model, images, *groups):
    with torch.no_grad():
        return model(nested_tensor_from_tensor_list(images), providers=[lambda enc, g=g: g for g in groups])


def test_mask_layout():
    groups = [_group("a", 2, 0), _group("b", 3, 1, attn_mask=torch.tensor([[False, True, True]] * 3))]
    mask = build_group_attn_mask(4, groups, torch.device("cpu"))
    assert mask.shape == (9, 9)
    assert not mask[:4, :4].any() and mask[:4, 4:].all() and mask[4:, :4].all()
    assert not mask[4:6, 4:6].any() and mask[4:6, 6:].all() and mask[6:, 4:6].all()
    assert torch.equal(mask[6:, 6:], groups[1].attn_mask)
    assert build_group_attn_mask(4, [], torch.device("cpu")) is None


def test_no_group_is_bitwise_baseline(two_stage_model, batch):
    images, _ = batch
    base = _run(two_stage_model, images)
    none_provider = two_stage_model(nested_tensor_from_tensor_list(images), providers=[lambda enc: None])
    assert torch.equal(base["pred_logits"], none_provider["pred_logits"])
    assert torch.equal(base["pred_boxes"], none_provider["pred_boxes"])
    assert "groups" not in base


def test_main_queries_blind_to_groups(two_stage_model, batch):
    images, _ = batch
    a = _run(two_stage_model, images, _group("dn", 5, 0))
    b = _run(two_stage_model, images, _group("dn", 5, 1))
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
        assert not torch.equal(a["groups"]["dn"][key], b["groups"]["dn"][key])
    assert a["groups"]["dn"]["pred_logits"].shape == (2, 5, 5)
    assert len(a["groups"]["dn"]["aux_outputs"]) == 1
    base = _run(two_stage_model, images)
    torch.testing.assert_close(a["pred_logits"], base["pred_logits"], rtol=1e-5, atol=1e-5)


def test_groups_blind_to_each_other(two_stage_model, batch):
    images, _ = batch
    a = _run(two_stage_model, images, _group("g1", 3, 0), _group("g2", 4, 1))
    b = _run(two_stage_model, images, _group("g1", 3, 0), _group("g2", 4, 2))
    assert torch.equal(a["groups"]["g1"]["pred_boxes"], b["groups"]["g1"]["pred_boxes"])
    assert not torch.equal(a["groups"]["g2"]["pred_boxes"], b["groups"]["g2"]["pred_boxes"])


def test_internal_group_mask_is_honoured(two_stage_model, batch):
    images, _ = batch
    isolated = torch.ones(4, 4, dtype=torch.bool)
    isolated.fill_diagonal_(False)  # every query sees only itself
    g1 = _group("g", 4, 0, attn_mask=isolated)
    g2 = _group("g", 4, 0, attn_mask=isolated)
    g2.tgt[:, 3] += 1.0  # perturb one query: the others must not change
    a, b = _run(two_stage_model, images, g1), _run(two_stage_model, images, g2)
    assert torch.equal(a["groups"]["g"]["pred_boxes"][:, :3], b["groups"]["g"]["pred_boxes"][:, :3])


def test_one_stage_group_needs_positional_queries(batch):
    images, _ = batch
    model, _, _ = build_model(tiny_args())
    model.eval()
    out = _run(model, images, _group("g", 3, 0, ref_dim=2, with_pos=True))
    assert out["groups"]["g"]["pred_boxes"].shape == (2, 3, 4)
    with pytest.raises(ValueError, match="query_pos"):
        _run(model, images, _group("g", 3, 0, ref_dim=2))
