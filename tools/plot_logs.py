"""Draw the loss and AP curves of one or several runs from their ``log.txt`` into one PNG.

    python tools/plot_logs.py exps/a exps/b --output curves.png

Four panels per epoch: train loss, test loss, AP and AP50 (``test_coco_eval_bbox[0]`` and ``[1]``); one
colour per run, named after its folder. A run with ``--use_ema`` also has its EMA model's test loss, AP and
AP50 (``test_ema_*``) as dashed lines, and a run with ``--log_instability`` a fifth panel: the matching
instability per epoch (``instability`` solid, ``instability_ema`` dashed). Needs only matplotlib (Agg backend,
no display).
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
INSTABILITY_PANEL = ("matching instability", "instability", None)
# A key's second curve, dashed: the EMA model's (--use_ema).
DASHED = {"test_loss": "test_ema_loss", "test_coco_eval_bbox": "test_ema_coco_eval_bbox",
          "instability": "instability_ema"}


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


def panels(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, int | None]]:
    """The panels to draw: ``PANELS``, plus the matching-instability panel when a run logged it."""
    logged = any("instability" in e or "instability_ema" in e for entries in runs.values() for e in entries)
    return [*PANELS, INSTABILITY_PANEL] if logged else list(PANELS)


def plot_runs(runs: dict[str, list[dict[str, Any]]], output: str | Path) -> Path:
    """Draw every run into a grid of panels (2x2, 2x3 with instability) and save it as a PNG; returns the file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = panels(runs)
    fig, axes = plt.subplots(2, (len(chosen) + 1) // 2, figsize=(5.5 * ((len(chosen) + 1) // 2), 7),
                             constrained_layout=True, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (title, key, index) in zip(axes.flat, chosen):
        for i, (name, entries) in enumerate(runs.items()):
            for curve, style, label in ((key, "-", name), (DASHED.get(key), "--", f"{name} (EMA)")):
                epochs, values = series(entries, curve, index) if curve else ([], [])
                if epochs:
                    ax.plot(epochs, values, style, marker="o" if len(epochs) < 30 else None, markersize=3,
                            color=colours[i % len(colours)], label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
    for ax in axes.flat[len(chosen):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize="small")
    if len(chosen) > len(PANELS):  # the EMA's curves are only in the test panels: show both names there
        axes.flat[len(PANELS)].legend(fontsize="small")
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
