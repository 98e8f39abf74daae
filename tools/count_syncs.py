"""Host-device synchronisations per training step, per configuration (util/sync_counter.py; runs on CPU).

    python tools/count_syncs.py                                  # the default table of configurations
    python tools/count_syncs.py --flags "--with_box_refine --two_stage --use_dn" --sites

A step is what ``engine.train_one_epoch`` does for one batch (forward with the add-ons' groups, losses,
logging, backward, clipping, optimizer step, add-on hooks); the count per step is (syncs of 4 steps - syncs of
2 steps) / 2, so once-per-epoch work (the final meter synchronisation) and the first and last steps (they
print a progress line, which reads the grad norm at once) are not in it: a run pays this count per step plus
one per printed line. The code paths are a GPU's where they differ (tools/gpu_paths.py). Model size and batch are
those of tools/addon_step_time.py (the synthetic benchmark's model, batch 8 of 128 px, 1-6 objects per image).
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine import train_one_epoch  # noqa: E402
from tools.addon_step_time import batch, make  # noqa: E402
from tools.gpu_paths import gpu_paths  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402
from util.sync_counter import SyncCounter  # noqa: E402

CONFIGS = {
    "deformable_detr": "",
    "two_stage_refine": "--with_box_refine --two_stage",
    "two_stage_refine_dn": "--with_box_refine --two_stage --use_dn",
    "two_stage_refine_hybrid": "--with_box_refine --two_stage --num_queries_one2many 60 --k_one2many 6",
    "two_stage_refine_ms_detr": "--with_box_refine --two_stage --use_ms_detr --use_aux_ffn",
    "dab_deformable_detr": "-m dab_deformable_detr",
    "dino_cdn": "-m dino --use_dn --contrastive --dn_number 20",
    "two_stage_refine_teach": "--with_box_refine --two_stage --ensemble --ext_ann_files t=unused.json",
    "two_stage_refine_od": "--with_box_refine --two_stage --use_ema --addons od",
    "two_stage_refine_co_detr": "--with_box_refine --two_stage --addons co_detr",
}


def count(flags: str, steps: int, batch_size: int, image_size: int, built: tuple | None = None) -> SyncCounter:
    """Syncs of ``steps`` engine steps of the model built from ``flags`` (same batch every step);
    ``built``: what ``make`` returns (model, criterion, optimizer, EMA or None, clip norm), to use instead of
    building them."""
    images, targets = batch(batch_size, image_size, 6)
    samples = nested_tensor_from_tensor_list(images)
    model, criterion, optimizer, ema, _ = built or make(flags)
    addons = list(getattr(model, "train_addons", ()))
    loader = [(samples, targets)] * steps
    with gpu_paths(), SyncCounter() as syncs:
        train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, 0.1, addons=addons,
                        print_freq=10**9, ema=ema)
    return syncs


def per_step(flags: str, batch_size: int = 8, image_size: int = 128, rebuild: bool = True
             ) -> tuple[float, SyncCounter]:
    """(syncs per step, the counter of the 4-step run); ``rebuild=False`` runs both on one model (faster)."""
    built = None if rebuild else make(flags)
    two = count(flags, 2, batch_size, image_size, built)
    four = count(flags, 4, batch_size, image_size, built)
    return (four.total - two.total) / 2, four


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flags", default=None, help="one configuration (default: the table of CONFIGS)")
    p.add_argument("--sites", action="store_true", help="list where the syncs of 4 steps happen")
    p.add_argument("--batch_size", default=8, type=int)
    p.add_argument("--image_size", default=128, type=int)
    args = p.parse_args()
    logging.disable(logging.INFO)
    configs = {"flags": args.flags} if args.flags is not None else CONFIGS
    print("| configuration | flags | syncs per step |\n|---|---|---|")
    for name, flags in configs.items():
        n, four = per_step(flags, args.batch_size, args.image_size)
        print(f"| {name} | `{flags}` | {n:g} |", flush=True)
        if args.sites:
            for site, c in four.by_site():
                print(f"    {c:4d}  {site}")
            for site, c in four.host_meets_device.most_common():
                print(f"    {c:4d}  {site}  (not counted: a host tensor meets a device tensor: an upload or an error "
                      f"on a GPU)")


if __name__ == "__main__":
    main()
