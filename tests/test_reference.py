"""The official Deformable-DETR reference (shared/reference/deformable_plain.pt) is reproduced."""
import sys

import pytest
import torch

from models import build_model
from tests.conftest import ROOT
from util.args import finalize_args, get_args_parser
from util.misc import nested_tensor_from_tensor_list

REF_DIR = ROOT.parent / "shared" / "reference"
pytestmark = pytest.mark.skipif(not (REF_DIR / "deformable_plain.pt").is_file(), reason="shared/reference missing")


@pytest.fixture(scope="module")
def reproduced():
    sys.path.insert(0, str(REF_DIR))
    from fill import filled_from_spec

    ref = torch.load(REF_DIR / "deformable_plain.pt", weights_only=True)
    args = finalize_args(get_args_parser().parse_args(list(ref["flags"]) + ["--device", "cpu"]))
    args.num_classes = 91  # --dataset_file coco without data
    model, criterion, post = build_model(args)
    model.load_state_dict(filled_from_spec(ref["spec"]), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(nested_tensor_from_tensor_list(ref["images"]))
        losses = criterion(out, ref["targets"])
        results = post["bbox"](out, ref["target_sizes"])
    return ref, criterion, out, losses, results


def test_outputs_match(reproduced):
    ref, _, out, _, _ = reproduced
    expected = ref["outputs"]
    torch.testing.assert_close(out["pred_logits"], expected["pred_logits"], rtol=1e-5, atol=2e-5)
    torch.testing.assert_close(out["pred_boxes"], expected["pred_boxes"], rtol=1e-5, atol=1e-5)
    assert len(out["aux_outputs"]) == len(expected["aux_outputs"]) == 5
    for ours, theirs in zip(out["aux_outputs"], expected["aux_outputs"]):
        torch.testing.assert_close(ours["pred_logits"], theirs["pred_logits"], rtol=1e-5, atol=2e-5)
        torch.testing.assert_close(ours["pred_boxes"], theirs["pred_boxes"], rtol=1e-5, atol=1e-5)


def test_every_loss_entry_and_weight_dict_match(reproduced):
    ref, criterion, _, losses, _ = reproduced
    assert set(losses) == set(ref["losses"])
    for key, value in ref["losses"].items():
        assert losses[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert criterion.weight_dict == ref["weight_dict"]


def test_postprocessed_results_match(reproduced):
    ref, _, _, _, results = reproduced
    for ours, theirs in zip(results, ref["results"]):
        torch.testing.assert_close(ours["scores"], theirs["scores"], rtol=1e-5, atol=1e-5)
        assert torch.equal(ours["labels"], theirs["labels"])
        torch.testing.assert_close(ours["boxes"], theirs["boxes"], rtol=1e-5, atol=1e-3)
