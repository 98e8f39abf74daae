"""The README's "Writing an add-on" example runs as written, on every model."""
from __future__ import annotations

import re

import pytest
import torch

from models import build_model
from models.registry import ADDONS
from tests.conftest import ROOT, tiny_args
from util.misc import nested_tensor_from_tensor_list


@pytest.fixture(scope="module")
def example():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Writing an add-on"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # registers "center"
    yield namespace
    ADDONS._items.pop("center")


@pytest.mark.parametrize("host", [["--with_box_refine", "--two_stage"], [], ["-m", "dab_deformable_detr"],
                                  ["-m", "dino", "--no-use_dn"]], ids=["two_stage", "one_stage", "dab", "dino"])
def test_readme_addon_example(example, host, batch):
    images, targets = batch
    model, criterion, _ = build_model(tiny_args(*host, "--addons", "center", "--center_queries", "4"))
    assert criterion.weight_dict["loss_dist_center"] == pytest.approx(0.1)
    out = model.train()(nested_tensor_from_tensor_list(images), targets)
    assert out["groups"]["center"]["pred_boxes"].shape == (2, 4, 4)
    losses = criterion(out, targets)
    criterion.total_loss(losses).backward()
    assert torch.isfinite(losses["loss_dist_center"]) and losses["loss_dist_center"] > 0
