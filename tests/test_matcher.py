"""Hungarian matcher: optimal against brute force, batched == per image, empty targets."""
import itertools

import pytest
import torch

from models.matcher import HungarianMatcher


def _targets(g: torch.Generator, n: int, k: int = 5):
    return {"labels": torch.randint(0, k, (n,), generator=g),
            "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.6 + 0.2,
                                torch.rand(n, 2, generator=g) * 0.3 + 0.05], 1)}


def _outputs(g: torch.Generator, b: int, q: int, k: int = 5):
    return {"pred_logits": torch.randn(b, q, k, generator=g),
            "pred_boxes": torch.cat([torch.rand(b, q, 2, generator=g), torch.rand(b, q, 2, generator=g) * 0.5 + 0.01],
                                    -1)}


@pytest.mark.parametrize("q,n", [(4, 1), (5, 3), (6, 4), (3, 3), (2, 4)])
def test_matches_brute_force(q, n):
    g = torch.Generator().manual_seed(q * 10 + n)
    matcher = HungarianMatcher()
    out, tgt = _outputs(g, 1, q), _targets(g, n)
    (rows, cols), = matcher(out, [tgt])
    cost = matcher.cost_matrix(out["pred_logits"][0], out["pred_boxes"][0], tgt["labels"], tgt["boxes"])
    assert len(rows) == min(q, n)
    best = min(
        sum(cost[r, c].item() for r, c in zip(perm, range(n))) if q >= n else
        sum(cost[r, c].item() for r, c in zip(range(q), perm))
        for perm in itertools.permutations(range(q) if q >= n else range(n), min(q, n)))
    assert cost[rows, cols].sum().item() == pytest.approx(best, rel=1e-6, abs=1e-6)


def test_batched_equals_per_image_and_empty():
    g = torch.Generator().manual_seed(3)
    matcher = HungarianMatcher()
    out = _outputs(g, 3, 7)
    targets = [_targets(g, 3), _targets(g, 0), _targets(g, 5)]
    batched = matcher(out, targets)
    for b, t in enumerate(targets):
        single = matcher({k: v[b:b + 1] for k, v in out.items()}, [t])[0]
        assert torch.equal(batched[b][0], single[0]) and torch.equal(batched[b][1], single[1])
    assert len(batched[1][0]) == 0 and batched[1][0].dtype == torch.int64


def test_nonfinite_costs_do_not_crash():
    out = {"pred_logits": torch.full((1, 4, 5), float("nan")), "pred_boxes": torch.full((1, 4, 4), float("nan"))}
    (rows, cols), = HungarianMatcher()(out, [_targets(torch.Generator().manual_seed(0), 2)])
    assert len(rows) == 2
