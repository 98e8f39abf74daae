"""`make demo`: generate the synthetic set, train a small Deformable-DETR on CPU, evaluate, draw predictions.

Any main.py flag given on the command line overrides the demo's defaults.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import datasets  # noqa: E402
import main as train_main  # noqa: E402
from flags import finalize_args, get_args_parser  # noqa: E402
from models import build_model  # noqa: E402
from tools.visualize import draw_predictions  # noqa: E402
from util.checkpoint import load_checkpoint  # noqa: E402

# A small Deformable-DETR++ (two-stage, box refinement, dropout 0, mixed query selection, look forward
# twice), trained from scratch on 128 px shapes.
DEMO_FLAGS = [
    "--dataset_file", "synthetic", "--synthetic_image_size", "128",
    "--synthetic_train_size", "2000", "--synthetic_val_size", "200",
    "--backbone", "resnet18", "--backbone_from_scratch",
    "--hidden_dim", "64", "--nheads", "8", "--enc_layers", "2", "--dec_layers", "3", "--dim_feedforward", "256",
    "--num_queries", "30", "--with_box_refine", "--two_stage",
    "--dropout", "0.0", "--mixed_selection", "--look_forward_twice",
    "--lr", "4e-4", "--lr_backbone", "4e-4", "--batch_size", "8", "--epochs", "6", "--lr_drop", "5",
    "--eval_every", "6",
    "--device", "cpu", "--num_workers", "1", "--print_freq", "50", "--output_dir", "outputs/demo",
    "--overwrite",  # a new demo replaces the previous one
]


def main() -> None:
    start = time.time()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    args = finalize_args(get_args_parser().parse_args(DEMO_FLAGS + sys.argv[1:]))
    stats = train_main.main(args)
    ap = stats.get("test_coco_eval_bbox", [float("nan")] * 3)

    # Draw predictions of the final model on validation images.
    ckpt = load_checkpoint(Path(args.output_dir) / "checkpoint.pth")
    model, _, post = build_model(args)
    model.load_state_dict(ckpt["model"])
    dataset = datasets.build_dataset("val", args)
    coco = datasets.get_coco_api_from_dataset(dataset)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    png = Path(args.output_dir) / "predictions.png"
    draw_predictions(model, post["bbox"], dataset, range(12), torch.device("cpu"), names).save(png)
    minutes = (time.time() - start) / 60
    print(f"\ndemo finished in {minutes:.1f} min: COCO AP {ap[0]:.3f}, AP50 {ap[1]:.3f}, AP75 {ap[2]:.3f} "
          f"on {len(dataset)} synthetic validation images")
    print(f"predictions drawn into {png}")


if __name__ == "__main__":
    main()
