"""Per-sample deterministic augmentation: the random draws of sample i in epoch e depend only on
(seed, e, i), not on which process or worker loads it, nor on what ran before.

This is what makes resume exact (evaluation between epochs consumes no augmentation randomness)
and makes N processes with batch B see the same augmented images as one process with batch N*B.
"""
from __future__ import annotations

import random
from typing import Any

import torch
from torch.utils.data import Dataset


class SeededDataset(Dataset):
    """Wraps a data set; ``__getitem__`` seeds python's and torch's RNGs from (seed, epoch, index).

    The previous RNG states are restored afterwards, so a main-process loader (num_workers 0) leaves
    the training RNG untouched. Call ``set_epoch`` before creating each epoch's iterator (workers
    must not be persistent, so that they see the new epoch).
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # expose .coco, .ids, ... of the wrapped data set
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def __getitem__(self, index: int) -> Any:
        item_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state = random.getstate()
        random.seed(item_seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(item_seed % (2 ** 63))
                return self.dataset[index]
        finally:
            random.setstate(py_state)
