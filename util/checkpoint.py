"""Checkpoint I/O: atomic writes, safe (weights_only) reads, finding the newest good checkpoint.

Checkpoints keep the official layout (``model``, ``optimizer``, ``lr_scheduler``, ``epoch``,
``args``) with ``args`` as a plain dict, plus what exact resume needs (scaler, RNG states, add-ons).
Official checkpoints, whose ``args`` is a pickled argparse.Namespace, load by allow-listing that one
class; nothing else is unpickled.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to ``path.tmp``, fsync, then rename: a crash never leaves a half-written ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (argparse.Namespace allow-listed for official files)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    with torch.serialization.safe_globals([argparse.Namespace]):
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise ValueError(f"checkpoint {path} has no 'model' entry")
    if isinstance(ckpt.get("args"), argparse.Namespace):
        ckpt["args"] = vars(ckpt["args"])
    return ckpt


def checkpoint_candidates(output_dir: str | Path) -> list[Path]:
    """checkpoint.pth and checkpointNNNN.pth in output_dir, newest first (by stored epoch order)."""
    out = Path(output_dir)
    numbered = sorted((p for p in out.glob("checkpoint*.pth") if re.fullmatch(r"checkpoint\d{4}\.pth", p.name)),
                      key=lambda p: int(p.stem[len("checkpoint"):]), reverse=True)
    latest = [out / "checkpoint.pth"] if (out / "checkpoint.pth").is_file() else []
    return latest + numbered


def find_resume_checkpoint(output_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of output_dir that loads; corrupt ones are reported and skipped."""
    best: tuple[int, Path, dict[str, Any]] | None = None
    for path in checkpoint_candidates(output_dir):
        try:
            ckpt = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
            logger.warning("auto-resume: skipping unreadable checkpoint %s (%s)", path, e)
            continue
        epoch = int(ckpt.get("epoch", -1))
        if best is None or epoch > best[0]:
            best = (epoch, path, ckpt)
    return None if best is None else (best[1], best[2])


def rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and python as weights_only-safe values."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
