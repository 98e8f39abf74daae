"""--soft_nms (Co-DINO's test-time class-wise linear soft-NMS) against a hand-run of MMCV's algorithm."""
from __future__ import annotations

import pytest
import torch

from flags import FlagError, finalize_args, get_args_parser
from models import build_model
from models.soft_nms import SoftNMSPostProcess, soft_nms


def reference_soft_nms(boxes, scores, labels, thr, min_score=1e-3):
    """MMCV's soft_nms_cpu loop (linear), written plainly over Python lists, one class at a time."""
    def iou(a, b):
        w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = w * h
        return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)

    rest = [(i, s) for i, s in enumerate(scores) if s >= min_score]
    out = []
    while rest:
        j = max(range(len(rest)), key=lambda r: rest[r][1])
        i, s = rest.pop(j)
        out.append((i, s))
        kept = []
        for k, t in rest:
            if labels[k] == labels[i]:
                o = iou(boxes[i], boxes[k])
                t = t * (1 - o) if o > thr else t
            if t >= min_score:
                kept.append((k, t))
        rest = kept
    return out


def test_soft_nms_matches_the_reference_loop():
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(40, 2, generator=g) * 50
    wh = torch.rand(40, 2, generator=g) * 30 + 5
    boxes = torch.cat([xy, xy + wh], 1)
    boxes[20:30] = boxes[:10] + torch.rand(10, 4, generator=g)  # heavy overlaps
    scores = torch.rand(40, generator=g)
    scores[5] = 5e-4  # below min_score from the start
    labels = torch.randint(0, 3, (40,), generator=g)
    for thr in (0.3, 0.8):
        keep, kept_scores = soft_nms(boxes, scores, labels, thr, keep=40)
        want = reference_soft_nms(boxes.tolist(), scores.tolist(), labels.tolist(), thr)
        assert keep.tolist() == [i for i, _ in want]
        assert kept_scores.tolist() == pytest.approx([s for _, s in want], rel=1e-5)
        assert 5 not in keep.tolist()
    keep, _ = soft_nms(boxes, scores, labels, 0.8, keep=7)  # the first selections, as with all of them
    assert keep.tolist() == [i for i, _ in reference_soft_nms(boxes.tolist(), scores.tolist(), labels.tolist(),
                                                               0.8)][:7]


def test_post_process_top_k_clip_and_keep():
    logits = torch.tensor([[[4.0, -9.0], [3.9, -9.0], [-9.0, 2.0]]])
    boxes = torch.tensor([[[0.5, 0.5, 0.4, 0.4], [0.51, 0.5, 0.4, 0.4], [0.95, 0.5, 0.2, 0.2]]])
    out = SoftNMSPostProcess(0.8, pre_select=3, num_select=2)({"pred_logits": logits, "pred_boxes": boxes},
                                                              torch.tensor([[100, 200]]))[0]
    # query 1 overlaps query 0 with IoU 0.95 > 0.8 (same class): decayed below query 2's score
    assert out["labels"].tolist() == [0, 1] and len(out["scores"]) == 2
    assert out["scores"][0].item() == pytest.approx(torch.sigmoid(torch.tensor(4.0)).item())
    assert out["boxes"][1].tolist() == pytest.approx([170.0, 40.0, 200.0, 60.0])  # x1 clipped to the width


def test_flag_wraps_sigmoid_hosts_and_refuses_softmax():
    small = ["--backbone", "resnet18", "--backbone_from_scratch", "--hidden_dim", "32", "--nheads", "2",
             "--enc_layers", "1", "--dec_layers", "1", "--dim_feedforward", "32", "--num_queries", "9"]
    _, _, post = build_model(finalize_args(get_args_parser().parse_args(["-m", "dino", "--soft_nms", "0.8", *small])))
    assert isinstance(post["bbox"], SoftNMSPostProcess)
    assert (post["bbox"].pre_select, post["bbox"].num_select) == (9, 300)
    with pytest.raises(FlagError):
        build_model(finalize_args(get_args_parser().parse_args(["-m", "detr", "--soft_nms", "0.8", *small])))
    with pytest.raises(FlagError):
        build_model(finalize_args(get_args_parser().parse_args(["--soft_nms", "1.5", *small])))


def test_batch_at_once_is_each_image_alone_with_one_read():
    """The post-processor runs every image's soft-NMS at once and reads the selection counts once: bitwise the
    one-image ``soft_nms`` of each image, one host-device sync for the batch."""
    from models.soft_nms import batched_soft_nms
    from util.box_ops import box_cxcywh_to_xyxy
    from util.sync_counter import SyncCounter

    g = torch.Generator().manual_seed(3)
    # low scores: many fall under min_score, so the images keep different numbers of their 120
    logits, boxes = torch.randn(3, 40, 6, generator=g) * 3 - 6, torch.rand(3, 40, 4, generator=g) * 0.5 + 0.25
    sizes = torch.tensor([[64, 64], [48, 56], [100, 30]])
    post = SoftNMSPostProcess(0.3, 120, 120)
    with SyncCounter() as syncs:
        results = post({"pred_logits": logits, "pred_boxes": boxes}, sizes)
    assert syncs.total == 1 and not syncs.host_meets_device
    values, indexes = torch.topk(logits.sigmoid().view(3, -1), 120, dim=1)
    for i, (h, w) in enumerate(sizes.tolist()):
        size = torch.tensor([w, h, w, h], dtype=torch.float32)
        box = torch.minimum((box_cxcywh_to_xyxy(boxes[i, indexes[i] // 6]) * size).clamp(min=0), size)
        keep, scores = soft_nms(box, values[i], indexes[i] % 6, 0.3, 120)
        assert torch.equal(results[i]["scores"], scores) and torch.equal(results[i]["boxes"], box[keep])
        assert torch.equal(results[i]["labels"], (indexes[i] % 6)[keep])
    assert len({len(r["scores"]) for r in results}) > 1  # the images keep different numbers
    empty = batched_soft_nms(torch.zeros(2, 0, 4), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.long), 0.5, 10)
    assert empty[0].shape == (2, 0) and empty[2].tolist() == [0, 0]
