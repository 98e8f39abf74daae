"""Shared fixtures: tiny model flags, a synthetic batch with an empty target, determinism."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flags import finalize_args, get_args_parser  # noqa: E402

TINY = ["--backbone", "resnet18", "--hidden_dim", "32", "--nheads", "4", "--enc_layers", "1", "--dec_layers", "2",
        "--dim_feedforward", "64", "--num_queries", "8", "--device", "cpu", "--num_classes", "5"]


def tiny_args(*extra: str):
    """Parsed flags of a tiny Deformable-DETR (hidden 32, 1+2 layers, 8 queries, resnet18, no weights)."""
    return finalize_args(get_args_parser().parse_args(TINY + list(extra)))


def synthetic_flags(tmp_path, out: str = "out", *extra: str) -> list[str]:
    """Flags of a tiny CPU training run on a tiny synthetic set under tmp_path (2 iterations/epoch)."""
    flags = [f for f in TINY if f not in ("--num_classes", "5")]
    return flags + ["--dataset_file", "synthetic", "--coco_path", str(tmp_path / "data"),
                    "--synthetic_train_size", "8", "--synthetic_val_size", "4", "--synthetic_image_size", "64",
                    "--batch_size", "2", "--num_workers", "0", "--max_iters_per_epoch", "2",
                    "--output_dir", str(tmp_path / out), "--print_freq", "1", "--save_every", "1", *extra]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    logging.getLogger("models.backbone").setLevel(logging.ERROR)
    threads = torch.get_num_threads()
    yield
    # A test that changes the intra-op thread count gives it back: the resume tests compare a run in this process
    # with one in a subprocess (OMP_NUM_THREADS's count), and the float sums' last bits depend on it.
    torch.set_num_threads(threads)


@pytest.fixture
def batch():
    """Two images of different sizes (padded + masked), 3 boxes and an EMPTY target."""
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(3, 64, 64, generator=g), torch.randn(3, 48, 56, generator=g)]
    targets = [
        {"labels": torch.tensor([1, 3, 4]),
         "boxes": torch.tensor([[0.5, 0.5, 0.4, 0.3], [0.2, 0.3, 0.1, 0.2], [0.7, 0.8, 0.3, 0.2]])},
        {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)},
    ]
    return images, targets
