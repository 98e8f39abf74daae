"""Draw predictions (and ground truth) of a detector on validation images into one PNG grid.

    python tools/visualize.py --resume exps/demo/checkpoint.pth --dataset_file synthetic --out preds.png
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from util.box_ops import box_cxcywh_to_xyxy  # noqa: E402
from util.misc import nested_tensor_from_tensor_list  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
           (240, 50, 230), (210, 245, 60), (250, 190, 190), (0, 128, 128)]


def _to_pil(img: torch.Tensor) -> Image.Image:
    arr = ((img.cpu() * STD + MEAN).clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr)


@torch.no_grad()
def draw_predictions(model: torch.nn.Module, postprocess: torch.nn.Module, dataset: Any, indices: Sequence[int],
                     device: torch.device, names: dict[int, str], score_thresh: float = 0.3, scale: int = 2,
                     cols: int = 4) -> Image.Image:
    """Grid of images: ground truth in thin white, predictions above ``score_thresh`` in class colours."""
    model.eval()
    tiles = []
    for i in indices:
        img, target = dataset[i]
        out = model(nested_tensor_from_tensor_list([img.to(device)]))
        h, w = (int(x) for x in target["size"])
        det = postprocess(out, torch.tensor([[h, w]], device=device))[0]
        tile = _to_pil(img).resize((w * scale, h * scale), Image.NEAREST)
        draw = ImageDraw.Draw(tile)
        gt = box_cxcywh_to_xyxy(target["boxes"]) * torch.tensor([w, h, w, h]) * scale
        for box in gt.tolist():
            draw.rectangle(box, outline=(255, 255, 255), width=1)
        keep = det["scores"] > score_thresh
        for box, label, score in zip((det["boxes"][keep] * scale).tolist(), det["labels"][keep].tolist(),
                                     det["scores"][keep].tolist()):
            colour = PALETTE[label % len(PALETTE)]
            draw.rectangle(box, outline=colour, width=2)
            draw.text((box[0] + 2, box[1] + 1), f"{names.get(label, label)} {score:.2f}", fill=colour)
        tiles.append(tile)
    tw = max(t.width for t in tiles)
    th = max(t.height for t in tiles)
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (cols * tw, rows * th), (0, 0, 0))
    for k, tile in enumerate(tiles):
        grid.paste(tile, ((k % cols) * tw, (k // cols) * th))
    return grid


def main() -> None:
    import datasets
    from flags import finalize_args, get_args_parser
    from models import build_model
    from util.checkpoint import load_checkpoint

    parser = get_args_parser()
    parser.add_argument("--out", default="predictions.png")
    parser.add_argument("--num_images", default=8, type=int)
    parser.add_argument("--score_thresh", default=0.3, type=float)
    args = finalize_args(parser.parse_args())
    if not args.resume:
        parser.error("--resume <checkpoint> is required")
    device = torch.device(args.device if torch.cuda.is_available() or args.device == "cpu" else "cpu")
    dataset = datasets.build_dataset("val", args)
    if args.num_classes is None:
        args.num_classes = datasets.num_classes_for(args)
    model, _, post = build_model(args)
    model.load_state_dict(load_checkpoint(args.resume)["model"], strict=False)
    model.to(device)
    coco = datasets.get_coco_api_from_dataset(dataset)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    grid = draw_predictions(model, post["bbox"], dataset, range(min(args.num_images, len(dataset))), device, names,
                            args.score_thresh)
    grid.save(args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
