"""The demo's prediction drawing produces a grid PNG of the validation images."""
import torch

import datasets
from flags import finalize_args, get_args_parser
from models import build_model
from tests.conftest import synthetic_flags
from tools.visualize import draw_predictions


def test_draw_predictions_grid(tmp_path):
    args = finalize_args(get_args_parser().parse_args(synthetic_flags(tmp_path, "out", "--num_classes", "6")))
    dataset = datasets.build_dataset("val", args)
    model, _, post = build_model(args)
    coco = datasets.get_coco_api_from_dataset(dataset)
    names = {c["id"]: c["name"] for c in coco.loadCats(coco.getCatIds())}
    grid = draw_predictions(model, post["bbox"], dataset, range(3), torch.device("cpu"), names, score_thresh=0.0,
                            cols=2)
    path = tmp_path / "predictions.png"
    grid.save(path)
    assert grid.size == (2 * 64 * 2, 2 * 64 * 2)  # 2 columns x 2 rows of 64 px images drawn at 2x
    assert path.stat().st_size > 0
    assert len(set(grid.getdata())) > 10  # not a blank image
