"""MS-DETR add-on: the one-to-many assigner on hand-made cases, the decoder layer, official names, no leakage."""
import pytest
import torch

from models import build_model
from models.addons import StepContext
from models.addons.ms_detr import MSDETRDecoderLayer, OneToManyAssigner
from tests.addons.official_keys import R50, check_strict_load, official_shapes
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list

MS = ["--use_ms_detr", "--use_aux_ffn"]


def _pairs(q_idx, g_idx):
    return list(zip(q_idx.tolist(), g_idx.tolist()))


# ---------------------------------------------------------------------------------------------- assigner
def test_quality_mixes_iou_and_class_score():
    assigner = OneToManyAssigner()
    gt = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.5, 0.5, 0.4, 0.4], [0.1, 0.1, 0.05, 0.05]])
    logits = torch.full((3, 4), -20.0)
    logits[0, 2] = 0.0  # p = 0.5 for class 2
    s = assigner.quality(logits, boxes, torch.tensor([2]), gt)
    torch.testing.assert_close(s, torch.tensor([[0.7 + 0.15, 0.7 * 0.25, 0.0]]), atol=1e-6, rtol=0)


def test_batch_qualities_are_the_per_image_ones_bitwise(monkeypatch):
    """The batch computation (one for all images; its host work does not grow with them) gives every image's
    matrix bitwise, in the same layout; None for an image without GT."""
    assigner = OneToManyAssigner()
    g = torch.Generator().manual_seed(0)
    logits, boxes = torch.randn(3, 37, 5, generator=g), torch.rand(3, 37, 4, generator=g) * 0.5 + 0.2
    targets = [{"labels": torch.tensor([1, 4, 1]), "boxes": torch.rand(3, 4, generator=g) * 0.4 + 0.1},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([0, 2]), "boxes": torch.rand(2, 4, generator=g) * 0.4 + 0.1}]
    batch = assigner.qualities(logits, boxes, targets)
    assert batch[1] is None
    for b in (0, 2):
        single = assigner.quality(logits[b], boxes[b], targets[b]["labels"], targets[b]["boxes"])
        assert torch.equal(batch[b], single) and batch[b].stride() == single.stride()
    assert assigner.qualities(logits, boxes, [targets[1]] * 3) == [None] * 3


def test_threshold_selects_positives_and_pairs_sorted_ascending():
    s = torch.tensor([[0.9, 0.5, 0.45, 0.3, 0.1, 0.39, 0.0, 0.2]])
    q, g = OneToManyAssigner(threshold=0.4, k=6, positive_fraction=1.0).assign(s)
    assert _pairs(q, g) == [(2, 0), (1, 0), (0, 0)]  # the 3 queries >= 0.4, best last


def test_top_k_per_ground_truth():
    s = torch.linspace(0.5, 0.9, 8)[None]  # every query is positive
    q, g = OneToManyAssigner(threshold=0.4, k=2, positive_fraction=1.0).assign(s)
    assert _pairs(q, g) == [(6, 0), (7, 0)]


def test_positive_cap_is_a_draw_of_the_global_generator():
    # 8 queries, all positive: 0-3 prefer GT 0, 4-7 prefer GT 1; the cap keeps floor(0.25 * 8) = 2.
    s = torch.zeros(2, 8)
    s[0, :4] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    s[1, 4:] = torch.tensor([0.9, 0.8, 0.7, 0.6])
    assigner = OneToManyAssigner(threshold=0.4, k=6)
    runs = []
    for _ in range(2):
        torch.manual_seed(3)
        runs.append(_pairs(*assigner.assign(s)))
    assert runs[0] == runs[1] and len(runs[0]) == 2  # same global seed, same draw; 2 kept positives -> 2 pairs
    draws = set()
    for seed in range(20):
        torch.manual_seed(seed)
        draws.add(tuple(_pairs(*assigner.assign(s))))
    assert len(draws) > 1  # the cap is a random draw, not a fixed rule
    # both kept positives may prefer one GT, which then gets its 2 best queries and the other GT none
    assert ((1, 0), (0, 0)) in draws and ((5, 1), (4, 1)) in draws


def test_a_ground_truth_whose_best_query_prefers_another_gets_none():
    # Query 0 is the best query of both GTs but prefers GT 0: officially GT 1 gets no query.
    s = torch.tensor([[0.9, 0.2, 0.1], [0.8, 0.1, 0.05]])
    assert _pairs(*OneToManyAssigner(threshold=0.4, k=6, positive_fraction=1.0).assign(s)) == [(0, 0)]
    # --o2m_keep_best_query: GT 1 keeps its best query; the higher-quality pair is last (query 0's class target)
    q, g = OneToManyAssigner(threshold=0.4, k=6, positive_fraction=1.0, keep_best_query=True).assign(s)
    assert _pairs(q, g) == [(0, 1), (0, 0)]


def test_empty_targets_and_fewer_queries_than_k():
    assigner = OneToManyAssigner(k=6)
    outputs = {"pred_logits": torch.randn(2, 5, 5), "pred_boxes": torch.rand(2, 5, 4) * 0.5 + 0.25}
    targets = [{"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.3, 0.3]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    (q0, g0), (q1, g1) = assigner(outputs, targets)
    # cap floor(0.25 * 5) = 1 kept positive; k = 6 > Q = 5 is capped at Q (the official code fails there)
    assert len(q0) == 1 and (g0 == 0).all() and len(q1) == len(g1) == 0


def test_class_target_of_a_duplicated_query_is_its_last_pair():
    _, criterion, _ = build_model(tiny_args(*MS))
    logits = torch.randn(1, 4, 5)
    targets = [{"labels": torch.tensor([1, 2]), "boxes": torch.rand(2, 4)}]
    dup = [(torch.tensor([0, 0]), torch.tensor([0, 1]))]
    last_only = [(torch.tensor([0]), torch.tensor([1]))]
    a = criterion.loss_labels({"pred_logits": logits}, targets, dup, 1.0)["loss_ce"]
    b = criterion.loss_labels({"pred_logits": logits}, targets, last_only, 1.0)["loss_ce"]
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------- model
def test_layer_order_is_cross_self_ffn():
    torch.manual_seed(0)
    layer = MSDETRDecoderLayer(32, 64, 0.0, n_levels=1, n_heads=4, n_points=2, use_aux_ffn=True).train()
    tgt, pos = torch.randn(2, 5, 32), torch.randn(2, 5, 32)
    ref, src = torch.rand(2, 5, 1, 2), torch.randn(2, 16, 32)
    shapes, start = torch.tensor([[4, 4]]), torch.tensor([0])
    out, o2m = layer(tgt, pos, ref, src, shapes, start)
    x = layer.norm1(tgt + layer.cross_attn(tgt + pos, ref, src, shapes, start, None))
    torch.testing.assert_close(o2m, layer.norm4(x + layer.linear4(torch.relu(layer.linear3(x)))))
    x = layer.norm2(x + layer.self_attn(x + pos, x + pos, x, need_weights=False)[0])
    torch.testing.assert_close(out, layer.norm3(x + layer.linear2(torch.relu(layer.linear1(x)))))
    out_eval, o2m_eval = layer.eval()(tgt, pos, ref, src, shapes, start)  # evaluation skips the o2m branch
    assert o2m_eval is None and torch.equal(out_eval, out)


def test_official_ms_detr_checkpoint_names_load_strictly():
    args = tiny_args("--with_box_refine", "--two_stage", *MS)
    for flag, value in R50 + [("dim_feedforward", 2048)]:
        setattr(args, flag, value)
    model, _, _ = build_model(args)
    shapes = official_shapes(2048)
    for i in range(6):
        p = f"transformer.decoder.layers.{i}."
        shapes.update({p + "linear3.weight": [2048, 256], p + "linear3.bias": [2048], p + "linear4.weight": [256, 2048],
                       p + "linear4.bias": [256], p + "norm4.weight": [256], p + "norm4.bias": [256]})
    assert len(shapes) == 666
    check_strict_load(model, shapes)
    assert sum(p.numel() for p in model.parameters()) == 53_793_625


@pytest.mark.parametrize("variant", [[], ["--with_box_refine", "--two_stage", "--look_forward_twice"]],
                         ids=["one_stage", "two_stage_lft"])
def test_training_step_every_parameter_gets_a_gradient(variant, batch):
    model, criterion, _ = build_model(tiny_args(*variant, *MS))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    images, targets = batch
    out = model.train()(nested_tensor_from_tensor_list(images))
    assert len(out["o2m_outputs"]["aux_outputs"]) == 1
    losses = criterion(out, targets)
    assert {"loss_ce_o2m", "loss_giou_0_o2m"} <= set(losses) and criterion.weight_dict["loss_ce_o2m"] == 2.0
    criterion.total_loss(losses).backward()
    assert all(torch.isfinite(v).all() for v in losses.values())
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not no_grad


def test_predictions_do_not_depend_on_the_aux_ffn(batch):
    model, _, _ = build_model(tiny_args("--with_box_refine", "--two_stage", "--dropout", "0", *MS))
    model.train()  # evaluation makes no one-to-many outputs; dropout 0 keeps both forwards identical
    images, _ = batch
    with torch.no_grad():
        a = model(nested_tensor_from_tensor_list(images))
        for layer in model.transformer.decoder.layers:
            layer.linear4.weight.add_(1.0)
        b = model(nested_tensor_from_tensor_list(images))
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["o2m_outputs"]["pred_logits"], b["o2m_outputs"]["pred_logits"])


def test_flags_are_wired():
    _, criterion, _ = build_model(tiny_args(*MS, "--o2m_matcher_threshold", "0.3", "--o2m_matcher_k", "4",
                                            "--o2m_cls_loss_coef", "3", "--o2m_bbox_loss_coef", "4",
                                            "--o2m_giou_loss_coef", "1", "--cls_loss_coef", "1",
                                            "--enc_cls_loss_coef", "2"))
    (addon,) = criterion.addons
    assert (addon.o2m_assigner.threshold, addon.o2m_assigner.k) == (0.3, 4)
    w = criterion.weight_dict
    assert (w["loss_ce_o2m"], w["loss_bbox_0_o2m"], w["loss_giou_o2m"]) == (3, 4, 1)
    assert (w["loss_ce"], w["loss_ce_enc"], w["loss_bbox_enc"]) == (1, 2, 5)


def test_no_private_generator_and_old_checkpoints_load():
    _, criterion, _ = build_model(tiny_args(*MS))
    (addon,) = criterion.addons
    assert addon.state_dict() == {} and not hasattr(addon.o2m_assigner, "generator")
    addon.load_state_dict({"generator": torch.Generator().get_state()})  # a checkpoint of the former assigner
    s = torch.rand(3, 40) * 0.5 + 0.5  # 40 positives, cap 10: a random draw, replayed by the global seed
    torch.manual_seed(5)
    first = _pairs(*addon.o2m_assigner.assign(s))
    torch.manual_seed(5)
    assert _pairs(*addon.o2m_assigner.assign(s)) == first


def test_anchor_matcher_matches_fixed_anchors_and_invalid_tokens_only_with_the_flag():
    from models.addons.ms_detr import AnchorMatcher

    anchors = torch.tensor([[[0.2, 0.2, 0.1, 0.1], [0.7, 0.7, 0.2, 0.2], [1.0, 1.0, 1.0, 1.0], [0.5, 0.5, 0.1, 0.1]]])
    valid = torch.tensor([[True, True, False, True]])
    logits = torch.randn(1, 4, 3) * 10  # the class cost is 0: logits play no part
    boxes = torch.tensor([[0.72, 0.68, 0.2, 0.2], [0.95, 0.95, 0.9, 0.9]])
    targets = [{"labels": torch.tensor([0, 2]), "boxes": boxes}]
    enc = {"pred_logits": logits, "pred_boxes": torch.rand(1, 4, 4), "anchors": anchors, "anchor_valid": valid}
    # official: GT 1 is closest to the invalid border anchor 2 (the box (1, 1, 1, 1)), and takes it
    (q, g), = AnchorMatcher()(enc, targets)
    assert sorted(zip(g.tolist(), q.tolist())) == [(0, 1), (1, 2)]
    # --enc_match_valid_anchors_only: invalid tokens are left out while there are enough valid ones
    (q, g), = AnchorMatcher(valid_only=True)(enc, targets)
    assert sorted(zip(g.tolist(), q.tolist())) == [(0, 1), (1, 3)]


def test_encoder_proposals_are_matched_on_anchors(batch):
    model, criterion, _ = build_model(tiny_args("--with_box_refine", "--two_stage", *MS))
    images, targets = batch
    out = model.train()(nested_tensor_from_tensor_list(images))
    enc = out["enc_outputs"]
    assert enc["anchors"].shape == enc["pred_boxes"].shape and enc["anchor_valid"].any()
    (group,) = [g for g in criterion.main_groups(out, targets) if g.suffix == "enc"]
    assert group.matcher is None  # the add-on's assigner hook replaces it
    group = criterion._assign(group, StepContext(targets=targets))
    assert group.matcher is criterion.addons[0].anchor_matcher
    (q, _), _ = group.matcher(enc, targets)
    expected = criterion.addons[0].anchor_matcher.hungarian(
        {"pred_logits": enc["pred_logits"], "pred_boxes": enc["anchors"]}, targets)
    assert torch.equal(q, expected[0][0])
    # without MS-DETR the encoder proposals keep the main Hungarian matcher on the predicted boxes
    _, plain, _ = build_model(tiny_args("--with_box_refine", "--two_stage"))
    assert [g.matcher for g in plain.main_groups(out, targets) if g.suffix == "enc"] == [None]
