"""util/nms.py: the batched, sync-free greedy NMS keeps bitwise what torchvision's ``batched_nms`` keeps (its
coordinate trick) on every image, for any number of fixed-point rounds that reports convergence."""
from __future__ import annotations

import pytest
import torch
from torchvision.ops import boxes as tv_boxes

from util.nms import segmented_nms


def _random_case(batch: int, sizes: list[int], seed: int, spread: float = 100.0):
    g = torch.Generator().manual_seed(seed)
    m = sum(sizes)
    xy = torch.rand(batch, m, 2, generator=g) * spread
    wh = torch.rand(batch, m, 2, generator=g) * 30
    boxes = torch.cat([xy, xy + wh], -1)
    scores = (torch.rand(batch, m, generator=g) * 20).round() / 20  # many ties: the stable order decides
    valid = torch.rand(batch, m, generator=g) > 0.15
    return boxes, scores, valid


def _torchvision_keep(boxes, scores, valid, sizes, threshold):
    ids = torch.cat([torch.full((n,), s, dtype=torch.int64) for s, n in enumerate(sizes)])
    keep = torch.zeros_like(valid)
    for b in range(boxes.shape[0]):
        idx = valid[b].nonzero()[:, 0]
        kept = tv_boxes._batched_nms_coordinate_trick(boxes[b, idx], scores[b, idx], ids[idx], threshold)
        keep[b, idx[kept]] = True
    return keep


@pytest.mark.parametrize("sizes,threshold,block", [([60, 25, 0, 7], 0.5, 4096), ([60, 25, 0, 7], 0.5, 30),
                                                   ([300, 100], 0.3, 4096), ([300, 100], 0.3, 100),
                                                   ([400], 0.7, 4096)])
def test_keep_set_is_torchvisions(sizes, threshold, block):
    """Segments processed together (one block) or apart (blocks of whole segments) keep what torchvision keeps."""
    boxes, scores, valid = _random_case(3, sizes, seed=len(sizes))
    valid[2] = False  # an image without any valid box
    expected = _torchvision_keep(boxes, scores, valid, sizes, threshold)
    keep, converged = segmented_nms(boxes, scores, valid, sizes, threshold, rounds=64, block=block)
    assert bool(converged) and torch.equal(keep, expected)
    assert not keep[2].any()
    # the fewest rounds that report convergence already give the exact result; fewer report non-convergence
    needed = next(r for r in range(1, 65) if segmented_nms(boxes, scores, valid, sizes, threshold, r, block)[1])
    assert torch.equal(segmented_nms(boxes, scores, valid, sizes, threshold, needed, block)[0], expected)
    if needed > 1:
        assert not segmented_nms(boxes, scores, valid, sizes, threshold, needed - 1, block)[1]


def test_images_in_chunks_give_the_same_keep_set(monkeypatch):
    """A batch too large for one overlap matrix runs image chunk by image chunk: the same keep set and flag."""
    import util.nms

    sizes = [60, 25, 7]
    boxes, scores, valid = _random_case(5, sizes, seed=3)
    whole = segmented_nms(boxes, scores, valid, sizes, 0.5, 4)
    monkeypatch.setattr(util.nms, "MAX_PAIRS", 2 * 92 * 92)  # two images at a time
    chunked = segmented_nms(boxes, scores, valid, sizes, 0.5, 4)
    assert torch.equal(whole[0], chunked[0]) and bool(whole[1]) == bool(chunked[1])
    assert torch.equal(segmented_nms(boxes, scores, valid, sizes, 0.5, 64)[0],
                       _torchvision_keep(boxes, scores, valid, sizes, 0.5))


def test_blocks_are_runs_of_whole_segments():
    from util.nms import _blocks

    assert _blocks([4000, 4000, 3150, 819, 231], 4096) == [(0, 4000), (4000, 4000), (8000, 3969), (11969, 231)]
    assert _blocks([60, 25, 0, 7], 4096) == [(0, 92)] and _blocks([60, 25, 0, 7], 30) == [(0, 60), (60, 25), (85, 7)]
    assert _blocks([5000, 10], 4096) == [(0, 5000), (5000, 10)] and _blocks([0, 0], 10) == []


def test_a_chain_needs_rounds_and_segments_do_not_interact():
    """A suppresses B, B would suppress C but is itself suppressed: greedy keeps A and C; the iteration first
    drops C (round 1), then restores it (round 2) and reports convergence from round 3. The same boxes in
    another segment are another class: kept independently."""
    chain = torch.tensor([[0.0, 0.0, 10.0, 10.0], [2.0, 0.0, 12.0, 10.0], [4.0, 0.0, 14.0, 10.0]])
    boxes = torch.cat([chain, chain])[None]
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.6, 0.5, 0.4]])
    valid = torch.ones(1, 6, dtype=torch.bool)
    results = [segmented_nms(boxes, scores, valid, [3, 3], 0.5, r) for r in (1, 2, 3)]
    assert [bool(c) for _, c in results] == [False, False, True]
    assert results[0][0].tolist() == [[True, False, False, True, False, False]]
    assert results[2][0].tolist() == [[True, False, True, True, False, True]]
    invalid_first = valid.clone()
    invalid_first[0, 0] = False  # an invalid box suppresses nothing: B is kept, and suppresses C
    assert segmented_nms(boxes, scores, invalid_first, [3, 3], 0.5, 4)[0].tolist() == [
        [False, True, False, True, False, True]]


def test_no_boxes():
    keep, converged = segmented_nms(torch.zeros(2, 0, 4), torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool),
                                    [0, 0], 0.5, 3)
    assert keep.shape == (2, 0) and bool(converged)


def test_bad_shapes_are_refused():
    boxes, scores, valid = _random_case(1, [4], seed=0)
    with pytest.raises(ValueError, match="sum to M"):
        segmented_nms(boxes, scores, valid, [3], 0.5, 4)
    with pytest.raises(ValueError, match="boxes"):
        segmented_nms(boxes[0], scores, valid, [4], 0.5, 4)
    with pytest.raises(ValueError, match="rounds"):
        segmented_nms(boxes, scores, valid, [4], 0.5, 0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("threshold", [0.7, 0.5])
def test_cuda_keep_set_is_torchvisions_cuda_kernel(threshold):
    """On a GPU against torchvision's CUDA NMS (its kernel may fuse the IoU's multiply-adds; this says whether a
    pair within a rounding of the threshold is decided differently): dense, overlapping RPN-like candidates."""
    sizes = [2000, 1500, 400]
    boxes, scores, valid = _random_case(2, sizes, seed=7, spread=300.0)
    boxes, scores, valid = boxes.cuda(), torch.rand(scores.shape, generator=torch.Generator().manual_seed(1)).cuda(), \
        valid.cuda()
    ids = torch.cat([torch.full((n,), s, dtype=torch.int64) for s, n in enumerate(sizes)]).cuda()
    keep, converged = segmented_nms(boxes, scores, valid, sizes, threshold, rounds=64)
    assert bool(converged)
    for b in range(2):
        idx = valid[b].nonzero()[:, 0]
        kept = tv_boxes._batched_nms_coordinate_trick(boxes[b, idx], scores[b, idx], ids[idx], threshold)
        expected = torch.zeros_like(valid[b])
        expected[idx[kept]] = True
        assert torch.equal(keep[b], expected), f"image {b}: {(keep[b] != expected).sum().item()} boxes differ"
    # and the CPU computes the same keep set
    cpu_keep, _ = segmented_nms(boxes.cpu(), scores.cpu(), valid.cpu(), sizes, threshold, rounds=64)
    assert torch.equal(cpu_keep, keep.cpu())
