"""Co-DETR's positive query groups are official by default: the same entries, padding, targets and draws.

tests/data/co_detr_official_aux_targets.pt holds the outputs of the official ``CoDeformDETRHead.get_aux_targets``
(Sense-X/Co-DETR @2665352, projects/models/co_deformable_detr_head.py; ``use_zero_padding`` off, as in its configs)
for five small cases: ATSS-style (every anchor of the pyramid an entry, the entry feature the pyramid at it) and
R-CNN-style (the sampled RoIs with their pooled features), with more positives than ``max_pos_coords`` in an image,
fewer than 9 everywhere, and an image without positives. It was produced (once, outside this repository) on CPU
(its ``.cuda()`` shimmed to a no-op, small stand-ins for the mmcv/mmdet names the module imports, mmdet's
``bbox_xyxy_to_cxcywh``) after ``torch.manual_seed(case["seed"])``, recording its outputs and the next
``torch.rand(4)`` (the draws consumed must match).
"""
from pathlib import Path

import pytest
import torch

from models.addons.co_detr.common import AuxHeadOutput
from models.addons.co_detr.queries import select_positives

DATA = torch.load(Path(__file__).resolve().parents[1] / "data" / "co_detr_official_aux_targets.pt")
CASES = DATA["cases"]
K = DATA["num_classes"]


@pytest.mark.parametrize("case", CASES, ids=[f"{c['kind']}{c['seed']}" for c in CASES])
def test_positive_groups_are_the_official_ones(case):
    if case["kind"] == "rcnn":
        entry_feats = list(case["roi_feats"].unbind(0))
        out = AuxHeadOutput({}, list(case["coords"]), list(case["labels"]), list(case["targets"]), entry_feats)
    else:  # the pyramid at every anchor, as the add-on hands it over
        flat = torch.cat([f.flatten(2) for f in case["mlvl"]], 2).transpose(1, 2)
        entry_feats = list(flat.unbind(0))
        out = AuxHeadOutput({}, case["coords"], case["labels"], case["targets"], None)
    torch.manual_seed(case["seed"])
    sel = select_positives(out, case["sizes"], K, entry_feats, case["max_pos_coords"])
    assert torch.equal(torch.rand(4), case["after"])  # the same draws, in the same order
    assert torch.equal(sel.boxes, case["aux_coords"])
    assert torch.equal(sel.feats, case["aux_feats"])
    assert (case["aux_label_weights"] == 1).all()  # every entry, padding included, weighs in the class loss
    for b, (targets, num_pos) in enumerate(zip(sel.targets, sel.num_pos)):
        labels = case["aux_labels"][b]
        assert torch.equal(targets["labels"], labels[:num_pos]) and (labels[num_pos:] == K).all()
        assert torch.equal(targets["boxes"], case["aux_targets"][b][:num_pos])
        weights = case["aux_bbox_weights"][b]
        assert (weights[:num_pos] == 1).all() and (weights[num_pos:] == 0).all()


ATSS = torch.load(Path(__file__).resolve().parents[1] / "data" / "co_detr_official_atss.pt")["cases"]


@pytest.mark.parametrize("case", ATSS, ids=[f"atss{c['seed']}" for c in ATSS])
def test_atss_anchors_flags_and_assignment_are_the_official_ones(case):
    """tests/data/co_detr_official_atss.pt: the official ATSS head's anchors (``AnchorGenerator``, ratios [1],
    one scale of ``octave_base_scale``), each image's valid flags (``pad_shape`` = the image: Co-DETR pads with
    divisor 1) and ``ATSSAssigner(topk=9)`` on the valid anchors (Sense-X/Co-DETR @2665352's vendored MMDetection
    2.x, run on CPU outside this repository; duplicate and nested boxes compete for anchors, one image has none)."""
    from models.addons.co_detr.atss import atss_assign, level_anchors, valid_flags, valid_index

    cpu = torch.device("cpu")
    anchors = torch.cat(level_anchors(case["shapes"], case["strides"], case["octave_base_scale"], cpu))
    assert torch.equal(anchors, case["anchors"])
    for im in case["images"]:
        flags = valid_flags(case["shapes"], case["strides"], im["size"], cpu)
        assert torch.equal(flags, im["flags"])
        index, counts = valid_index(case["shapes"], case["strides"], im["size"])
        assert index.tolist() == im["flags"].nonzero().squeeze(1).tolist() and counts == im["per_level"]
        assigned = atss_assign(anchors[flags], counts, im["gt"], topk=9)
        assert torch.equal(assigned, im["assigned_gt_inds"] - 1)  # official: 0 background, k + 1 the k-th box


RCNN = torch.load(Path(__file__).resolve().parents[1] / "data" / "co_detr_official_rcnn.pt")


@pytest.mark.parametrize("case", RCNN["rpn"], ids=[f"rpn{c['seed']}" for c in RCNN["rpn"]])
def test_rpn_anchors_assignment_and_draws_are_the_official_ones(case):
    """tests/data/co_detr_official_rcnn.pt "rpn": the official RPN anchors (``AnchorGenerator``, 3 ratios x 3
    scales of octave base 4), valid flags, ``MaxIoUAssigner`` (0.7 / 0.3, low-quality matches from 0.3) and
    ``RandomSampler`` (256, half positive) after the case's seed (Sense-X/Co-DETR @2665352's vendored MMDetection
    2.x, run on CPU outside this repository; one image without ground truth, one with more positives than its
    quota). The sampled indices and the generator state after them must match."""
    from torchvision.ops import box_iou

    from models.addons.co_detr.rcnn_ops import max_iou_assign, random_sample_host, valid_index
    from models.addons.co_detr.rcnn_rpn import AuxRPN

    rpn = AuxRPN(in_channels=4, strides=(8, 16, 32, 64, 128), num_samples=case["num"])
    anchors = torch.cat(rpn.anchors(case["shapes"]))
    assert torch.equal(anchors, case["anchors"])
    valid = valid_index(case["shapes"], rpn.strides, case["size"], rpn.num_anchors)
    assert valid.tolist() == case["flags"].nonzero().squeeze(1).tolist()
    gt_inds = max_iou_assign(box_iou(case["gt"], anchors[valid]), rpn.pos_iou, rpn.neg_iou, rpn.min_pos_iou,
                             low_quality=True)
    assert torch.equal(gt_inds, case["gt_inds"])
    torch.manual_seed(case["seed"])
    pos, neg = random_sample_host(gt_inds.numpy(), rpn.num_samples, rpn.pos_fraction)
    assert torch.equal(torch.rand(4), case["after"])
    assert pos.tolist() == case["pos_inds"].tolist() and neg.tolist() == case["neg_inds"].tolist()
    assert (gt_inds.numpy()[pos] - 1).tolist() == case["pos_assigned_gt_inds"].tolist()


@pytest.mark.parametrize("case", RCNN["roi"], ids=[f"roi{c['seed']}" for c in RCNN["roi"]])
def test_roi_sampling_is_the_official_one(case):
    """tests/data/co_detr_official_rcnn.pt "roi": the official RoI ``MaxIoUAssigner`` (0.5 / 0.5, no low-quality
    matches) and ``RandomSampler`` (a quarter positive, the ground truth added as proposals) after the case's seed:
    the sampled boxes (positives first), their ground truth and labels, and the generator state after."""
    from models.addons.co_detr.rcnn import RCNNAuxHead

    head = RCNNAuxHead(in_channels=4, num_classes=5, strides=(8, 16, 32, 64, 128), fc_channels=8,
                       roi_num_samples=case["num"])
    torch.manual_seed(case["seed"])
    rois, labels, targets, num_pos = head.sample_batch([case["proposals"]],
                                                       [{"boxes": case["gt"], "labels": case["labels"]}])[0]
    assert torch.equal(torch.rand(4), case["after"])
    assert num_pos == case["pos_bboxes"].shape[0]
    assert torch.equal(rois, torch.cat([case["pos_bboxes"], case["neg_bboxes"]]))
    assert torch.equal(labels[:num_pos], case["pos_gt_labels"]) and (labels[num_pos:] == 5).all()
    assert torch.equal(targets[:num_pos], case["pos_gt_bboxes"]) and (targets[num_pos:] == 0).all()


ATSS_LOSS = torch.load(Path(__file__).resolve().parents[1] / "data" / "co_detr_official_atss_loss.pt")["cases"]


@pytest.mark.parametrize("case", ATSS_LOSS, ids=[f"atss_loss{c['seed']}" for c in ATSS_LOSS])
def test_atss_losses_and_gradients_are_the_official_ones(case):
    """tests/data/co_detr_official_atss_loss.pt: the official ``CoATSSHead.loss`` (Co-DETR @2665352 with its
    vendored MMDetection 2.x: anchors, ATSS assigner, pseudo sampler, delta coder, focal, GIoU and sigmoid
    cross-entropy losses; unit loss weights, one process) on fixed class, box and centerness maps, run on CPU
    outside this repository: its three losses and their gradients with respect to the maps. Ours decodes with
    torchvision's box arithmetic and its focal loss, so the figures agree to rounding, not bitwise."""
    from models.addons.co_detr.atss import ATSSHead

    head = ATSSHead(case["num_classes"], 4, case["strides"])
    maps = {name: [x.clone().requires_grad_() for x in case[name]] for name in ("cls", "reg", "ctr")}
    head.predict = lambda feats: (torch.cat([x.flatten(2).transpose(1, 2) for x in maps["cls"]], 1),
                                  torch.cat([x.flatten(2).transpose(1, 2) for x in maps["reg"]], 1),
                                  torch.cat([x.flatten(1) for x in maps["ctr"]], 1))
    feats = [torch.zeros(len(case["sizes"]), 4, h, w) for h, w in case["shapes"]]
    out = head(feats, case["sizes"], [{"boxes": b, "labels": lab} for b, lab in zip(case["gts"], case["labels"])])
    for name, value in case["losses"].items():
        torch.testing.assert_close(out.losses[name], value, rtol=1e-6, atol=0.0)
    sum(out.losses.values()).backward()
    for name in ("cls", "reg", "ctr"):
        for mine, theirs in zip(maps[name], case[f"grad_{name}"]):
            torch.testing.assert_close(mine.grad, theirs, rtol=1e-5, atol=1e-8)


RCNN_LOSS = torch.load(Path(__file__).resolve().parents[1] / "data" / "co_detr_official_rcnn_loss.pt")


@pytest.mark.parametrize("case", RCNN_LOSS["rpn"], ids=[f"rpn_loss{c['seed']}" for c in RCNN_LOSS["rpn"]])
def test_rpn_losses_and_gradients_are_the_official_ones(case):
    """tests/data/co_detr_official_rcnn_loss.pt "rpn": the official RPN loss (MMDetection 2.x ``AnchorHead.loss``
    as ``RPNHead`` calls it, in Co-DETR @2665352's vendored copy: its anchors, MaxIoU assigner, random sampler after
    the case's seed, delta targets, sigmoid cross-entropy and L1; unit weights) on fixed objectness and delta maps:
    the losses, their gradients and the generator state after the draws (an image without ground truth)."""
    from models.addons.co_detr.rcnn_rpn import AuxRPN

    rpn = AuxRPN(in_channels=4, strides=case["strides"])
    cls = [x.clone().requires_grad_() for x in case["cls"]]
    reg = [x.clone().requires_grad_() for x in case["reg"]]
    b = len(case["sizes"])
    logits = torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1) for x in cls], 1)
    deltas = torch.cat([x.permute(0, 2, 3, 1).reshape(b, -1, 4) for x in reg], 1)
    torch.manual_seed(case["seed"])
    losses = rpn.loss(logits, deltas, rpn.anchors(case["shapes"]), case["shapes"], case["sizes"],
                      [{"boxes": gt} for gt in case["gts"]])
    assert torch.equal(torch.rand(4), case["after"])
    for name, value in case["losses"].items():
        torch.testing.assert_close(losses[name], value, rtol=1e-6, atol=0.0)
    sum(losses.values()).backward()
    for mine, theirs in [*zip(cls, case["grad_cls"]), *zip(reg, case["grad_reg"])]:
        torch.testing.assert_close(mine.grad, theirs, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("case", RCNN_LOSS["roi"], ids=[f"roi_loss{c['seed']}" for c in RCNN_LOSS["roi"]])
def test_roi_losses_and_gradients_are_the_official_ones(case):
    """tests/data/co_detr_official_rcnn_loss.pt "roi": the official box head's loss (``BBoxHead.loss`` as Co-DETR
    configures it: softmax cross-entropy over every sampled RoI, GIoU of each positive's class-specific decoded box
    (stds 0.1, 0.1, 0.2, 0.2), both divided by the RoI count; unit weights) on fixed scores and deltas."""
    from models.addons.co_detr.rcnn import RCNNAuxHead

    head = RCNNAuxHead(in_channels=4, num_classes=case["num_classes"], strides=(8, 16, 32, 64, 128), fc_channels=8)
    cls, reg = case["cls"].clone().requires_grad_(), case["reg"].clone().requires_grad_()
    losses = head.roi_loss(cls, reg, case["rois"], case["labels"], case["targets"])
    for name, value in case["losses"].items():
        torch.testing.assert_close(losses[name], value, rtol=1e-6, atol=0.0)
    sum(losses.values()).backward()
    torch.testing.assert_close(cls.grad, case["grad_cls"], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(reg.grad, case["grad_reg"], rtol=1e-5, atol=1e-9)


AUX_LOSS = torch.load(Path(__file__).resolve().parents[1] / "data" / "co_detr_official_aux_loss.pt")["cases"]


@pytest.mark.parametrize("case", AUX_LOSS, ids=[f"aux_loss{c['seed']}" for c in AUX_LOSS])
def test_positive_group_losses_are_the_official_ones(case):
    """tests/data/co_detr_official_aux_loss.pt: the official loss of a positive query group on one decoder layer
    (``CoDeformDETRHead.loss_single_aux`` with its configured focal 2.0, L1 5.0 and GIoU 2.0 losses, lambda_1 1 or 0.5,
    one process; vendored MMDetection 2.x) on fixed predictions, padding entries included (background class, no
    box loss) and an image without positives. Ours: the criterion's terms of the ``co_atss`` group times their
    weights. The official GIoU runs on pixel boxes, ours on normalised ones: equal to rounding."""
    from models import build_model
    from models.addons.base import LossGroup
    from tests.conftest import tiny_args

    _, criterion, _ = build_model(tiny_args("--with_box_refine", "--two_stage", "--addons", "co_detr",
                                            "--num_classes", str(case["num_classes"]),
                                            "--lambda_1", str(case["lambda_1"])))
    cls, raw = case["cls"].clone().requires_grad_(), case["raw_boxes"].clone().requires_grad_()
    targets = [{"labels": case["labels"][i, :p], "boxes": case["targets"][i, :p]}
               for i, p in enumerate(case["num_pos"])]
    indices = [(torch.arange(p), torch.arange(p)) for p in case["num_pos"]]
    num_pos = float(sum(case["num_pos"]))
    group = LossGroup("co_atss", {"pred_logits": cls, "pred_boxes": raw.sigmoid()}, targets, indices=indices,
                      num_boxes=num_pos)
    losses = criterion.group_losses(group, torch.tensor(max(num_pos, 1.0)))
    total = 0
    for name, value in case["losses"].items():
        mine = losses[f"{name}_co_atss"] * criterion.weight_dict[f"{name}_co_atss"]
        torch.testing.assert_close(mine, value.reshape(()), rtol=1e-6, atol=0.0)  # official: some are [1]
        total = total + mine
    total.backward()
    torch.testing.assert_close(cls.grad, case["grad_cls"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(raw.grad, case["grad_raw_boxes"], rtol=1e-5, atol=1e-7)
