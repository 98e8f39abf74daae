"""Checkpoint I/O: atomic writes, safe (weights_only) reads, finding the newest good checkpoint.

Checkpoints keep the official layout (``model``, ``optimizer``, ``lr_scheduler``, ``epoch``,
``args``) with ``args`` as a plain dict, plus what exact resume needs (scaler, RNG states, add-ons, and
DINO's ``ema_model`` with ``ema_updates`` under --use_ema). The run's log.txt is kept consistent with them
(:func:`reconcile_log`). Official checkpoints, whose ``args`` is a pickled argparse.Namespace, load by
allow-listing that one class; nothing else is unpickled.

Faults: a file that cannot be read raises :class:`CheckpointError` naming it; a full disk while
writing raises :class:`DiskFullError` with the space needed, after removing the temporary file (the
previous checkpoint stays the newest). A second name for the same bytes is a hard link (:func:`link_atomic`).
"""
from __future__ import annotations

import argparse
import contextlib
import errno
import filecmp
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from util.errors import FlagError
from util.misc import all_gather_object, is_main_process

logger = logging.getLogger(__name__)

TRAINING_STATE = ("optimizer", "lr_scheduler", "epoch")  # what a checkpoint needs to continue a run
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class CheckpointError(ValueError):
    """A checkpoint or weights file that cannot be used (truncated, not a checkpoint, another model).

    main.py's cli() exits with its message (status 1).
    """


class UnsafeCheckpointError(CheckpointError, pickle.UnpicklingError):
    """A checkpoint holding objects other than tensors and plain values (never unpickled)."""


class DiskFullError(OSError):
    """No space left while writing a file; the temporary file is removed and the previous file is kept."""

    def __init__(self, message: str, code: int = errno.ENOSPC) -> None:
        super().__init__(message)
        self.errno = code


def _mb(n: float) -> str:
    return f"{n / 2**20:.0f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def object_nbytes(obj: Any) -> int:
    """Bytes of the tensors (and numpy arrays) in a nested checkpoint object: about its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, np.ndarray):
        return obj.nbytes
    if isinstance(obj, dict):
        return sum(object_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(object_nbytes(v) for v in obj)
    return 0


def disk_full_error(path: Path, needed: int, err: OSError) -> DiskFullError:
    """The message of a write that ran out of space: what it needs, what is free, what is kept."""
    try:
        free = _mb(shutil.disk_usage(path.parent).free)
    except OSError:
        free = "unknown"
    kept = (f"the previous {path.name} is kept unchanged" if path.exists()
            else f"nothing was written to {path.name}")
    return DiskFullError(f"cannot write {path}: no space left on the device; it needs about {_mb(needed)} and {free} "
                         f"is free in {path.parent}; {kept}. Free some space (or pass another --output_dir) and "
                         "continue with --auto_resume", err.errno)


@contextlib.contextmanager
def _temporary(path: Path, needed: Any):
    """Yields ``path.tmp``, renamed onto ``path`` on success and removed on any failure (a full disk:
    DiskFullError; ``needed()`` gives the bytes the message reports)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as err:  # also KeyboardInterrupt: never leave the temporary file behind
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.errno in _DISK_FULL and not isinstance(err, DiskFullError):
            raise disk_full_error(path, needed(), err) from None
        raise


def _fsync_dir(folder: Path) -> None:
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to ``path.tmp``, fsync, then rename: a crash never leaves a half-written ``path``.

    Raises:
        DiskFullError: no space left; ``path.tmp`` is removed and ``path`` is unchanged.
    """
    path = Path(path)
    with _temporary(path, lambda: object_nbytes(obj)) as tmp:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
    _fsync_dir(path.parent)


def link_atomic(src: str | Path, dst: str | Path) -> None:
    """Make ``dst`` hold the bytes of ``src`` without writing them twice: a hard link, or a copy where the file
    system has none (skipped when ``dst`` already holds the same bytes). ``dst`` is replaced atomically.

    Files written by :func:`save_atomic` are always replaced by a rename, never rewritten in place, so a
    later save of ``src`` leaves ``dst`` as it is.

    Raises:
        DiskFullError: no space for the copy; ``dst`` is unchanged.
    """
    src, dst = Path(src), Path(dst)
    if dst.exists() and (os.path.samefile(src, dst) or filecmp.cmp(src, dst, shallow=False)):
        return
    with _temporary(dst, lambda: src.stat().st_size) as tmp:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(src, tmp)
        except OSError as err:
            if err.errno in _DISK_FULL:
                raise
            shutil.copyfile(src, tmp)  # no hard links here (some network and FAT file systems)
    _fsync_dir(dst.parent)


def _read_error(path: Path, err: BaseException) -> CheckpointError:
    if isinstance(err, OSError) and err.strerror:
        return CheckpointError(f"checkpoint {path} cannot be read: {err.strerror}")
    reason = (str(err).strip().splitlines() or [type(err).__name__])[0].split(". ")[0][:160]
    if isinstance(err, pickle.UnpicklingError) and "weights_only" in str(err):
        return UnsafeCheckpointError(f"checkpoint {path} holds objects other than tensors and plain values; it is "
                                     "not loaded (arbitrary objects are never unpickled): save its state dicts "
                                     "(model, optimizer, ...) instead")
    return CheckpointError(f"checkpoint {path} cannot be read: it is truncated, damaged or not a PyTorch checkpoint "
                           f"(a copy that did not finish, a full disk?) ({type(err).__name__}: {reason})")


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (argparse.Namespace allow-listed for official files).

    Raises:
        FileNotFoundError: ``path`` is not a file.
        CheckpointError: the file cannot be read or holds no ``model`` entry (the message names the file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except (RuntimeError, EOFError, KeyError, ValueError, OSError, pickle.UnpicklingError, AttributeError,
            IndexError, TypeError) as err:
        raise _read_error(path, err) from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise CheckpointError(f"checkpoint {path} has no 'model' entry: it is not a training checkpoint of this "
                              "project or the official code (an eval.pth, or a bare state dict?)")
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


def find_resume_checkpoint(output_dir: str | Path,
                           skipped: list[str] | None = None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of output_dir that loads; corrupt ones are reported (and appended to ``skipped``)."""
    best: tuple[int, Path, dict[str, Any]] | None = None
    for path in checkpoint_candidates(output_dir):
        try:
            ckpt = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - any unreadable file is skipped the same way
            logger.warning("auto-resume: skipping unreadable checkpoint %s (%s)", path, e)
            if skipped is not None:
                skipped.append(str(e))
            continue
        epoch = int(ckpt.get("epoch", -1))
        if best is None or epoch > best[0]:
            best = (epoch, path, ckpt)
    return None if best is None else (best[1], best[2])


def check_fresh_output_dir(args: Any, why: str = "") -> None:
    """A run starting at epoch 0 must not mix its log.txt and checkpoints with an earlier run's.

    Raises:
        FlagError: --output_dir holds log.txt lines or checkpoints, and --overwrite is not given.
    """
    out = Path(args.output_dir) if args.output_dir else None
    if out is None or not out.is_dir():
        return
    log = out / "log.txt"
    lines = sum(1 for line in log.read_text().splitlines() if line.strip()) if log.is_file() else 0
    files = sorted(out.glob("checkpoint*.pth"))  # a leftover .tmp (a save that was killed) is no run
    if not lines and not files:
        return
    held = ", ".join(x for x in (f"log.txt with {lines} epoch(s)" if lines else "",
                                 f"{len(files)} checkpoint file(s)" if files else "") if x)
    if not getattr(args, "overwrite", False):
        resume = "" if args.auto_resume else "--auto_resume to continue it, "
        raise FlagError(f"{why}--output_dir {out} already holds a run ({held}); this run would start at epoch 0 "
                        f"and mix with it: pass {resume}--overwrite to start over (its log.txt and checkpoints are "
                        "deleted), or another --output_dir")
    if is_main_process():
        for path in [out / "log.txt", *files]:
            path.unlink(missing_ok=True)
        logger.warning("--overwrite: deleted the earlier run's %s in %s", held, out)


def find_start_checkpoint(args: Any) -> tuple[dict | None, str]:
    """The checkpoint this run starts from (--auto_resume, else --resume), read before anything is built.

    Returns:
        (checkpoint or None, its path).

    Raises:
        FlagError: --eval with nothing to evaluate; a run that would start at epoch 0 over an earlier run.
        FileNotFoundError, CheckpointError: --resume FILE missing or unreadable.
    """
    ckpt, source, why = None, "", ""
    if args.auto_resume and args.output_dir:
        out = Path(args.output_dir)
        candidates, skipped = checkpoint_candidates(out) if out.is_dir() else [], []
        found = find_resume_checkpoint(out, skipped) if candidates else None
        if found is not None:
            source, ckpt = str(found[0]), found[1]
        elif candidates:
            why = (f"--auto_resume: none of the {len(candidates)} checkpoint(s) in {out} can be read "
                   f"(e.g. {skipped[0]}); ")
            logger.warning("%s", why.rstrip("; "))
        else:
            why = f"--auto_resume: no checkpoint in {out}; "
            logger.info("%s", why.rstrip("; "))
    if ckpt is None and args.resume:
        source, ckpt = args.resume, load_checkpoint(args.resume)
    if ckpt is None and args.eval:
        raise FlagError(f"{why}--eval: nothing to evaluate (a model that was not trained): pass --resume FILE, a "
                        "checkpoint of this model")
    restores = (ckpt is not None and not args.eval and not getattr(args, "resume_weights_only", False)
                and all(k in ckpt for k in TRAINING_STATE))
    if not args.eval and not restores:
        check_fresh_output_dir(args, why)
    return ckpt, source


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


def load_fitting_weights(model: torch.nn.Module, state: dict[str, Any]) -> tuple[list[str], list[str], list[str]]:
    """Load the tensors of ``state`` that fit ``model`` (non-strict, through the model's load hooks).

    Returns:
        (missing keys, unexpected keys, keys with another shape, each as "key (checkpoint [..], model [..])");
        the thop counters ``total_params``/``total_ops`` are not reported.
    """
    own = model.state_dict()
    other = {k for k, v in state.items() if k in own and isinstance(v, torch.Tensor) and v.shape != own[k].shape}
    shapes = [f"{k} (checkpoint {list(state[k].shape)}, model {list(own[k].shape)})" for k in sorted(other)]
    try:
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in other}, strict=False)
    except RuntimeError as err:  # another shape under a name the model's load hooks changed
        shapes += re.findall(r"size mismatch for ([^:]+):", str(err))
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    missing = [k for k in missing if k not in other]
    unexpected = [k for k in unexpected if not k.endswith(("total_params", "total_ops"))]
    return missing, unexpected, shapes


def flag_differences(saved: dict[str, Any], current: dict[str, Any], names: list[str]) -> list[str]:
    """``--flag value (checkpoint: value)`` for each of ``names`` whose value differs from the checkpoint's args."""
    return [f"--{k} {current[k]!r} (checkpoint: {saved[k]!r})" for k in names
            if k in saved and k in current and saved[k] != current[k]]


def optimizer_mismatch(saved: dict[str, Any], optimizer: torch.optim.Optimizer) -> str | None:
    """Why a saved optimizer state cannot be loaded into ``optimizer`` (None when it can)."""
    theirs = [len(g.get("params", [])) for g in saved.get("param_groups", [])]
    ours = [len(g["params"]) for g in optimizer.param_groups]
    if theirs != ours:
        return f"its optimizer has parameter groups of {theirs} tensors, this run's {ours}"
    return None


def save_checkpoints(args: Any, epoch: int, model: torch.nn.Module, optimizer: Any, lr_scheduler: Any,
                     scaler: Any, addons: list, train_stats: dict, extra: dict[str, Any] | None = None) -> None:
    """checkpoint.pth every epoch; checkpoint{epoch:04}.pth before each lr drop, every --save_every, and last.

    ``extra``: more entries (``ema_model``, ``ema_updates``, ``instability``). The numbered file is a hard link to
    checkpoint.pth (written once; save_atomic later replaces checkpoint.pth by a rename, never in place). A full
    disk raises DiskFullError, the previous files kept.
    """
    rngs = all_gather_object(rng_state())  # every rank's RNG, for exact resume
    if not is_main_process() or not args.output_dir:
        return
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "lr_scheduler": lr_scheduler.state_dict(), "epoch": epoch, "args": vars(args), "rng": rngs,
             "train_stats": train_stats}
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    for addon in addons:
        state[f"addons/{addon.name}"] = addon.state_dict()
    state.update(extra or {})
    out = Path(args.output_dir)
    save_atomic(state, out / "checkpoint.pth")
    if (epoch + 1) % args.lr_drop == 0 or (epoch + 1) % args.save_every == 0 or epoch + 1 == args.epochs:
        link_atomic(out / "checkpoint.pth", out / f"checkpoint{epoch:04}.pth")


def read_log(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "log.txt"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def write_log(output_dir: str, entries: list[dict]) -> None:
    """Rewrite log.txt atomically (used when resume has to drop or add an epoch's line)."""
    path = Path(output_dir) / "log.txt"
    tmp = path.with_name("log.txt.tmp")
    tmp.write_text("".join(json.dumps(e) + "\n" for e in entries))
    os.replace(tmp, path)


def reconcile_log(args: Any, ckpt: dict, evaluate_fn: Any) -> None:
    """Make log.txt end at the resumed checkpoint's epoch.

    Lines of later epochs (a newer checkpoint was corrupt) are dropped; if the run died between writing
    the checkpoint and its log line, the line is rebuilt from the checkpoint's train stats and matching
    instability, and ``evaluate_fn()`` (the ``test_*``/``test_ema_*`` entries of an evaluation of the resumed
    weights; called on every rank: evaluation is collective).
    """
    if not args.output_dir:
        return
    epoch = ckpt["epoch"]
    kept, missing = [], False
    if is_main_process():
        entries = read_log(args.output_dir)
        kept = [e for e in entries if e.get("epoch", -1) <= epoch]
        missing = "train_stats" in ckpt and not (kept and kept[-1].get("epoch") == epoch)
        if len(kept) != len(entries):
            logger.warning("resume: dropping log.txt lines after epoch %d", epoch)
            write_log(args.output_dir, kept)
    if not all_gather_object(missing)[0]:
        return
    logger.warning("resume: log.txt has no line for epoch %d; evaluating the checkpoint to write it", epoch)
    test_stats = evaluate_fn()
    if is_main_process():
        entry = {**{f"train_{k}": v for k, v in ckpt["train_stats"].items()}, "epoch": epoch}
        entry.update(ckpt.get("instability", {}).get("stats", {}))
        entry.update(test_stats)
        write_log(args.output_dir, kept + [entry])
