"""Co-DETR's ATSS head: the assigner on a toy case (spec §5), anchors from explicit strides, losses, no-GT images."""
import math

import pytest
import torch

from models.addons.co_detr.atss import (
    ATSSHead,
    atss_assign,
    centerness_target,
    level_anchors,
    valid_flags,
    valid_index,
)


def _brute_force_atss(anchors, num_level, gts, topk=9):
    """Straight loops over GTs and levels: candidates, mean + std threshold, inside check, highest-IoU tie-break."""
    from torchvision.ops import box_iou
    ious = box_iou(anchors, gts)
    ctr = (anchors[:, :2] + anchors[:, 2:]) / 2
    best = {}
    for g in range(len(gts)):
        gc = (gts[g, :2] + gts[g, 2:]) / 2
        cand, start = [], 0
        for n in num_level:
            d = ((ctr[start:start + n] - gc) ** 2).sum(1).sqrt()
            cand += (d.argsort(stable=True)[:min(topk, n)] + start).tolist()
            start += n
        vals = ious[cand, g]
        thr = vals.mean() + vals.std()
        for a, v in zip(cand, vals):
            x, y = ctr[a].tolist()
            inside = min(x - gts[g, 0], y - gts[g, 1], gts[g, 2] - x, gts[g, 3] - y) > 0.01
            if v >= thr and inside and (a not in best or v > ious[a, best[a]]):
                best[a] = g
    out = torch.full((len(anchors),), -1, dtype=torch.long)
    for a, g in best.items():
        out[a] = g
    return out


def test_atss_assigner_toy_case_two_gts_three_levels():
    strides = [8, 16, 32]
    shapes = [(8, 8), (4, 4), (2, 2)]
    per_level = level_anchors(shapes, strides, 2.0, torch.device("cpu"))  # anchors 16, 32, 64 px
    anchors = torch.cat(per_level)
    num_level = [len(a) for a in per_level]
    gts = torch.tensor([[4.0, 4.0, 28.0, 26.0], [10.0, 6.0, 40.0, 30.0]])  # overlapping: some anchors fit both
    assigned = atss_assign(anchors, num_level, gts)
    expected = _brute_force_atss(anchors, num_level, gts)
    assert torch.equal(assigned, expected)
    assert (assigned == 0).any() and (assigned == 1).any()
    # a candidate anchor positive for both GTs goes to the one with the higher IoU
    from torchvision.ops import box_iou
    both = [a for a in range(len(anchors)) if _brute_force_atss(anchors, num_level, gts[:1])[a] == 0
            and _brute_force_atss(anchors, num_level, gts[1:])[a] == 0]
    assert both, "the toy case must exercise the tie-break"
    ious = box_iou(anchors[both], gts)
    assert torch.equal(assigned[both], ious.argmax(1))
    # the 9-per-level candidates: a far-away level-0 anchor is never a candidate
    assert assigned[63] == -1


def test_atss_inside_margin_is_0_01():
    anchors = level_anchors([(4, 4)], [16], 2.0, torch.device("cpu"))[0]  # 32 px, centres at 0, 16, 32, 48
    left, right = 5, 6  # centres (16, 16) and (32, 16): the two closest to every GT below, with equal IoUs
    for margin, expected in ((1 / 64, True), (1 / 256, False)):  # 0.0156 > 0.01 > 0.0039 (exact in binary)
        gt = torch.tensor([[16 - margin, 8.0, 32 + margin, 24.0]])
        assigned = atss_assign(anchors, [16], gt, topk=2)
        assert (assigned[[left, right]] == 0).all() == expected
        assert (assigned[[left, right]] == -1).all() != expected


def test_anchors_from_explicit_strides_on_an_odd_image_size():
    # 999 px at stride 8 gives 125 cells; an inferred stride would be 999 // 125 = 7. Ours stay at 8.
    a = level_anchors([(1, 125)], [8], 8.0, torch.device("cpu"))[0]
    centres = (a[:, 0] + a[:, 2]) / 2
    assert torch.equal(centres, torch.arange(125.0) * 8)
    assert torch.equal(a[:, 2] - a[:, 0], torch.full((125,), 64.0))
    # valid flags: ceil(side / stride) locations of the unpadded image (37 x 45 inside a 48 x 64 batch)
    shapes = [(6, 8), (3, 4), (2, 2)]
    flags = valid_flags(shapes, [8, 16, 32], (37, 45), torch.device("cpu"))
    per = torch.split(flags, [48, 12, 4])
    assert per[0].view(6, 8)[:5, :6].all() and per[0].sum() == 5 * 6
    assert per[1].sum() == 3 * 3 and per[2].sum() == 2 * 2


@pytest.mark.parametrize("size", [(61, 45), (64, 64), (1, 130), (200, 17)])
def test_valid_index_is_the_flags_read_on_the_host(size):
    """The valid anchors from the sizes alone (no device read) are exactly the flags' ones, level by level."""
    shapes, strides = [(8, 9), (4, 5), (2, 3), (1, 2)], [8, 16, 32, 64]
    flags = valid_flags(shapes, strides, size, torch.device("cpu"))
    index, counts = valid_index(shapes, strides, size)
    assert index.tolist() == flags.nonzero().squeeze(1).tolist()
    assert counts == [int(f.sum()) for f in flags.split([h * w for h, w in shapes])]


def test_centerness_target():
    anchors = torch.tensor([[0.0, 0.0, 20.0, 20.0]])  # centre (10, 10)
    gt = torch.tensor([[0.0, 5.0, 40.0, 15.0]])  # l 10, r 30, t 5, b 5
    assert torch.allclose(centerness_target(anchors, gt), torch.tensor([math.sqrt(10 / 30 * 1.0)]))


@pytest.fixture
def head():
    torch.manual_seed(0)
    return ATSSHead(num_classes=5, channels=32, strides=[8, 16, 32])


def _feats(batch=2):
    return [torch.randn(batch, 32, 8, 8), torch.randn(batch, 32, 4, 4), torch.randn(batch, 32, 2, 2)]


def test_head_losses_exports_and_gradients_with_an_image_without_gt(head):
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 40.0, 30.0]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}]
    out = head(_feats(), [(60, 60), (40, 50)], targets)
    assert set(out.losses) == {"loss_atss_cls", "loss_atss_giou", "loss_atss_centerness"}
    assert len(out.coords) == 2 and out.coords[0].shape == (84, 4)
    assert (out.labels[0] == 2).any() and (out.labels[1] == 5).all()
    pos = out.labels[0] < 5
    assert torch.equal(out.box_targets[0][pos], targets[0]["boxes"].expand(int(pos.sum()), 4))
    # image 1 (40 x 50): level 0 keeps ceil(40/8) x ceil(50/8) = 5 x 7 locations, the others are zero boxes
    assert (out.coords[1][:64].abs().sum(1) > 0).sum() == 5 * 7
    sum(out.losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())


def test_head_without_any_gt_still_touches_every_parameter(head):
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.long)}
    out = head(_feats(), [(60, 60), (40, 50)], [empty, empty])
    assert out.losses["loss_atss_giou"] == 0 and out.losses["loss_atss_centerness"] == 0
    sum(out.losses.values()).backward()
    assert all(p.grad is not None for p in head.parameters())
