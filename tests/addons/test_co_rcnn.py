"""Co-DETR's Faster R-CNN auxiliary head (models/addons/co_detr/rcnn.py): anchors, sampling, pooler, losses."""
from __future__ import annotations

import math

import pytest
import torch
from torchvision.ops import batched_nms, roi_align

from models.addons.co_detr.rcnn import RCNNAuxHead
from models.addons.co_detr.rcnn_ops import (
    decode_deltas,
    map_roi_levels,
    max_iou_assign,
    multilevel_roi_align,
    random_sample,
    valid_flags,
)
from models.addons.co_detr.rcnn_rpn import AuxRPN

STRIDES = (8, 16, 32, 64, 128)
NUM_CLASSES = 5


def tiny_head(**kw) -> RCNNAuxHead:
    return RCNNAuxHead(**{"in_channels": 16, "num_classes": NUM_CLASSES, "strides": STRIDES, "fc_channels": 64,
                          **kw})


def pyramid(batch: int, h: int, w: int, channels: int = 16, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(batch, channels, math.ceil(h / s), math.ceil(w / s), generator=g).requires_grad_()
            for s in STRIDES]


def targets_two_images() -> list[dict[str, torch.Tensor]]:
    return [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 50.0], [30.0, 40.0, 90.0, 95.0], [5.0, 60.0, 40.0, 98.0]]),
             "labels": torch.tensor([1, 4, 0])},
            {"boxes": torch.tensor([[20.0, 20.0, 70.0, 75.0]]), "labels": torch.tensor([2])}]


def test_anchors_explicit_strides_on_odd_image_size():
    rpn = AuxRPN(in_channels=16, strides=STRIDES)
    h, w = 99, 77  # torchvision would infer stride 99 // 13 = 7 at the first level
    sizes = [(math.ceil(h / s), math.ceil(w / s)) for s in STRIDES]
    anchors = rpn.anchors(sizes)
    assert [a.shape[0] for a in anchors] == [sh * sw * 9 for sh, sw in sizes]
    assert sizes[0] == (13, 10) and sizes[-1] == (1, 1)
    # location (y=2, x=3) of stride 8: centre (24, 16), 9 anchors
    loc = anchors[0][(2 * 10 + 3) * 9:(2 * 10 + 4) * 9]
    centres = (loc[:, :2] + loc[:, 2:]) / 2
    torch.testing.assert_close(centres, torch.tensor([[24.0, 16.0]]).expand(9, 2))
    wh = loc[:, 2:] - loc[:, :2]
    sides = torch.tensor([32.0, 32.0 * 2 ** (1 / 3), 32.0 * 2 ** (2 / 3)])
    torch.testing.assert_close(wh[3:6], torch.stack([sides, sides], 1))  # ratio 1
    torch.testing.assert_close(wh[0:3], torch.stack([sides * 2 ** 0.5, sides / 2 ** 0.5], 1))  # ratio h/w 0.5
    torch.testing.assert_close(wh[6:9], torch.stack([sides / 2 ** 0.5, sides * 2 ** 0.5], 1))  # ratio h/w 2
    # coarsest level: one location at (0, 0), sides 512 * 2^(i/3)
    torch.testing.assert_close(anchors[-1][3], torch.tensor([-256.0, -256.0, 256.0, 256.0]))
    # an image of 99 x 77 inside a 120 x 120 batch: only ceil(99/8) x ceil(77/8) locations are valid
    flags = valid_flags((15, 15), 8, (h, w), 9, torch.device("cpu"))
    grid = flags.reshape(15, 15, 9)
    assert flags.sum() == 13 * 10 * 9 and grid[12, 9].all() and not grid[13].any() and not grid[:, 10].any()


def test_max_iou_assign_low_quality_floor():
    ious = torch.tensor([[0.8, 0.5, 0.1, 0.0],   # gt 0: positive by threshold
                         [0.1, 0.35, 0.2, 0.0],  # gt 1: best 0.35 >= 0.3 -> low-quality positive
                         [0.0, 0.0, 0.25, 0.0]])  # gt 2: best 0.25 < 0.3 -> no low-quality match
    gt_inds = max_iou_assign(ious, 0.7, 0.3, 0.3, low_quality=True)
    assert gt_inds.tolist() == [1, 2, 0, 0]
    # without the floor (torchvision) box 2 would become positive for gt 2; with it, it is a negative
    assert max_iou_assign(ious, 0.7, 0.3, 0.0, low_quality=True).tolist() == [1, 2, 3, 0]
    assert max_iou_assign(ious, 0.5, 0.5, 0.5, low_quality=False).tolist() == [1, 1, 0, 0]
    assert max_iou_assign(torch.zeros(0, 3), 0.7, 0.3, 0.3, True).tolist() == [0, 0, 0]


def test_rpn_sampling_counts():
    gt_inds = torch.cat([torch.ones(300, dtype=torch.int64), torch.zeros(1000, dtype=torch.int64),
                         torch.full((50,), -1)])
    pos, neg = random_sample(gt_inds, 256, 0.5)
    assert pos.numel() == 128 and neg.numel() == 128
    assert (gt_inds[pos] > 0).all() and (gt_inds[neg] == 0).all() and (pos.diff() > 0).all()
    gt_inds[10:300] = 0  # 10 positives: all kept, the rest negatives
    pos, neg = random_sample(gt_inds, 256, 0.5)
    assert pos.tolist() == list(range(10)) and neg.numel() == 246


def test_rpn_loss_hand_case():
    """Deltas equal to the targets give zero L1; logits 0 give BCE log 2 (normalised by the sampled count)."""
    rpn = AuxRPN(in_channels=16, strides=(8, 16))
    sizes = [(8, 8), (4, 4)]
    anchors = rpn.anchors(sizes)
    all_anchors = torch.cat(anchors)
    gt = torch.tensor([[8.0, 8.0, 40.0, 40.0]])
    deltas = rpn.coder.encode_single(gt.expand(all_anchors.shape[0], 4), all_anchors)[None]
    targets = [{"boxes": gt, "labels": torch.tensor([0])}]
    losses = rpn.loss(torch.zeros(1, all_anchors.shape[0]), deltas, anchors, sizes, [(64, 64)], targets)
    assert losses["loss_rpn_bbox"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_rpn_cls"].item() == pytest.approx(math.log(2), rel=1e-5)
    losses = rpn.loss(torch.zeros(1, all_anchors.shape[0]), deltas + 0.5, anchors, sizes, [(64, 64)], targets)
    assert losses["loss_rpn_bbox"].item() > 0


def test_roi_sampling_counts_and_gt_added():
    head = tiny_head()
    gt = torch.tensor([[10.0, 10.0, 50.0, 50.0], [60.0, 60.0, 100.0, 110.0]])
    labels = torch.tensor([3, 1])
    g = torch.Generator().manual_seed(0)
    far = torch.rand(800, 2, generator=g) * 20 + 150  # no overlap with the ground truth: negatives only
    proposals = torch.cat([far, far + 10], 1)
    rois, roi_labels, box_targets = head.sample_rois(proposals, gt, labels)
    assert rois.shape == (512, 4) and (roi_labels < NUM_CLASSES).sum() == 2
    torch.testing.assert_close(rois[:2], gt)  # the ground truth itself, first
    assert roi_labels[:2].tolist() == [3, 1] and (roi_labels[2:] == NUM_CLASSES).all()
    torch.testing.assert_close(box_targets[:2], gt)
    assert (box_targets[2:] == 0).all()
    near = gt[0] + torch.rand(400, 4, generator=g) * 2  # IoU > 0.5 with gt 0
    rois, roi_labels, box_targets = head.sample_rois(torch.cat([near, proposals]), gt, labels)
    num_pos = int((roi_labels < NUM_CLASSES).sum())
    assert rois.shape[0] == 512 and num_pos == 128 and (roi_labels[:128] < NUM_CLASSES).all()
    assert (roi_labels[128:] == NUM_CLASSES).all()


def test_level_mapping_on_hand_boxes():
    sides = torch.tensor([10.0, 111.0, 224.0, 447.0, 448.0, 896.0, 5000.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], 1)
    assert map_roi_levels(boxes, 4, 112).tolist() == [0, 0, 1, 1, 2, 3, 3]
    assert map_roi_levels(boxes, 5, 56).tolist() == [0, 0, 2, 2, 3, 4, 4]
    strides = (8, 16, 32, 64)
    feats = [torch.full((2, 3, 1024 // s, 1024 // s), float(i)) for i, s in enumerate(strides)]
    rois = torch.tensor([[0, 0, 0, 20, 20], [1, 0, 0, 230, 230], [0, 0, 0, 460, 460], [1, 0, 0, 900, 900.0]])
    pooled = multilevel_roi_align(feats, rois, strides, 112, 7, 0)
    assert pooled.mean(dim=(1, 2, 3)).tolist() == [0.0, 1.0, 2.0, 3.0]
    feat = torch.randn(2, 3, 8, 8)  # aligned RoIAlign on the picked level
    box = torch.tensor([[1, 4.0, 6.0, 30.0, 50.0]])
    torch.testing.assert_close(multilevel_roi_align([feat, feat[..., :4, :4]], box, (8, 16), 112, 7, 0),
                               roi_align(feat, box, 7, 1 / 8, 0, aligned=True))


def test_roi_losses_on_hand_case():
    head = tiny_head()
    rois = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 5.0, 30.0, 40.0], [0.0, 0.0, 4.0, 4.0], [1.0, 1.0, 9.0, 9.0]])
    labels = torch.tensor([2, 0, NUM_CLASSES, NUM_CLASSES])
    targets = torch.cat([rois[:2], torch.zeros(2, 4)])
    logits = torch.full((4, NUM_CLASSES + 1), -30.0)
    logits[torch.arange(4), labels] = 30.0
    losses = head.roi_loss(logits, torch.zeros(4, NUM_CLASSES * 4), rois, labels, targets)  # perfect
    assert losses["loss_rcnn_cls"].item() == pytest.approx(0.0, abs=1e-6)
    assert losses["loss_rcnn_giou"].item() == pytest.approx(0.0, abs=1e-6)
    # target twice as tall: GIoU 0.5 for one positive, divided by ALL 4 sampled RoIs
    targets[0] = torch.tensor([0.0, 0.0, 10.0, 20.0])
    losses = head.roi_loss(torch.zeros(4, NUM_CLASSES + 1), torch.zeros(4, NUM_CLASSES * 4), rois, labels, targets)
    assert losses["loss_rcnn_giou"].item() == pytest.approx(0.5 / 4, rel=1e-5)
    assert losses["loss_rcnn_cls"].item() == pytest.approx(math.log(NUM_CLASSES + 1), rel=1e-5)
    # class-specific: a delta on the assigned class moves the box, one on another class does not
    deltas = torch.zeros(4, NUM_CLASSES * 4)
    deltas[1, 4 * 1] = 1.0
    assert head.roi_loss(logits, deltas, rois, labels, rois)["loss_rcnn_giou"].item() == pytest.approx(0, abs=1e-6)
    deltas[1, 4 * 0] = 1.0
    assert head.roi_loss(logits, deltas, rois, labels, rois)["loss_rcnn_giou"].item() > 0.01


@pytest.mark.parametrize("weights", [(1.0, 1.0, 1.0, 1.0), (10.0, 10.0, 5.0, 5.0)])
def test_delta_coder_is_torchvisions_bitwise(weights):
    """The coder without per-call uploads computes torchvision's encode and decode bit for bit, gradients too."""
    from torchvision.models.detection._utils import BoxCoder

    from models.addons.co_detr.rcnn_ops import DELTA_CLIP, DeltaCoder
    g = torch.Generator().manual_seed(0)
    ref, ours = BoxCoder(weights, bbox_xform_clip=DELTA_CLIP), DeltaCoder(weights, bbox_xform_clip=DELTA_CLIP)
    xy = torch.rand(50, 2, generator=g) * 100
    anchors = torch.cat([xy, xy + torch.rand(50, 2, generator=g) * 60 + 1], 1)
    gts = torch.cat([xy + 3, xy + torch.rand(50, 2, generator=g) * 50 + 5], 1)
    assert torch.equal(ours.encode_single(gts, anchors), ref.encode_single(gts, anchors))
    deltas = torch.randn(50, 8, generator=g) * 3  # two classes, large enough to hit the clip
    a, b = deltas.clone().requires_grad_(), deltas.clone().requires_grad_()
    out_ref, out = ref.decode_single(a, anchors), ours.decode_single(b, anchors)
    assert torch.equal(out, out_ref)
    grad = torch.randn(out.shape, generator=g)
    out_ref.backward(grad)
    out.backward(grad)
    assert torch.equal(a.grad, b.grad)


def test_giou_loss_is_torchvisions_bitwise():
    """The mask-free GIoU loss gives torchvision's values and gradients bit for bit (overlapping, disjoint,
    nested and touching pairs)."""
    from torchvision.ops import generalized_box_iou_loss

    from models.addons.co_detr.rcnn_ops import giou_loss
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(64, 2, generator=g) * 50
    boxes1 = torch.cat([xy, xy + torch.rand(64, 2, generator=g) * 30 + 0.5], 1)
    shift = torch.randn(64, 2, generator=g) * 20
    boxes2 = torch.cat([xy + shift, xy + shift + torch.rand(64, 2, generator=g) * 30 + 0.5], 1)
    boxes2[:4] = boxes1[:4]  # identical
    boxes2[4:6] = boxes1[4:6] + torch.tensor([100.0, 100.0, 100.0, 100.0])  # disjoint
    boxes2[6, :2], boxes2[6, 2:] = boxes1[6, 2:], boxes1[6, 2:] + 5  # touching at a corner
    a1, a2 = boxes1.clone().requires_grad_(), boxes2.clone().requires_grad_()
    b1, b2 = boxes1.clone().requires_grad_(), boxes2.clone().requires_grad_()
    ref, ours = generalized_box_iou_loss(a1, a2, reduction="none"), giou_loss(b1, b2)
    assert torch.equal(ours, ref)
    weights = torch.rand(64, generator=g)
    (ref * weights).sum().backward()
    (ours * weights).sum().backward()
    assert torch.equal(a1.grad, b1.grad) and torch.equal(a2.grad, b2.grad)


def test_assigner_and_host_sampler_are_the_reference_ones():
    """max_iou_assign's thresholds equal torchvision's Matcher; the host sampler draws what the device one
    draws (the same CPU generator calls, the same sorted indices)."""
    from torchvision.models.detection._utils import Matcher

    from models.addons.co_detr.rcnn_ops import random_sample_host
    g = torch.Generator().manual_seed(0)
    ious = torch.rand(5, 300, generator=g)
    ious[2, :40] = 0.5  # ties at the thresholds
    matches = Matcher(0.5, 0.3, allow_low_quality_matches=False)(ious)
    expected = torch.where(matches >= 0, matches + 1, torch.where(matches == Matcher.BELOW_LOW_THRESHOLD, 0, -1))
    gt_inds = max_iou_assign(ious, 0.5, 0.3, 0.5, low_quality=False)
    assert torch.equal(gt_inds, expected)
    for num, fraction in ((16, 0.25), (256, 0.5), (1000, 0.25)):
        torch.manual_seed(3)
        pos, neg = random_sample(gt_inds, num, fraction)
        torch.manual_seed(3)
        host_pos, host_neg = random_sample_host(gt_inds.numpy(), num, fraction)
        assert pos.tolist() == host_pos.tolist() and neg.tolist() == host_neg.tolist()
        after_host = torch.randint(1000, (1,)).item()  # the generator advanced as far by both
        torch.manual_seed(3)
        random_sample(gt_inds, num, fraction)
        assert torch.randint(1000, (1,)).item() == after_host


def test_decode_clamps_both_sides():
    coder = AuxRPN(in_channels=4, strides=(8,)).coder
    anchor = torch.tensor([[0.0, 0.0, 100.0, 100.0]])
    boxes = decode_deltas(coder, torch.tensor([[0.0, 0.0, -100.0, 100.0]]), anchor)
    torch.testing.assert_close(boxes[0, 2] - boxes[0, 0], torch.tensor(100 * 16 / 1000))
    torch.testing.assert_close(boxes[0, 3] - boxes[0, 1], torch.tensor(100 * 1000 / 16))


def test_forward_exports_and_every_parameter_gets_gradient():
    head = tiny_head(rpn_post_nms_top_n=60)
    feats = pyramid(2, 100, 120)
    out = head(feats, [(100, 120), (90, 80)], targets_two_images())
    assert set(out.losses) == {"loss_rpn_cls", "loss_rpn_bbox", "loss_rcnn_cls", "loss_rcnn_giou"}
    assert all(torch.isfinite(v) and v > 0 for v in out.losses.values())
    # at most 60 proposals + the GT each: the export is capped to the smaller image's sample count
    n = out.coords[0].shape[0]
    assert n <= 61 and [c.shape for c in out.coords] == [(n, 4)] * 2 and [f.shape for f in out.feats] == [(n, 16)] * 2
    for labels, targets in zip(out.labels, out.box_targets):
        pos = labels < NUM_CLASSES
        assert pos.any() and (pos.int().diff() <= 0).all()  # positives first
        assert (targets[~pos] == 0).all() and (targets[pos] != 0).any()
    sum(out.losses.values()).backward()
    assert [name for name, p in head.named_parameters() if p.grad is None] == []
    assert all(f.grad is not None for f in feats)


def test_rpn_proposals_of_the_batch_equal_the_boolean_mask_reference():
    """The forward filters every image's empty boxes from one host copy for the batch (shared with the
    assignment's); its proposals are bitwise those of the per-image boolean-mask filter, and the one-image
    ``proposals`` gives the same. The second image's padding makes clipped-away (empty) boxes."""
    rpn = AuxRPN(in_channels=16, strides=STRIDES, pre_nms_top_n=300, post_nms_top_n=80)
    feats = pyramid(2, 100, 120)
    sizes_px = [(100, 120), (50, 40)]
    _, proposals = rpn(feats, sizes_px, targets_two_images())
    logits, deltas = rpn.head(list(feats))
    level_anchors = rpn.anchors([tuple(f.shape[-2:]) for f in feats])
    empty_seen = False
    for b, size in enumerate(sizes_px):
        level_logits = [x[b].permute(1, 2, 0).reshape(-1).detach() for x in logits]
        level_deltas = [x[b].permute(1, 2, 0).reshape(-1, 4).detach() for x in deltas]
        box, score, ids = rpn.candidates(level_logits, level_deltas, level_anchors, size)
        keep = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
        empty_seen |= bool((~keep).any())
        box, score, ids = box[keep], score[keep], ids[keep]
        expected = box[batched_nms(box, score, ids, rpn.nms_iou)[:rpn.post_nms_top_n]]
        assert torch.equal(proposals[b], expected)
        assert torch.equal(rpn.proposals(level_logits, level_deltas, level_anchors, size), expected)
    assert empty_seen


def test_image_without_ground_truth():
    head = tiny_head()
    feats = pyramid(2, 64, 64)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out = head(feats, [(64, 64), (50, 60)], [empty, dict(empty)])
    assert out.losses["loss_rpn_bbox"].item() == 0 and out.losses["loss_rcnn_giou"].item() == 0
    assert out.losses["loss_rpn_cls"] > 0 and out.losses["loss_rcnn_cls"] > 0
    assert all((x == NUM_CLASSES).all() for x in out.labels) and all((x == 0).all() for x in out.box_targets)
    sum(out.losses.values()).backward()
    assert [name for name, p in head.named_parameters() if p.grad is None] == []


def test_determinism_under_fixed_seed():
    """Same seed, same samples; another seed changes only the samplers' draws (same head, same features)."""
    head = tiny_head(roi_num_samples=64)
    feats = pyramid(2, 100, 120)

    def run(seed: int):
        torch.manual_seed(seed)
        out = head(feats, [(100, 120), (90, 80)], targets_two_images())
        return out.coords, out.losses

    coords_a, losses_a = run(0)
    coords_b, losses_b = run(0)
    coords_c, _ = run(1)
    assert all(torch.equal(a, b) for a, b in zip(coords_a, coords_b))
    assert all(torch.equal(losses_a[k], losses_b[k]) for k in losses_a)
    assert not all(a.shape == c.shape and torch.equal(a, c) for a, c in zip(coords_a, coords_c))


def test_bad_level_count_is_refused():
    with pytest.raises(ValueError, match="feature levels"):
        tiny_head()(pyramid(1, 64, 64)[:4], [(64, 64)], [targets_two_images()[1]])
    with pytest.raises(ValueError, match="num_roi_levels"):
        tiny_head(num_roi_levels=6)


def test_no_proposal_and_no_ground_truth(monkeypatch):
    """Nothing to sample anywhere: zero losses that still reach every parameter, empty exports."""
    head = tiny_head()
    monkeypatch.setattr(head.rpn, "nms", lambda *args: torch.zeros(0, 4))
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    out = head(pyramid(1, 64, 64), [(64, 64)], [empty])
    assert out.losses["loss_rcnn_cls"].item() == 0 and out.losses["loss_rcnn_giou"].item() == 0
    assert out.coords[0].shape == (0, 4) and out.feats[0].shape == (0, 16)
    sum(out.losses.values()).backward()
    assert [name for name, p in head.named_parameters() if p.grad is None] == []


def _head_step(head, feats, sizes, targets, seed=0):
    """One head forward + backward from a seed: the exports, the losses, every gradient, the generator state."""
    for f in feats:
        f.grad = None
    head.zero_grad()
    torch.manual_seed(seed)
    out = head(feats, sizes, targets)
    sum(out.losses.values()).backward()
    grads = [f.grad.clone() for f in feats] + [p.grad.clone() for p in head.parameters()]
    return out, grads, torch.get_rng_state()


@pytest.mark.parametrize("rounds", [16, 1])
def test_device_nms_gives_the_host_paths_results(monkeypatch, rounds):
    """The GPU's path (``DEVICE_NMS``: the batch's NMS on the device, padded proposals, one host copy for the
    anchors' and the RoIs' assignments) computes bitwise what the CPU's does (torchvision's NMS per image):
    exports, losses, gradients, draws. With one round the device NMS does not converge here: the head falls
    back to the exact proposals and doubles its rounds."""
    from models.addons.co_detr import rcnn_rpn

    head = tiny_head(rpn_pre_nms_top_n=300, rpn_post_nms_top_n=80, roi_num_samples=64)
    feats = pyramid(2, 100, 120)
    sizes, targets = [(100, 120), (50, 40)], targets_two_images()
    monkeypatch.setattr(rcnn_rpn, "DEVICE_NMS", False)
    ref_out, ref_grads, ref_rng = _head_step(head, feats, sizes, targets)
    monkeypatch.setattr(rcnn_rpn, "DEVICE_NMS", True)
    head.rpn.nms_rounds = rounds
    out, grads, rng = _head_step(head, feats, sizes, targets)
    assert head.rpn.nms_rounds == (16 if rounds == 16 else 2)
    for k in ref_out.losses:
        assert torch.equal(out.losses[k], ref_out.losses[k]), k
    for field in ("coords", "labels", "box_targets", "feats"):
        assert all(torch.equal(a, b) for a, b in zip(getattr(out, field), getattr(ref_out, field))), field
    assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads)) and torch.equal(rng, ref_rng)
    # the proposals themselves: padded to one size, zeros after each image's count
    head.rpn.nms_rounds = 64
    rp = head.rpn.prepare(feats, sizes, targets)
    monkeypatch.setattr(rcnn_rpn, "DEVICE_NMS", False)
    exact = head.rpn.prepare(feats, sizes, targets)
    assert bool(rp.converged) and torch.equal(rp.counts, exact.counts)
    assert torch.equal(rp.proposals, exact.proposals) and exact.proposals.shape == (2, 80, 4)
    _, listed = head.rpn(feats, sizes, targets)
    assert [p.shape[0] for p in listed] == exact.counts.tolist()
    assert all(torch.equal(p, exact.proposals[b, :len(p)]) for b, p in enumerate(listed))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_nms_gives_torchvisions_proposals(monkeypatch):
    """On a GPU: the RPN's proposals by the device NMS equal those of torchvision's CUDA NMS image by image."""
    from models.addons.co_detr import rcnn_rpn

    rpn = AuxRPN(in_channels=16, strides=STRIDES, pre_nms_top_n=2000, post_nms_top_n=1000).cuda()
    feats = [f.detach().cuda() for f in pyramid(2, 400, 600)]
    sizes, targets = [(400, 600), (300, 350)], [{k: v.cuda() for k, v in t.items()} for t in targets_two_images()]
    with torch.no_grad():
        monkeypatch.setattr(rcnn_rpn, "DEVICE_NMS", True)
        rpn.nms_rounds = 64
        device = rpn.prepare(feats, sizes, targets)
        monkeypatch.setattr(rcnn_rpn, "DEVICE_NMS", False)
        exact = rpn.prepare(feats, sizes, targets)
    assert bool(device.converged)
    assert torch.equal(device.counts, exact.counts) and torch.equal(device.proposals, exact.proposals)


def test_rpn_assignment_of_the_batch_is_each_images(monkeypatch):
    """The batch's anchor assignment at once (ground truth padded, invalid anchors masked) equals each image's
    MaxIoU assignment of its own valid anchors; also when the images are taken one at a time (the memory cap)."""
    from torchvision.ops import box_iou

    from models.addons.co_detr import rcnn_rpn
    from models.addons.co_detr.rcnn_ops import valid_index

    rpn = AuxRPN(in_channels=16, strides=STRIDES)
    sizes = [(math.ceil(100 / s), math.ceil(120 / s)) for s in STRIDES]
    level_anchors, anchors = rpn.anchors(sizes), torch.cat(rpn.anchors(sizes))
    # smaller images than the batch's: anchors in their padding are not valid (none, here, would be a box's best)
    image_sizes = [(100, 120), (50, 40), (50, 40)]
    targets = targets_two_images()[:1] + [{"boxes": torch.zeros(0, 4)}, {"boxes": torch.tensor([[22.0, 31.0, 40.0,
                                                                                                 50.0]])}]
    valid, _, assigned = rpn.assign(level_anchors, sizes, image_sizes, targets)
    for b, (size, t) in enumerate(zip(image_sizes, targets)):
        idx = torch.from_numpy(valid_index(sizes, STRIDES, size, rpn.num_anchors))
        assert torch.equal(idx, torch.from_numpy(valid[b]))
        expected = max_iou_assign(box_iou(t["boxes"], anchors[idx]), 0.7, 0.3, 0.3, low_quality=True)
        assert torch.equal(assigned[b][idx], expected)
    assert (assigned[0] > 0).any() and not (assigned[1] != 0).any()
    monkeypatch.setattr(rcnn_rpn, "MAX_PAIRS", 1)
    assert all(torch.equal(a, b) for a, b in zip(assigned, rpn.assign(level_anchors, sizes, image_sizes, targets)[2]))


def test_device_nms_rounds_adapt_both_ways():
    """A step that did not converge doubles the rounds (up to 64); 100 converged steps in a row halve a raised
    count again, never below the default."""
    from models.addons.co_detr.rcnn_rpn import NMS_ROUNDS

    rpn = AuxRPN(in_channels=16, strides=STRIDES)
    rp = rpn.prepare(pyramid(1, 64, 64), [(64, 64)], [targets_two_images()[1]])
    assert rpn.nms_rounds == NMS_ROUNDS
    for _ in range(3):
        rpn.settle(rp, False)
    assert rpn.nms_rounds == 64 and rpn.settle(rp, False) is not rp and rpn.nms_rounds == 64
    for _ in range(99):
        assert rpn.settle(rp, True) is rp
    assert rpn.nms_rounds == 64
    rpn.settle(rp, True)
    assert rpn.nms_rounds == 32
    for _ in range(300):
        rpn.settle(rp, True)
    assert rpn.nms_rounds == NMS_ROUNDS
