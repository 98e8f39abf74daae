"""tools/count_ops.py: a GPU step's host work counted on the CPU (operators per phase), with the matcher's GPU path:
one cost computation per group whatever its number of layers and images (README "Benchmarks")."""
import logging

from models.matcher import HungarianMatcher
from tools.count_ops import PHASES, count

SMALL = "--enc_layers 1 --dec_layers 2 --hidden_dim 32 --dim_feedforward 64 --num_queries 12 --lr_backbone 0"


def test_gpu_matching_computes_one_cost_matrix_per_group(monkeypatch):
    shapes = []
    original = HungarianMatcher.cost_matrix

    def recording(self, logits, *rest):
        shapes.append(tuple(logits.shape))
        return original(self, logits, *rest)

    monkeypatch.setattr(HungarianMatcher, "cost_matrix", recording)
    logging.disable(logging.INFO)
    try:
        counter = count(f"{SMALL} --with_box_refine --two_stage --num_queries_one2many 24 --k_one2many 6",
                        batch_size=2, image_size=64)
    finally:
        logging.disable(logging.NOTSET)
    # 3 steps (2 warm-up ones and the counted one), each: the main queries (2 layers at once), the encoder
    # proposals (one per token of the 64 px image's 4 levels), the one-to-many group (2 layers at once); every
    # computation covers all images and the 6 classes
    assert sorted(shapes) == sorted([(2, 2, 12, 6), (1, 2, 85, 6), (2, 2, 24, 6)] * 3), shapes
    assert all(counter.counts[phase] > 0 for phase in PHASES) and set(counter.counts) == set(PHASES)
    assert HungarianMatcher.costs is not None and "costs" in HungarianMatcher.__dict__  # restored afterwards
