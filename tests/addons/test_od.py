"""OD-DETR (``--addons od``): parts off = the EMA baseline, the teacher's groups, the losses on hand-made cases."""
from __future__ import annotations

import copy

import pytest
import torch

from models import build_model
from models.addons import StepContext, overrides
from models.addons.od import AUX, INIT, STASH
from models.addons.od_losses import (
    TeacherGuidedMatcher,
    differing_pairs,
    multi_target_qfl,
    prediction_distillation,
    quality_targets,
    select_stage_queries,
    stage_costs,
    union_pairs,
)
from models.matcher import HungarianMatcher, run_stages
from tests.conftest import tiny_args
from util.errors import FlagError
from util.misc import nested_tensor_from_tensor_list
from util.sync_counter import SyncCounter

OFF = ["--no-od_md", "--no-od_init_queries", "--no-od_aux_group"]
PARTS = {"md": ["--no-od_init_queries", "--no-od_aux_group"], "init": ["--no-od_md", "--no-od_aux_group"],
         "aux": ["--no-od_md", "--no-od_init_queries"]}
HOSTS = {"deformable_detr": [], "deformable_detr_refine": ["--with_box_refine"],
         "deformable_detr_two_stage": ["--with_box_refine", "--two_stage"],
         "dab_deformable_detr": ["-m", "dab_deformable_detr"], "dino": ["-m", "dino", "--no-use_dn"]}
COMBO = ["--num_queries_one2many", "6", "--use_ms_detr", "--use_aux_ffn"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is fastest (and steady on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _build(*flags: str):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*flags))
    return model.train(), criterion


def _teacher(model: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """The EMA stand-in: a gradient-free copy with slightly different weights (as after some updates)."""
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in teacher.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    return teacher


def _step(model, criterion, teacher, images, targets, backward=True):
    """One training step as the engine runs it (before_forward, forward, loss, backward)."""
    samples = nested_tensor_from_tensor_list(images)
    ctx = StepContext(images=samples, targets=targets, ema=teacher)
    for addon in criterion.addons:
        if overrides(addon, "before_forward"):
            addon.before_forward(model, ctx)
    out = model(samples, targets, ctx=ctx)
    losses = criterion(out, targets, ctx=ctx)
    if backward:
        criterion.total_loss(losses).backward()
    return out, losses, ctx


def _grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("host", [HOSTS["dab_deformable_detr"], HOSTS["deformable_detr_two_stage"]],
                         ids=["dab", "two_stage"])
def test_all_parts_off_is_bitwise_the_ema_baseline(host, batch):
    images, targets = batch
    runs = []
    for extra in ([], ["--addons", "od", *OFF]):
        model, criterion = _build(*host, *extra)  # dropout 0.1: the student's random draws must match too
        teacher = _teacher(model)
        torch.manual_seed(3)
        _, losses, ctx = _step(model, criterion, teacher, images, targets)
        runs.append((losses, _grads(model), torch.get_rng_state(), criterion.weight_dict))
    (l0, g0, r0, w0), (l1, g1, r1, w1) = runs
    assert w0 == w1 and set(l0) == set(l1) and all(torch.equal(l0[k], l1[k]) for k in l0)
    assert g0.keys() == g1.keys() and all((g0[n] is None) == (g1[n] is None) for n in g0)
    assert all(g0[n] is None or torch.equal(g0[n], g1[n]) for n in g0)
    assert torch.equal(r0, r1)


@pytest.mark.parametrize("part", PARTS)
def test_each_part_adds_only_its_own_terms(part, batch):
    """One part on (dropout 0): the other parts' keys are absent and the terms it does not replace are the
    baseline's (matching distillation replaces loss_ce only; the groups are blind to the main queries)."""
    images, targets = batch
    host = [*HOSTS["dab_deformable_detr"], "--dropout", "0"]
    base_model, base_criterion = _build(*host)
    teacher = _teacher(base_model)
    _, base, _ = _step(base_model, base_criterion, teacher, images, targets, backward=False)
    model, criterion = _build(*host, "--addons", "od", *PARTS[part])
    _, losses, _ = _step(model, criterion, teacher, images, targets, backward=False)
    own = {"md": ("_od_md",), "init": ("_od_pd", "_od_init"), "aux": ("_od_aux",)}[part]
    extra = {k for k in losses if k not in base}
    assert extra and all(k.endswith(own) for k in extra)
    for key in base:
        if part == "md" and key.startswith("loss_ce"):
            assert not torch.equal(losses[key], base[key])  # the multi-target QFL replaced the focal loss
        elif part == "md":
            assert torch.equal(losses[key], base[key])  # no group: the main predictions are bitwise the same
        else:
            torch.testing.assert_close(losses[key], base[key], rtol=1e-5, atol=1e-6)


def test_teacher_draws_nothing_and_keeps_its_mode(batch):
    images, targets = batch
    model, criterion = _build("-m", "dab_deformable_detr", "--dropout", "0.1", "--addons", "od")
    teacher = _teacher(model).train()
    ctx = StepContext(images=nested_tensor_from_tensor_list(images), targets=targets, ema=teacher)
    state = torch.get_rng_state()
    criterion.addons[0].before_forward(model, ctx)
    assert torch.equal(state, torch.get_rng_state()) and teacher.training
    assert ctx.stash[STASH].aux is not None and ctx.stash[STASH].init is not None


def test_no_teacher_no_effect(batch):
    images, targets = batch
    model, criterion = _build("--two_stage", "--with_box_refine", "--addons", "od")
    out, losses, _ = _step(model, criterion, None, images, targets, backward=False)
    assert "groups" not in out and not any("_od" in k for k in losses)


def test_initial_group_is_blind_to_and_hidden_from_the_main_queries(batch):
    images, targets = batch
    model, criterion = _build("-m", "dino", "--no-use_dn", "--addons", "od")
    teacher = _teacher(model)
    samples = nested_tensor_from_tensor_list(images)
    ctx = StepContext(images=samples, targets=targets, ema=teacher)
    criterion.addons[0].before_forward(model, ctx)
    state = ctx.stash[STASH]
    assert state.init[0].shape[1] == model.num_queries and state.init[2] is None  # DINO derives query_pos
    with torch.no_grad():
        out = model(samples, targets, ctx=ctx)
        tgt, reference, pos = state.init
        state.init = (tgt + torch.randn_like(tgt), (reference * 0.5 + 0.2), pos)
        state.aux.tgt = state.aux.tgt + 1.0
        moved = model(samples, targets, ctx=ctx)
    assert torch.equal(out["pred_logits"], moved["pred_logits"]) and torch.equal(out["pred_boxes"], moved["pred_boxes"])
    assert not torch.equal(out["groups"][INIT]["pred_logits"], moved["groups"][INIT]["pred_logits"])


@pytest.mark.parametrize("host", HOSTS.values(), ids=HOSTS.keys())
def test_initial_group_reproduces_the_teacher(host, batch):
    """With the student equal to its teacher, the teacher-initial group predicts what the teacher's own queries do:
    the group holds the teacher's initial queries exactly as it built them."""
    images, targets = batch
    model, criterion = _build(*host, "--dropout", "0", "--addons", "od", "--no-od_aux_group",
                              "--od_pd_score_threshold", "0")  # every query's box is distilled
    teacher = copy.deepcopy(model).requires_grad_(False).eval()
    with torch.no_grad():
        out, losses, _ = _step(model, criterion, teacher, images, targets, backward=False)
        ref = teacher(nested_tensor_from_tensor_list(images))
    group = out["groups"][INIT]
    torch.testing.assert_close(group["pred_logits"], ref["pred_logits"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(group["pred_boxes"], ref["pred_boxes"], rtol=1e-4, atol=1e-4)
    assert losses["loss_bbox_od_pd"] < 1e-4 and losses["loss_giou_0_od_pd"] < 1e-4


@pytest.mark.parametrize("host", [HOSTS["deformable_detr"], HOSTS["dino"]], ids=["one_stage", "dino"])
def test_evaluation_never_uses_it(host, batch):
    images, targets = batch
    plain, _ = _build(*host)
    model, criterion = _build(*host, "--addons", "od")
    model.eval()
    plain.eval()
    samples = nested_tensor_from_tensor_list(images)
    with torch.no_grad():
        out, ref = model(samples), plain(samples)
        losses = criterion(out, targets)  # the evaluation loss: no context, no teacher
    assert set(out) == set(ref) and torch.equal(out["pred_logits"], ref["pred_logits"])
    assert torch.equal(out["pred_boxes"], ref["pred_boxes"]) and not any("_od" in k for k in losses)


def test_aux_group_takes_the_two_lowest_cost_stage_queries_per_gt():
    """Two stages of four queries; the GT boxes are met exactly or nearly by chosen (stage, query) pairs."""
    gt0, gt1 = [0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]
    far = [0.5, 0.1, 0.05, 0.05]
    boxes = torch.tensor([[gt0, far, far, [0.69, 0.7, 0.22, 0.2]],  # stage 0: q0 = GT0, q3 near GT1
                          [far, gt1, [0.31, 0.3, 0.2, 0.18], far]])  # stage 1: q1 = GT1, q2 near GT0
    logits = torch.zeros(2, 4, 3)
    targets = [{"labels": torch.tensor([0, 1]), "boxes": torch.tensor([gt0, gt1])}]
    _, criterion = _build("-m", "dab_deformable_detr", "--addons", "od")
    addon = criterion.addons[0]
    hs = torch.arange(2 * 4, dtype=torch.float).view(2, 1, 4, 1).expand(2, 1, 4, 32)  # stage*4 + query
    layers = [{"pred_logits": logits[i, None], "pred_boxes": boxes[i, None]} for i in range(2)]
    group = addon.aux_group(layers, hs, None, targets)
    assert group.tgt[0, :, 0].tolist() == [0.0, 6.0, 5.0, 3.0]  # GT0: (0, 0), (1, 2); GT1: (1, 1), (0, 3)
    assert torch.equal(group.reference[0], torch.stack([boxes[0, 0], boxes[1, 2], boxes[1, 1], boxes[0, 3]]))
    slots, gts = group.meta["indices"][0]
    assert slots.tolist() == [0, 1, 2, 3] and gts.tolist() == [0, 0, 1, 1] and group.meta["num_boxes"] == 4
    # the picks are the two smallest costs of the matcher's own cost matrix
    cost = stage_costs(addon.hungarian, logits.flatten(0, 1), boxes.flatten(0, 1), targets[0]["labels"],
                       targets[0]["boxes"])
    assert select_stage_queries(cost, 2).tolist() == cost.topk(2, dim=0, largest=False).indices.T.tolist()


def test_stage_queries_are_shared_only_when_unavoidable():
    cost = torch.tensor([[0.0, 0.1], [1.0, 0.2], [2.0, 3.0], [0.5, 4.0]])  # candidate 0 is best for both GTs
    assert select_stage_queries(cost, 2).tolist() == [[0, 3], [1, 2]]
    assert select_stage_queries(cost, 2, shared=True).tolist() == [[0, 3], [0, 1]]
    assert select_stage_queries(cost[:3], 2).tolist() == [[0, 2], [1, 0]]  # 3 candidates for 4 slots: GT 1 shares


def test_multi_target_qfl_hand_case():
    """Query 0 has two targets (classes 0 and 2, IoU 0.6 and 0.3), query 1 two of class 1 (the best counts)."""
    soft = quality_targets((1, 2, 3), torch.tensor([0, 0, 0, 0]), torch.tensor([0, 0, 1, 1]),
                           torch.tensor([0, 2, 1, 1]), torch.tensor([0.6, 0.3, 0.2, 0.5]))
    torch.testing.assert_close(soft, torch.tensor([[[0.6, 0.0, 0.3], [0.0, 0.5, 0.0]]]))
    logits = torch.tensor([[[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]]])
    p = torch.sigmoid(logits)
    bce = -(soft * p.log() + (1 - soft) * (1 - p).log())
    expected = (bce * (soft - p).abs() ** 2).sum()
    torch.testing.assert_close(multi_target_qfl(logits, soft, beta=2.0), expected)
    # a perfect quality prediction costs nothing beyond the target's entropy-free minimum (y in {0, 1})
    exact = torch.tensor([[[20.0, -20.0]]])
    assert multi_target_qfl(exact, torch.tensor([[[1.0, 0.0]]])) < 1e-8


def test_teacher_guided_matching_unions_both_assignments():
    """Query 0 is the student's match of GT 0, query 1 the teacher's: both become targets of GT 0."""
    targets = [{"labels": torch.tensor([2]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}]
    student = {"pred_logits": torch.zeros(1, 3, 4), "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2],
                                                                                 [0.5, 0.5, 0.1, 0.2],
                                                                                 [0.1, 0.1, 0.1, 0.1]]])}
    teacher = {"pred_logits": torch.zeros(1, 3, 4), "pred_boxes": student["pred_boxes"][:, [2, 0, 1]]}
    matcher = TeacherGuidedMatcher(HungarianMatcher(), [(student["pred_logits"], teacher)], [None])
    own = matcher(student, targets)
    assert [x.tolist() for x in own[0]] == [[0], [0]] and [x.tolist() for x in matcher.teacher[0][0]] == [[1], [0]]
    num_boxes = torch.tensor(1.0)
    loss = matcher.label_loss(student, targets, own, num_boxes)["loss_ce"]
    soft = torch.zeros(1, 3, 4)
    soft[0, 0, 2], soft[0, 1, 2] = 1.0, 0.5  # IoU of each query's (detached) box with the GT
    torch.testing.assert_close(loss, multi_target_qfl(student["pred_logits"], soft) / 2)  # 2 pairs
    extra = matcher.teacher_box_losses(targets, "od_md")
    torch.testing.assert_close(extra["loss_bbox_od_md"], torch.tensor(0.1))  # query 1 toward GT 0 (w 0.1 off)
    torch.testing.assert_close(extra["loss_giou_od_md"], torch.tensor(0.5))


def test_union_and_difference_of_assignments():
    own = [(torch.tensor([3, 0, 5]), torch.tensor([0, 1, 2])), (torch.zeros(0, dtype=torch.long),) * 2]
    teacher = [(torch.tensor([0, 4, 5]), torch.tensor([1, 0, 2])), (torch.tensor([2]), torch.tensor([0]))]
    union = union_pairs(own, teacher, 6)  # own pairs first, each pair once, each set in its order
    assert [x.tolist() for x in union[0]] == [[3, 0, 5, 4], [0, 1, 2, 0]]
    assert [x.tolist() for x in union[1]] == [[2], [0]]
    diff = differing_pairs(own, teacher, 6)  # the teacher's pairs whose query the student matched elsewhere/not
    assert [x.tolist() for x in diff[0]] == [[4], [0]] and [x.tolist() for x in diff[1]] == [[2], [0]]
    assert all(x.dtype == torch.long for pair in union + diff for x in pair)


def test_teacher_guided_matcher_is_staged_one_copy_for_every_layer():
    """The student's and the teacher's matching of every layer share the criterion's one host copy."""
    g = torch.Generator().manual_seed(0)

    def layer():
        return {"pred_logits": torch.randn(2, 6, 4, generator=g), "pred_boxes": torch.rand(2, 6, 4, generator=g)}

    targets = [{"labels": torch.tensor([1, 3]), "boxes": torch.tensor([[.3, .3, .2, .2], [.6, .6, .3, .2]])},
               {"labels": torch.tensor([0]), "boxes": torch.tensor([[.5, .5, .4, .4]])}]
    students, teachers = [layer(), layer()], [layer(), layer()]
    staged = TeacherGuidedMatcher(HungarianMatcher(), [(s["pred_logits"], t) for s, t in zip(students, teachers)],
                                  [None, 0])
    with SyncCounter() as syncs:
        together = run_stages([staged.stages(s, targets) for s in students])
    assert syncs.total == 1
    alone = TeacherGuidedMatcher(HungarianMatcher(), [(s["pred_logits"], t) for s, t in zip(students, teachers)],
                                 [None, 0])
    for i, s in enumerate(students):
        expected = alone(s, targets)
        assert all(torch.equal(a, b) for x, y in zip(expected, together[i]) for a, b in zip(x, y))
        assert all(torch.equal(a, b) for x, y in zip(alone.teacher[i], staged.teacher[i]) for a, b in zip(x, y))


@pytest.mark.parametrize("threshold", [0.5, 2.0], ids=["some_kept", "none_kept"])
def test_prediction_distillation_without_masks_is_the_same(threshold):
    """The GPU's path (every query, the others' terms exactly 0: no data-dependent shape) against the CPU's
    selection: the same values and gradients up to the order of the sums."""
    g = torch.Generator().manual_seed(0)
    student = {"pred_logits": torch.randn(2, 7, 3, generator=g), "pred_boxes": torch.rand(2, 7, 4, generator=g)}
    teacher = {"pred_logits": torch.randn(2, 7, 3, generator=g) * 2, "pred_boxes": torch.rand(2, 7, 4, generator=g)}
    results = []
    for by_mask in (False, True):
        s = {k: v.clone().requires_grad_() for k, v in student.items()}
        losses = prediction_distillation(s, teacher, threshold, by_mask=by_mask)
        sum(losses.values()).backward()
        results.append((losses, s["pred_boxes"].grad))
    (plain, grad), (masked, masked_grad) = results
    for k in plain:
        torch.testing.assert_close(masked[k], plain[k], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(masked_grad, grad, rtol=1e-6, atol=1e-7)
    if threshold > 1:
        assert plain["loss_bbox"] == 0 and masked["loss_giou"] == 0


@pytest.mark.parametrize("combo", [False, True], ids=["alone", "with_dn_hybrid_ms_detr"])
@pytest.mark.parametrize("host", HOSTS.values(), ids=HOSTS.keys())
def test_training_step(host, combo, batch):
    images, targets = batch
    anchors = "--two_stage" in host or "-m" in host  # denoising needs 4-d anchor queries
    flags = [f for f in host if not (combo and f == "--no-use_dn")] + ["--addons", "od"]
    if combo:
        flags += COMBO + (["--use_dn"] if anchors else [])
    model, criterion = _build(*flags)
    teacher = _teacher(model)
    out, losses, ctx = _step(model, criterion, teacher, images, targets)
    names = {"dn", "one2many"} if combo and "--use_dn" in flags else {"one2many"} if combo else set()
    assert set(out["groups"]) == {INIT, AUX} | names
    assert out["groups"][AUX]["pred_logits"].shape[1] == 3 * 2  # two stage queries per GT (3 GT, max over images)
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert {"loss_ce_od_pd", "loss_bbox_od_aux", "loss_ce_od_init", "loss_giou_0_od_init"} <= set(losses)
    assert ("loss_bbox_od_md" in criterion.weight_dict) == ("--two_stage" not in host and "dino" not in host)
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith("transformer.decoder.layers"))
    assert all(p.grad is None for p in teacher.parameters())


def test_empty_batch_keeps_the_keys():
    images = [torch.randn(3, 64, 64)]
    targets = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    model, criterion = _build("-m", "dab_deformable_detr", "--addons", "od")
    out, losses, _ = _step(model, criterion, _teacher(model), images, targets)
    assert out["groups"][AUX]["pred_logits"].shape[1] == 0
    assert losses["loss_bbox_od_aux"] == 0 and all(torch.isfinite(v) for v in losses.values())


def test_unsupported_hosts_and_bad_flags_are_refused():
    with pytest.raises(FlagError, match="'od'.*decoder_states"):
        build_model(tiny_args("-m", "detr", "--addons", "od"))
    with pytest.raises(FlagError, match="od_aux_per_gt"):
        build_model(tiny_args("--addons", "od", "--od_aux_per_gt", "0"))
