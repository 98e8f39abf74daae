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
