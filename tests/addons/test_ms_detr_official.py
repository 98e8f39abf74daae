"""MS-DETR is official by default: the assigner's global-generator draws, its rules, the layer order, eval mode.

specs/deformable_family.md §4.2-4.3 ([MS] models/matcher_o2m.py ``Stage2Assigner``; models/deformable_detr.py
``SetCriterion``); the opt-in flags ``--o2m_keep_best_query`` and ``--enc_match_valid_anchors_only`` change
only what they claim.
"""
import pytest
import torch
import torch.nn.functional as F

from models import build_model
from models.addons import StepContext
from models.addons.ms_detr import MixedSupervision, OneToManyAssigner
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list

MS = ["--use_ms_detr", "--use_aux_ffn"]
TWO_STAGE = ["--with_box_refine", "--two_stage"]


@pytest.fixture
def randperm_calls(monkeypatch):
    """Records the size of every torch.randperm call (the draws still happen, on the global generator)."""
    calls, real = [], torch.randperm

    def recording(n, *args, **kwargs):
        calls.append(n)
        return real(n, *args, **kwargs)

    monkeypatch.setattr(torch, "randperm", recording)
    return calls


def _pairs(q_idx, g_idx):
    return list(zip(q_idx.tolist(), g_idx.tolist()))


def _quality_case():
    """[G=2, Q=12]: queries 0-5 reach the threshold for GT 0, 6-8 for GT 1; 9-11 are negatives."""
    s = torch.zeros(2, 12)
    s[0, :6] = torch.tensor([0.95, 0.9, 0.85, 0.8, 0.75, 0.7])
    s[1, 6:9] = torch.tensor([0.92, 0.6, 0.5])
    s[0, 9:] = torch.tensor([0.3, 0.2, 0.1])
    s[1, 0] = 0.55  # query 0 is also GT 1's third-best query, but prefers GT 0
    return s


# ---------------------------------------------------------------------------------------------- global draws
def test_each_image_draws_positives_then_negatives_on_the_global_generator(randperm_calls):
    g = torch.Generator().manual_seed(0)
    q = 12
    outputs = {"pred_logits": torch.randn(3, q, 4, generator=g),
               "pred_boxes": torch.rand(3, q, 4, generator=g) * 0.5 + 0.2}
    targets = [{"labels": torch.tensor([0, 2]), "boxes": torch.tensor([[0.4, 0.4, 0.3, 0.3], [0.6, 0.6, 0.2, 0.4]])},
               {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
               {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.5, 0.5]])}]
    assigner = OneToManyAssigner()
    expected_sizes = []
    for b in (0, 2):  # positives: best quality >= 0.4, or a GT's top-1 query
        s = assigner.quality(outputs["pred_logits"][b], outputs["pred_boxes"][b], targets[b]["labels"],
                             targets[b]["boxes"])
        positive = s.max(0).values >= 0.4
        positive[s.argmax(1)] = True
        expected_sizes.append([int(positive.sum()), q - int(positive.sum())])
    expected_sizes.insert(1, [0, q])  # an image without GT draws too: no positive, Q negatives
    torch.manual_seed(11)
    assigner(outputs, targets)
    state = torch.get_rng_state()
    assert randperm_calls == [n for sizes in expected_sizes for n in sizes]
    torch.manual_seed(11)  # the same calls by hand leave the generator in the same state
    for n in list(randperm_calls):
        torch.randperm(n)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("seed", range(6))
def test_pairs_rederived_by_hand_from_the_drawn_permutation(seed):
    s = _quality_case()  # 9 positives (queries 0-8), 3 negatives (9-11); cap floor(0.25 * 12) = 3
    torch.manual_seed(seed)
    q_idx, g_idx = OneToManyAssigner(threshold=0.4, k=6).assign(s)
    next_draw = torch.randperm(5)
    torch.manual_seed(seed)
    kept = torch.randperm(9)[:3].tolist()  # a permutation of the positives (ascending query order: 0..8)
    torch.randperm(3)  # the negatives' permutation, drawn and unused
    assert torch.equal(torch.randperm(5), next_draw)  # the assigner drew exactly those two permutations
    best_gt = [0, 0, 0, 0, 0, 0, 1, 1, 1]
    counts = [sum(best_gt[i] == g for i in kept) for g in (0, 1)]
    # each GT takes its c_g best queries over all 12 (GT 1: 6, 7, then query 0); pairs by quality ascending
    ranked = {0: [0, 1, 2, 3, 4, 5], 1: [6, 7, 0, 8]}
    pairs = sorted([(qq, g) for g in (0, 1) for qq in ranked[g][:counts[g]]], key=lambda p: s[p[1], p[0]].item())
    assert _pairs(q_idx, g_idx) == pairs


def test_without_the_cap_every_positive_counts_and_duplicates_end_with_their_best_pair():
    s = _quality_case()
    q_idx, g_idx = OneToManyAssigner(threshold=0.4, k=6, positive_fraction=1.0).assign(s)
    # c_0 = 6 (queries 0-5), c_1 = 3 (6-8); GT 1's top-3 over all queries are 6, 7 and 0 (not 8)
    assert _pairs(q_idx, g_idx) == [(0, 1), (7, 1), (5, 0), (4, 0), (3, 0), (2, 0), (1, 0), (6, 1), (0, 0)]
    assert _pairs(*OneToManyAssigner(threshold=0.4, k=2, positive_fraction=1.0).assign(s)) == [
        (7, 1), (1, 0), (6, 1), (0, 0)]


def test_low_quality_match_keeps_the_querys_own_best_gt():
    # Nothing reaches 0.4. Query 0 is the top-1 of both GTs and becomes positive for GT 1 (its own argmax),
    # so GT 0 gets no query; query 1 is nobody's top-1 and stays negative.
    s = torch.tensor([[0.30, 0.25, 0.0], [0.35, 0.1, 0.05]])
    q_idx, g_idx = OneToManyAssigner(threshold=0.4, k=6, positive_fraction=1.0).assign(s)
    assert _pairs(q_idx, g_idx) == [(0, 1)]
    q_idx, g_idx = OneToManyAssigner(threshold=0.4, k=6, positive_fraction=1.0, keep_best_query=True).assign(s)
    assert _pairs(q_idx, g_idx) == [(0, 0), (0, 1)]


def test_class_target_of_duplicates_equals_the_sequential_indexed_write():
    """Our criterion writes a duplicated query's class from its last pair; a plain CPU indexed write in pair
    order (the official ``target_classes[idx] = labels``) keeps the last write too."""
    _, criterion, _ = build_model(tiny_args(*MS))
    s = _quality_case()
    q_idx, g_idx = OneToManyAssigner(threshold=0.4, k=6, positive_fraction=1.0).assign(s)
    labels = torch.tensor([3, 1])
    logits = torch.randn(1, 12, 5)
    target = torch.full((12,), 5)
    for qq, g in zip(q_idx.tolist(), g_idx.tolist()):
        target[qq] = labels[g]
    onehot = F.one_hot(target, 6)[None, :, :5].float()
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, onehot, reduction="none")
    p_t = prob * onehot + (1 - prob) * (1 - onehot)
    expected = ((0.25 * onehot + 0.75 * (1 - onehot)) * ce * (1 - p_t) ** 2).mean(1).sum() / 2.0 * 12
    targets = [{"labels": labels, "boxes": torch.rand(2, 4)}]
    got = criterion.loss_labels({"pred_logits": logits}, targets, [(q_idx, g_idx)], 2.0)["loss_ce"]
    torch.testing.assert_close(got, expected)
    assert target[0] == labels[0]  # query 0's best pair is with GT 0


# ---------------------------------------------------------------------------------------------- criterion
def _trained_outputs(extra, batch, seed=0):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*TWO_STAGE, *MS, *extra))
    images, targets = batch
    torch.manual_seed(seed)
    return model, criterion, model.train()(nested_tensor_from_tensor_list(images)), targets


def test_o2m_layers_are_visited_last_first_with_two_draws_per_image(batch, randperm_calls):
    _, criterion, out, targets = _trained_outputs(["--dec_layers", "3"], batch)
    (addon,) = criterion.addons
    seen = []
    real = addon.o2m_assigner.__call__

    class Spy:
        def __call__(self, outputs, tgts):
            seen.append(outputs["pred_logits"])
            return real(outputs, tgts)

    addon.o2m_assigner = Spy()
    criterion(out, targets)
    o2m = out["o2m_outputs"]
    expected = [o2m["pred_logits"]] + [aux["pred_logits"] for aux in o2m["aux_outputs"]]
    assert len(seen) == 3 and all(a is b for a, b in zip(seen, expected))  # last layer, then aux 0, 1
    q = out["pred_logits"].shape[1]
    assert len(randperm_calls) == 3 * 2 * 2 and randperm_calls[2:4] == [0, q]  # image 1 has no GT


def test_keep_best_query_flag_changes_only_the_o2m_terms(batch):
    _, official, out, targets = _trained_outputs([], batch)
    _, fixed, _, _ = _trained_outputs(["--o2m_keep_best_query"], batch)
    assert not official.addons[0].o2m_assigner.keep_best_query and fixed.addons[0].o2m_assigner.keep_best_query
    results = []
    for criterion in (official, fixed):
        torch.manual_seed(3)
        losses = criterion(out, targets)
        results.append((losses, torch.get_rng_state(),
                        criterion.addons[0].o2m_assigner(out["o2m_outputs"], targets)))
    (a, rng_a, idx_a), (b, rng_b, idx_b) = results
    assert torch.equal(rng_a, rng_b)  # the same draws either way
    # 3 GTs but floor(0.25 * 8) = 2 kept positives: officially some GT has no query; with the flag none is left out
    assert len(set(idx_a[0][1].tolist())) < 3 and set(idx_b[0][1].tolist()) == {0, 1, 2}
    assert set(a) == set(b)
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith("_o2m") for k in changed)


def test_valid_anchor_flag_changes_only_the_encoder_terms(batch):
    _, official, out, targets = _trained_outputs([], batch)
    _, fixed, _, _ = _trained_outputs(["--enc_match_valid_anchors_only"], batch)
    matchers = [c.addons[0].anchor_matcher for c in (official, fixed)]
    assert [m.valid_only for m in matchers] == [False, True]
    # a GT filling the padded image 1: its nearest anchor is an invalid (padded) token, the box (1, 1, 1, 1)
    targets = [targets[0], {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.55, 0.55, 0.95, 0.95]])}]
    enc = out["enc_outputs"]
    _, (q_off, _) = matchers[0](enc, targets)
    _, (q_fix, _) = matchers[1](enc, targets)
    assert not enc["anchor_valid"][1, q_off].all() and enc["anchor_valid"][1, q_fix].all()
    a, b = (c(out, targets) for c in (official, fixed))
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    assert changed and all(k.endswith("_enc") for k in changed)


def test_anchor_matcher_costs_follow_the_main_matcher_flags():
    _, criterion, _ = build_model(tiny_args(*MS, "--set_cost_bbox", "3", "--set_cost_giou", "4"))
    hungarian = criterion.addons[0].anchor_matcher.hungarian
    assert (hungarian.cost_class, hungarian.cost_bbox, hungarian.cost_giou) == (0.0, 3.0, 4.0)


def test_o2m_last_layer_logs_class_error():
    _, criterion, _ = build_model(tiny_args(*MS))
    (group,) = criterion.addons[0].loss_groups({"o2m_outputs": {}}, StepContext(targets=[]))
    assert group.log and group.suffix == "o2m"


# ---------------------------------------------------------------------------------------------- evaluation
def test_evaluation_has_no_o2m_outputs_and_the_same_predictions(batch):
    images, targets = batch
    model, criterion, _ = build_model(tiny_args(*TWO_STAGE, *MS, "--dropout", "0"))
    samples = nested_tensor_from_tensor_list(images)
    torch.manual_seed(0)
    train_out = model.train()(samples)
    with torch.no_grad():
        eval_out = model.eval()(samples)
    assert "o2m_outputs" in train_out and "o2m_outputs" not in eval_out
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(eval_out[key], train_out[key], rtol=0, atol=1e-6)
    assert MixedSupervision.loss_groups(criterion.addons[0], eval_out, StepContext(targets=targets)) == []
    losses = criterion(eval_out, targets)  # evaluation computes the criterion too
    assert "loss_ce" in losses and not any(k.endswith("_o2m") for k in losses)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ms_detr_train", "ms_detr_dropout0_train"])
def test_training_step_reproduces_the_official_one(name):
    """tests/data/reference/ms_detr*_train.pt: one training step of Atten4Vis/MS-DETR @c015d65 with
    scripts/train_ms_detr_300.sh's flags (its dropout 0.1, and 0), made like the other reference files
    (tests/data/reference/README.md), ``torch.manual_seed(seed)`` before the forward. With dropout the masks are
    draws on the global generator too, between the one-to-many sampling's: both match, so every term (one-to-many
    and encoder included, 1e-5 relative: they agree to 7e-7) and every parameter's gradient norm (1e-3) do."""
    from tests.test_reference import load_reference

    ref, model, criterion, _ = load_reference(name)
    model.train()
    samples = nested_tensor_from_tensor_list(ref["images"])
    ctx = StepContext(images=samples, targets=ref["targets"])
    torch.manual_seed(int(ref["seed"]))
    outputs = model(samples, ref["targets"], ctx=ctx)
    losses = criterion(outputs, ref["targets"], ctx=ctx)
    total = criterion.total_loss(losses)
    total.backward()
    assert total.item() == pytest.approx(float(ref["total"]), rel=1e-5)
    weighted = {k: w for k, w in ref["weight_dict"].items() if w and k in ref["losses"]}
    assert sum(k.endswith("_o2m") for k in weighted) == 18
    for key, w in weighted.items():
        assert criterion.weight_dict[key] == w, key
        assert losses[key].item() * w == pytest.approx(float(ref["losses"][key]) * w, rel=1e-5, abs=1e-6), key
    params = dict(model.named_parameters())
    assert set(ref["grad_norms"]) == {n for n, p in params.items() if p.requires_grad}
    for pname, norm in ref["grad_norms"].items():
        grad = params[pname].grad
        ours = 0.0 if grad is None else grad.norm().item()
        assert ours == pytest.approx(float(norm), rel=1e-3, abs=1e-7), pname
