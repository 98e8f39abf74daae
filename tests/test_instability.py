"""Matching instability (util/instability.py): the fraction on hand-made cases, the probe on a fake model with the
real matcher, its fixed image set and untouched RNGs, its checkpoint state, and plot_logs' instability panel."""
import json
import logging
import random

import pytest
import torch
from torch import nn

import datasets
from flags import finalize_args, get_args_parser
from models import build_model
from models.matcher import HungarianMatcher
from tests.conftest import synthetic_flags, tiny_args
from util.instability import InstabilityProbe, instability, matched_queries, select_images


def test_fraction_on_a_hand_made_case():
    # image 0: GT0 <- query 3, GT1 <- query 5; image 1: GT0 <- query 1, GT1 unmatched (more GTs than queries)
    before = matched_queries([(torch.tensor([5, 3]), torch.tensor([1, 0])), (torch.tensor([1]), torch.tensor([0]))],
                             [2, 2])
    assert before.tolist() == [3, 5, 1, -1]
    # now GT1 of image 0 moved to query 4 and GT1 of image 1 got query 0: 2 of 4 GTs changed
    after = matched_queries([(torch.tensor([3, 4]), torch.tensor([0, 1])), (torch.tensor([0, 1]),
                                                                            torch.tensor([1, 0]))], [2, 2])
    assert after.tolist() == [3, 4, 1, 0]
    assert instability(before, after) == 0.5
    assert instability(after, after) == 0.0
    assert instability(torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int64)) != 0.0  # NaN: no GT
    with pytest.raises(ValueError, match="cannot be compared"):
        instability(before, after[:3])


class _FixedPredictions(nn.Module):
    """Predicts, for every image, query q's box = ``boxes[order[q]]`` (-1 or unlisted: a box far from both)."""

    def __init__(self, boxes: torch.Tensor, order: list[int], num_queries: int = 4) -> None:
        super().__init__()
        self.boxes, self.order, self.num_queries = boxes, order, num_queries

    def forward(self, samples):
        batch = samples.tensors.shape[0]
        boxes = torch.full((batch, self.num_queries, 4), 0.05)
        for q, g in enumerate(self.order):
            if g >= 0:
                boxes[:, q] = self.boxes[g]
        logits = torch.zeros(batch, self.num_queries, 2)
        return {"pred_logits": logits, "pred_boxes": boxes}


def test_probe_records_the_matched_query_of_every_gt():
    gt = torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.7, 0.2, 0.2]])
    data = [(torch.zeros(3, 8, 8), {"labels": torch.tensor([0, 0]), "boxes": gt}) for _ in range(3)]
    matcher = HungarianMatcher(cost_class=2, cost_bbox=5, cost_giou=2)
    probe = InstabilityProbe(data, [0, 2], matcher, batch_size=1, device=torch.device("cpu"))
    model, ema = _FixedPredictions(gt, [0, 1]), _FixedPredictions(gt, [0, 1])
    assert probe.step({"instability": model, "instability_ema": ema}) == {}  # first epoch: nothing to compare
    assert probe.previous["instability"].tolist() == [0, 1, 0, 1]
    model.order = [1, 0]  # the two GTs swap queries: every GT changed
    ema.order = [0, -1, 1]  # GT1 moves from query 1 to query 2
    assert probe.step({"instability": model, "instability_ema": ema}) == {"instability": 1.0,
                                                                          "instability_ema": 0.5}
    assert probe.step({"instability": model, "instability_ema": None}) == {"instability": 0.0}
    assert "instability_ema" not in probe.previous  # EMA off: forgotten, restarts without a value

    state = probe.state_dict()
    again = InstabilityProbe(data, [0, 2], matcher, batch_size=2, device=torch.device("cpu"))
    again.load_state_dict(state)
    assert again.step({"instability": model}) == {"instability": 0.0}
    other = InstabilityProbe(data, [0, 1], matcher, batch_size=2, device=torch.device("cpu"))
    other.load_state_dict(state)  # another image set: the previous assignment is not comparable
    assert other.previous == {}


def test_probe_uses_a_fixed_image_set_and_draws_no_random_numbers(tmp_path):
    assert select_images(100, 5, seed=42) == select_images(100, 5, seed=42) != select_images(100, 5, seed=7)
    assert select_images(3, 5, seed=0) == [0, 1, 2]
    args = finalize_args(get_args_parser().parse_args(synthetic_flags(tmp_path, "out", "--log_instability", "3")))
    dataset = datasets.build_dataset("train", args)
    args.num_classes = datasets.num_classes_for(args, dataset)
    model, criterion, _ = build_model(args)
    model.train()
    probe = InstabilityProbe.from_args(args, dataset, criterion.matcher, torch.device("cpu"))
    assert probe.indices == select_images(len(dataset), 3, args.seed)
    torch_state, py_state = torch.get_rng_state(), random.getstate()
    first = probe.assignments(model)
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == py_state
    assert model.training  # the training mode is given back
    gts = sum(len(dataset.coco.imgToAnns[dataset.ids[i]]) for i in probe.indices)
    assert first.shape == (gts,) and (first >= 0).all()
    assert torch.equal(probe.assignments(model), first)  # evaluation transforms: the same images every time
    assert InstabilityProbe.from_args(tiny_args(), dataset, criterion.matcher, torch.device("cpu")) is None


def test_plot_logs_draws_the_instability_curve(tmp_path, caplog):
    pytest.importorskip("matplotlib")
    from tools import plot_logs

    lines = []
    for epoch in range(4):
        entry = {"epoch": epoch, "train_loss": 10 - epoch, "test_loss": 11 - epoch, "test_ema_loss": 11.5 - epoch,
                 "test_coco_eval_bbox": [0.1 * epoch] * 12, "test_ema_coco_eval_bbox": [0.12 * epoch] * 12}
        if epoch:  # the first epoch has no previous assignment
            entry.update(instability=0.5 / epoch, instability_ema=0.2 / epoch)
        lines.append(json.dumps(entry))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "log.txt").write_text("\n".join(lines) + "\n")
    runs = {"run": plot_logs.read_log(tmp_path / "run")}
    assert plot_logs.panels(runs)[-1] == plot_logs.INSTABILITY_PANEL
    assert plot_logs.series(runs["run"], "instability_ema", None) == ([1, 2, 3], [0.2, 0.1, 0.2 / 3])
    with caplog.at_level(logging.INFO):
        png = plot_logs.main([str(tmp_path / "run"), "--output", str(tmp_path / "curves.png")])
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert plot_logs.panels({"plain": [{"epoch": 0, "train_loss": 1.0}]}) == list(plot_logs.PANELS)
