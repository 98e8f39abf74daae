"""Teach-DETR add-on: flags, the teachers' NMS merge, score-weighted losses, composition on every model."""
from __future__ import annotations

import math

import pytest
import torch

from datasets.teacher_merge import MERGED_KEY
from flags import get_args_parser
from models import build_model
from models.addons import StepContext
from models.addons.teach import (
    TeachDETR,
    merge_teachers,
    merged_targets,
    parse_named_values,
    per_teacher_targets,
    teacher_terms,
)
from models.matcher import HungarianMatcher
from models.registry import MODELS
from tests.conftest import TINY, tiny_args
from util.errors import FlagError
from util.misc import nested_tensor_from_tensor_list
from util.validation import flag_problems

TWO_STAGE = ["--with_box_refine", "--two_stage", "--dropout", "0"]
HOSTS = {"deformable_detr": TWO_STAGE, "dab_deformable_detr": ["-m", "dab_deformable_detr", "--dropout", "0"],
         "dino": ["-m", "dino", "--dropout", "0", "--no-use_dn"]}
TEACH = ["--ensemble", "--ext_ann_files", "retina=r.json", "mrcnn=m.json"]
OTHERS = ["--num_queries_one2many", "12", "--k_one2many", "2", "--use_ms_detr", "--use_aux_ffn", "--use_dn"]


def _ext(boxes, labels, scores, teacher) -> dict[str, torch.Tensor]:
    return {"ext_boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "ext_labels": torch.tensor(labels, dtype=torch.int64), "ext_scores": torch.tensor(scores),
            "ext_teacher": torch.tensor(teacher, dtype=torch.int64)}


@pytest.fixture
def teach_batch(batch):
    """The shared batch; image 0 has 4 teacher boxes from 2 teachers, image 1 (no GT) none."""
    images, targets = batch
    targets = [{**targets[0], **_ext([[0.5, 0.5, 0.4, 0.3], [0.51, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2],
                                      [0.7, 0.8, 0.3, 0.2]], [1, 1, 3, 4], [0.9, 0.6, 0.7, 0.3], [0, 1, 1, 0])},
               {**targets[1], **_ext([], [], [], [])}]
    return images, targets


# ------------------------------------------------------------------------------------------------ flags
def test_named_values_pairs_json_and_errors():
    args = get_args_parser().parse_args(TINY + ["--ext-ann-files", "b=y.json", "a=x.json",
                                                "--ext_ann_weights", '{"a": 0.25}'])
    assert list(args.ext_ann_files.items()) == [("b", "y.json"), ("a", "x.json")]  # order = teacher index
    assert args.ext_ann_weights == {"a": 0.25} and not args.ensemble and args.ensemble_mode == "merged"
    assert parse_named_values(['{"r": "1.json", "m": "2.json"}']) == {"r": "1.json", "m": "2.json"}
    for bad, kind in ((["noequals"], str), (["=x"], str), (["a=zero"], float), (["{not json"], str)):
        with pytest.raises(ValueError):
            parse_named_values(bad, kind)
    with pytest.raises(SystemExit):
        get_args_parser().parse_args(TINY + ["--ext_ann_weights", "a=heavy"])


@pytest.mark.parametrize("extra, message", [
    ([], "needs the teachers' detections"),
    (["--ext_ann_files", "a=x.json", "--ext_ann_weights", "b=1"], "does not give: ['b']"),
    (["--ext_ann_files", "a=x.json", "--ext_ann_weights", "a=-1"], "must be >= 0"),
    (["--ext_ann_files", "a=x.json", "--lambda_ensemble", "-1"], "--lambda_ensemble must be >= 0"),
])
def test_flag_errors_before_anything_is_built(extra, message):
    args = tiny_args("--ensemble", *extra)
    assert any(message in p for p in flag_problems(args))
    with pytest.raises(FlagError, match="ensemble|ext-ann"):
        build_model(args)
    assert not flag_problems(tiny_args("--addons", "teach", "--ext_ann_files", "a=x.json"))


# ------------------------------------------------------------------------------------------------ merge
def test_merge_is_class_aware_nms_ranked_by_score_plus_weight_then_capped():
    # xyxy; boxes 0/1 overlap (IoU 0.81), box 2 overlaps box 0 a little (IoU 1/7 < 0.2), box 3 = box 0 other class
    boxes = torch.tensor([[0, 0, 10, 10], [1, 0, 10, 9], [5, 5, 15, 15], [0, 0, 10, 10], [20, 20, 30, 30],
                          [40, 40, 50, 50]], dtype=torch.float32)
    labels = torch.tensor([1, 1, 1, 2, 1, 1])
    scores = torch.tensor([0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    teacher = torch.tensor([0, 1, 1, 0, 0, 1])
    # equal weights: box 1 is suppressed by box 0; 5 survive, the first floor(6 / 2) = 3 by score are kept
    assert merge_teachers(boxes, labels, scores, teacher, torch.tensor([0.5, 0.5])).tolist() == [0, 2, 3]
    # teacher 1 weighted up by 0.3: box 1 (0.5 + 0.3) now outranks box 0 (0.6) and suppresses it
    assert merge_teachers(boxes, labels, scores, teacher, torch.tensor([0.0, 0.3])).tolist() == [1, 2, 5]
    # a single teacher present: no cap beyond NMS
    one = merge_teachers(boxes[:3], labels[:3], scores[:3], torch.zeros(3, dtype=torch.int64), torch.tensor([0.5]))
    assert one.tolist() == [0, 2]
    # the teachers with an entry given (the data path: a third teacher's entry held no usable box): floor(6 / 3)
    three = merge_teachers(boxes, labels, scores, teacher, torch.tensor([0.5, 0.5, 0.5]), num_teachers=3)
    assert three.tolist() == [0, 2]


def test_merged_targets_keep_raw_scores_and_give_empty_images_the_whole_image_box(teach_batch):
    _, targets = teach_batch
    merged = merged_targets(targets, torch.tensor([0.5, 0.5]))
    # image 0: box 1 (same class as box 0, IoU > 0.2, lower score) suppressed; floor(4 / 2) = 2 kept
    assert merged[0]["labels"].tolist() == [1, 3]
    assert torch.equal(merged[0]["scores"], torch.tensor([0.9, 0.7]))  # the raw teacher scores, not + weight
    assert torch.equal(merged[0]["boxes"], targets[0]["ext_boxes"][[0, 2]])
    assert merged[1]["boxes"].tolist() == [[0.5, 0.5, 1.0, 1.0]]
    assert merged[1]["labels"].tolist() == [0] and merged[1]["scores"].tolist() == [0.0]
    assert len(merged_targets(targets, torch.tensor([0.5, 0.5]), dummy=False)[1]["labels"]) == 0
    parallel = per_teacher_targets(targets, 2)
    assert [t["labels"].tolist() for t in parallel[0]] == [[1, 4], []]
    assert [t["labels"].tolist() for t in parallel[1]] == [[1, 3], []]


def test_targets_merged_by_the_data_path_are_not_merged_again(teach_batch):
    """ext_merged (datasets/teacher_merge.py): boxes used as they are, no NMS, no cap, no whole-image box."""
    _, targets = teach_batch
    flagged = [{**t, MERGED_KEY: True} for t in targets]
    merged = merged_targets(flagged, torch.tensor([0.5, 0.5]))
    assert torch.equal(merged[0]["boxes"], targets[0]["ext_boxes"]) and merged[0]["labels"].tolist() == [1, 1, 3, 4]
    assert len(merged[1]["boxes"]) == 0  # e.g. a crop removed every box: nothing added
    g = torch.Generator().manual_seed(2)
    outputs = {"pred_logits": torch.randn(2, 6, 5, generator=g), "pred_boxes": torch.rand(2, 6, 4, generator=g),
               "encoder": None}
    losses = _addon().extra_losses(outputs, StepContext(targets=flagged))
    sets = [{"boxes": t["ext_boxes"], "labels": t["ext_labels"], "scores": t["ext_scores"]} for t in targets]
    expect = teacher_terms(outputs, sets, HungarianMatcher()(outputs, sets), torch.tensor(4.0), 0.25)  # 4 boxes
    assert all(torch.equal(losses[f"{t}_ensemble"], expect[t]) for t in ("loss_ce", "loss_bbox", "loss_giou"))
    with pytest.raises(ValueError, match="same --ensemble_mode"):
        _addon(parallel=True).extra_losses(outputs, StepContext(targets=flagged))


# ------------------------------------------------------------------------------------------------ losses
def _focal(p: float, positive: bool, alpha: float = 0.25) -> float:
    return -alpha * (1 - p) ** 2 * math.log(p) if positive else -(1 - alpha) * p ** 2 * math.log(1 - p)


def test_score_weighted_terms_equal_a_hand_computation():
    logits = torch.tensor([[[0.0, 1.0], [-1.0, 2.0], [0.5, -0.5]]])  # B 1, Q 3, K 2
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2], [0.8, 0.8, 0.1, 0.1]]])
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([1]),
                "scores": torch.tensor([0.8])}]
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    out = {"pred_logits": logits, "pred_boxes": boxes}
    terms = teacher_terms(out, targets, indices, torch.tensor(2.0), alpha=0.25)
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in logits[0].tolist()]
    weights = [0.8, 0.5, 0.5]  # the matched box's score; 0.5 for unmatched queries
    ce = sum(w * sum(_focal(p, q == 0 and c == 1) for c, p in enumerate(row))
             for q, (w, row) in enumerate(zip(weights, sig)))
    assert terms["loss_ce"].item() == pytest.approx(ce / 2, rel=1e-5)
    assert terms["loss_bbox"].item() == pytest.approx(0.8 * 0.4 / 2, rel=1e-5)
    # pred box inside the target: IoU = 0.04 / 0.16, enclosing box = union -> GIoU = 0.25; released form 1 - s*GIoU
    assert terms["loss_giou"].item() == pytest.approx((1 - 0.8 * 0.25) / 2, rel=1e-5)
    plain = teacher_terms(out, targets, indices, torch.tensor(2.0), alpha=0.25, weighted=False)
    ce_plain = sum(sum(_focal(p, q == 0 and c == 1) for c, p in enumerate(row)) for q, row in enumerate(sig))
    assert plain["loss_ce"].item() == pytest.approx(ce_plain / 2, rel=1e-5)
    assert plain["loss_giou"].item() == pytest.approx(0.75 / 2, rel=1e-5)


def test_softmax_hosts_get_a_score_weighted_cross_entropy():
    logits = torch.tensor([[[0.0, 1.0, 0.5], [-1.0, 2.0, 0.0], [0.5, -0.5, 1.0]]])  # K 2 classes + no object
    targets = [{"boxes": torch.tensor([[0.5, 0.5, 0.4, 0.4]]), "labels": torch.tensor([1]),
                "scores": torch.tensor([0.8])}]
    out = {"pred_logits": logits, "pred_boxes": torch.rand(1, 3, 4)}
    indices = [(torch.tensor([0]), torch.tensor([0]))]
    plain = teacher_terms(out, targets, indices, torch.tensor(1.0), 0.25, weighted=False, eos_coef=0.1)
    expect = torch.nn.functional.cross_entropy(logits[0], torch.tensor([1, 2, 2]), torch.tensor([1.0, 1.0, 0.1]))
    torch.testing.assert_close(plain["loss_ce"], expect)  # DETR's loss_ce when every weight is 1
    weighted = teacher_terms(out, targets, indices, torch.tensor(1.0), 0.25, eos_coef=0.1)
    nll = [-torch.log_softmax(logits[0, q], -1)[c].item() for q, c in enumerate([1, 2, 2])]
    hand = (0.8 * 1.0 * nll[0] + 0.5 * 0.1 * nll[1] + 0.5 * 0.1 * nll[2]) / (1.0 + 0.1 + 0.1)
    assert weighted["loss_ce"].item() == pytest.approx(hand, rel=1e-5)


def _addon(parallel=False, weights=(0.5, 0.5), dummy=True):
    return TeachDETR(HungarianMatcher(), ["a", "b"], weights, parallel=parallel, dummy=dummy)


def test_extra_losses_keys_and_empty_images(teach_batch):
    _, targets = teach_batch
    g = torch.Generator().manual_seed(1)

    def layer():
        return {"pred_logits": torch.randn(2, 6, 5, generator=g), "pred_boxes": torch.rand(2, 6, 4, generator=g)}

    outputs = {**layer(), "aux_outputs": [layer()], "enc_outputs": layer(), "encoder": None}
    losses = _addon().extra_losses(outputs, StepContext(targets=targets))
    terms = ("loss_ce", "loss_bbox", "loss_giou")
    assert set(losses) == {f"{t}{s}" for t in terms for s in ("_ensemble", "_0_ensemble", "_enc_ensemble")} | {
        "class_error_ensemble"}
    # merged: 2 + 1 (the whole-image box of image 1) targets normalise; recomputed by hand from the parts
    merged = merged_targets(targets, torch.tensor([0.5, 0.5]))
    expect = teacher_terms(outputs, merged, HungarianMatcher()(outputs, merged), torch.tensor(3.0), 0.25)
    assert all(torch.equal(losses[f"{t}_ensemble"], expect[t]) for t in terms)
    no_dummy = _addon(dummy=False).extra_losses(outputs, StepContext(targets=targets))
    assert all(torch.isfinite(v) for v in no_dummy.values())
    # parallel: per teacher matched and normalised by its own count (2 each), weighted by its weight, summed
    par = _addon(parallel=True, weights=(1.0, 0.25)).extra_losses(outputs, StepContext(targets=targets))
    sets = per_teacher_targets(targets, 2)
    parts = [teacher_terms(outputs, s, HungarianMatcher()(outputs, s), torch.tensor(2.0), 0.25) for s in sets]
    for t in terms:
        torch.testing.assert_close(par[f"{t}_ensemble"], parts[0][t] + 0.25 * parts[1][t])
    # evaluation (validation targets without teacher boxes): nothing; a training forward without them: an error
    plain = [{k: v for k, v in t.items() if not k.startswith("ext_")} for t in targets]
    assert _addon().extra_losses({k: v for k, v in outputs.items() if k != "encoder"}, StepContext(targets=plain)) == {}
    with pytest.raises(ValueError, match="carry no teacher boxes"):
        _addon().extra_losses(outputs, StepContext(targets=plain))


# ------------------------------------------------------------------------------------------------ composition
def _step(flags, images, targets):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*flags))
    out = model.train()(nested_tensor_from_tensor_list(images), targets)
    losses = criterion(out, targets)
    criterion.total_loss(losses).backward(retain_graph=True)  # (test_training_step differentiates again)
    return model, criterion, out, losses


def test_addon_off_is_bitwise_baseline(teach_batch, batch):
    inactive = ["--ext_ann_files", "a=x.json", "--ext_ann_weights", "a=2", "--lambda_ensemble", "3",
                "--ensemble_mode", "parallel"]
    m0, c0, out0, loss0 = _step(TWO_STAGE, *batch)
    m1, c1, out1, loss1 = _step(TWO_STAGE + inactive, *teach_batch)  # teacher fields in the data, add-on off
    assert c1.addons == [] and c0.weight_dict == c1.weight_dict and set(loss0) == set(loss1)
    assert all(torch.equal(loss0[k], loss1[k]) for k in loss0)
    for (n0, p0), (n1, p1) in zip(m0.named_parameters(), m1.named_parameters()):
        assert n0 == n1 and (p0.grad is None) == (p1.grad is None)
        assert p0.grad is None or torch.equal(p0.grad, p1.grad)


@pytest.mark.parametrize("others", [[], OTHERS], ids=["alone", "hybrid_ms_dn"])
@pytest.mark.parametrize("host", list(HOSTS))
def test_training_step(host, others, teach_batch):
    images, targets = teach_batch
    model, criterion, out, losses = _step(HOSTS[host] + TEACH + others, images, targets)
    names = [a.name for a in criterion.addons]
    assert names[-1] == "teach" and (not others or {"dn", "hybrid", "ms_detr"} <= set(names))
    layers = ["", *(f"_{i}" for i in range(len(out["aux_outputs"])))] + (["_enc"] if "enc_outputs" in out else [])
    assert {f"loss_{t}{layer}_ensemble" for t in ("ce", "bbox", "giou") for layer in layers} <= set(losses)
    assert ("enc_outputs" in out) == (host != "dab_deformable_detr")
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert criterion.weight_dict["loss_giou_0_ensemble"] == criterion.weight_dict["loss_giou_0"]
    teach = sum(v * criterion.weight_dict[k] for k, v in losses.items() if k.endswith("_ensemble") and k in
                criterion.weight_dict)
    group_logits = [g["pred_logits"] for g in out.get("groups", {}).values()]
    if others:  # the teacher loss reaches the one-to-one queries only, never the other groups
        assert len(group_logits) >= 2 and "o2m_outputs" in out
        grads = torch.autograd.grad(teach, group_logits + [out["pred_logits"]], allow_unused=True)
        assert all(g is None or not g.any() for g in grads[:-1]) and grads[-1].abs().sum() > 0


def test_parallel_mode_and_lambda(teach_batch):
    images, targets = teach_batch
    _, criterion, _, losses = _step(TWO_STAGE + TEACH + ["--ensemble_mode", "parallel", "--lambda_ensemble", "2",
                                                         "--ext_ann_weights", "mrcnn=0.25"], images, targets)
    addon = criterion.addons[0]
    assert addon.parallel and addon.weights.tolist() == [0.5, 0.25]
    assert criterion.weight_dict["loss_bbox_ensemble"] == 2 * criterion.weight_dict["loss_bbox"]
    assert criterion.weight_dict["loss_ce_enc_ensemble"] == 2 * criterion.weight_dict["loss_ce_enc"]
    assert "class_error_ensemble" not in losses and torch.isfinite(losses["loss_giou_enc_ensemble"])


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS.names())
def test_every_registered_model(name, teach_batch):
    images, targets = teach_batch
    extra = ["--no-use_dn"] if name == "dino" else []
    _, criterion, _, losses = _step(["-m", name, "--dropout", "0", *extra, *TEACH], images, targets)
    assert "loss_ce_ensemble" in losses and all(torch.isfinite(v).all() for v in losses.values())
