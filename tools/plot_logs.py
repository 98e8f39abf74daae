"""Draw the loss and AP curves of one or several runs from their ``log.txt`` into one PNG.

    python tools/plot_logs.py exps/a exps/b --output curves.png

Four panels per epoch: train loss, test loss, AP and AP50 (``test_coco_eval_bbox[0]`` and ``[1]``); one
colour per run, named after its folder. Needs only matplotlib (Agg backend, no display).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

logger = logging.getLogger("detr.plot_logs")

# (panel title, log.txt key, index into a list value or None)
PANELS = (("train loss", "train_loss", None), ("test loss", "test_loss", None),
          ("AP", "test_coco_eval_bbox", 0), ("AP50", "test_coco_eval_bbox", 1))


def read_log(run: str | Path) -> list[dict[str, Any]]:
    """The per-epoch entries of ``run/log.txt`` (``run`` may also be the file); an unreadable line (a run killed
    while writing it) is skipped with a warning."""
    path = Path(run)
    path = path if path.is_file() else path / "log.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a run's --output_dir (the folder holding log.txt)")
    entries = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s:%d is not JSON (an interrupted write?); skipped", path, n)
    return entries


def run_names(runs: Sequence[str | Path]) -> list[str]:
    """Each run's folder name; ``parent/name`` where two runs share a folder name."""
    dirs = [Path(r).resolve() if Path(r).is_dir() else Path(r).resolve().parent for r in runs]
    names = [d.name for d in dirs]
    return [f"{d.parent.name}/{d.name}" if names.count(d.name) > 1 else d.name for d in dirs]


def series(entries: Sequence[dict[str, Any]], key: str, index: int | None) -> tuple[list[int], list[float]]:
    """(epochs, values) of the entries that have ``key`` (a test key is absent between --eval_every epochs)."""
    epochs, values = [], []
    for e in entries:
        value = e.get(key)
        if value is None or "epoch" not in e:
            continue
        if index is not None:
            if not isinstance(value, list) or len(value) <= index:
                continue
            value = value[index]
        epochs.append(int(e["epoch"]))
        values.append(float(value))
    return epochs, values


def plot_runs(runs: dict[str, list[dict[str, Any]]], output: str | Path) -> Path:
    """Draw every run into a 2x2 grid of panels and save it as a PNG; returns the file written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, key, index) in zip(axes.flat, PANELS):
        for i, (name, entries) in enumerate(runs.items()):
            epochs, values = series(entries, key, index)
            if epochs:
                ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None, markersize=3,
                        color=colours[i % len(colours)], label=name)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize="small")
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=100)
    plt.close(fig)
    return output


def main(argv: Sequence[str] | None = None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="run folders (each a --output_dir holding log.txt)")
    p.add_argument("--output", default="curves.png", help="PNG file to write")
    args = p.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        p.error("plotting needs matplotlib: pip install matplotlib")
    runs = dict(zip(run_names(args.runs), (read_log(r) for r in args.runs)))
    for name, entries in runs.items():
        if not entries:
            logger.warning("run %s has no epoch in its log.txt yet", name)
    out = plot_runs(runs, args.output)
    logger.info("wrote %s", out)
    return out


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    main()
