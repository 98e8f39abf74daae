"""DETR: official key list, every variant builds and trains every parameter, the hybrid branch's isolation,
refusals of add-ons it cannot host, the softmax loss/matcher/post-processing, and a CPU training run."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import main
import main as train_main  # noqa: F811  (the training entry point)
from flags import FlagError, finalize_args, get_args_parser
from models import build_model
from models.detr import SoftmaxPostProcess
from models.matcher import HungarianMatcher, focal_class_cost
from tests.conftest import ROOT, synthetic_flags, tiny_args
from util.misc import nested_tensor_from_tensor_list

KEYS = ROOT / "tests" / "data" / "official_keys" / "detr.txt"


def _randomize(model: torch.nn.Module, scale: float = 0.05) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)


def _official_state() -> dict[str, torch.Tensor]:
    state = {}
    for line in KEYS.read_text().splitlines():
        key, shape = line.split()
        state[key] = torch.zeros([int(x) for x in shape.strip("[]").split(",") if x])
    return state


@pytest.mark.slow
def test_official_state_dict_loads_strictly():
    model, _, _ = build_model(main.get_args_parser().parse_args(["-m", "detr"]))
    state = _official_state()
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    model.load_state_dict(state, strict=True)


VARIANTS = {
    "post_norm": [],
    "pre_norm": ["--pre_norm"],
    "learned_pos": ["--position_embedding", "learned"],
    "no_aux": ["--no_aux_loss"],
    "hybrid": ["--num_queries_one2many", "6"],
}


@pytest.mark.parametrize("extra", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_trainable_parameter_gets_a_gradient(extra, batch):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args("-m", "detr", "--dropout", "0", *extra))
    _randomize(model)  # at initialisation the zero attention biases make some gradients exactly zero
    images, targets = batch
    out = model.train()(nested_tensor_from_tensor_list(images), targets)
    assert out["pred_logits"].shape == (2, 8, 6)  # 5 classes + "no object"
    losses = criterion(out, targets)
    total = criterion.total_loss(losses)
    assert torch.isfinite(total)
    total.backward()
    # Layer 0's self-attention sees zero content (DETR's queries start at zero): every query carries the same value,
    # so its query/key projections get no gradient in DETR itself (float noise at most; post-norm: nor the value's).
    inert = "transformer.decoder.layers.0.self_attn.in_proj_weight"
    params = dict(model.named_parameters())
    assert params[inert].grad[: 2 * model.transformer.d_model].abs().max() < 1e-6
    # Pre-norm: that layer's norm1 normalises the zero content, so its scale never matters (only its bias).
    skip = {inert, "transformer.decoder.layers.0.norm1.weight" if "--pre_norm" in extra else inert}
    missing = [n for n, p in params.items()
               if p.requires_grad and n not in skip and (p.grad is None or not p.grad.any())]
    assert not missing
    if "--pre_norm" in extra:
        assert model.transformer.encoder.norm is not None
    if "--num_queries_one2many" in extra:
        assert model.query_embed.weight.shape[0] == 8 + 6
        assert out["groups"]["one2many"]["pred_logits"].shape == (2, 6, 6)
        assert "loss_ce_one2many" in losses and "loss_giou_4_one2many" not in losses  # 2 decoder layers: aux _0
    else:
        assert "groups" not in out


def test_dc5_dilates_the_last_stage():
    model, _, _ = build_model(tiny_args("-m", "detr", "--backbone", "resnet50", "--dilation"))
    assert model.backbone.strides == [16] and model.input_proj.in_channels == 2048


def test_hybrid_group_never_changes_the_main_queries(batch):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args("-m", "detr", "--dropout", "0", "--num_queries_one2many", "6"))
    images, targets = batch
    samples = nested_tensor_from_tensor_list(images)
    model.train()
    with torch.no_grad():
        with_group = model(samples, targets)
        alone = model(samples, providers=())
    assert "groups" in with_group and "groups" not in alone
    torch.testing.assert_close(with_group["pred_logits"], alone["pred_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(with_group["pred_boxes"], alone["pred_boxes"], rtol=1e-5, atol=1e-6)
    model.eval()
    with torch.no_grad():
        assert "groups" not in model(samples)  # evaluation: only the main queries


@pytest.mark.parametrize("name", ["detr", "yolos"])
@pytest.mark.parametrize("flags,needs", [(["--use_dn"], "anchor_groups"), (["--addons", "dn"], "anchor_groups"),
                                         (["--use_ms_detr"], "decoder_layer"),
                                         (["--addons", "ms_detr"], "decoder_layer")])
def test_addons_it_cannot_host_are_refused_with_the_reason(name, flags, needs):
    args = get_args_parser().parse_args(["-m", name, *flags])
    with pytest.raises(FlagError, match=f"cannot run on -m {name}.*{needs}"):
        build_model(args)


def test_yolos_refuses_the_hybrid_branch():
    with pytest.raises(FlagError, match="group_queries"):
        build_model(get_args_parser().parse_args(["-m", "yolos", "--num_queries_one2many", "10"]))


def test_detr_refuses_flags_it_cannot_honour():
    for flags, what in ((["--num_feature_levels", "4"], "single-scale"), (["--cls_loss", "focal"], "softmax"),
                        (["--with_box_refine"], "refinement")):
        with pytest.raises(FlagError, match=what):
            build_model(tiny_args("-m", "detr", *flags))


def test_softmax_loss_is_weighted_cross_entropy_and_focal_path_unchanged(batch):
    model, criterion, _ = build_model(tiny_args("-m", "detr"))
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 8, 6, generator=g)
    targets = torch.randint(0, 6, (2, 8), generator=g)
    weight = torch.tensor([1.0] * 5 + [0.1])
    expected = F.cross_entropy(logits.transpose(1, 2), targets, weight)
    torch.testing.assert_close(criterion.softmax_loss(logits, targets), expected)
    valid = torch.ones(2, 8, dtype=torch.bool)
    torch.testing.assert_close(criterion.softmax_loss(logits, targets, valid), expected)
    with pytest.raises(ValueError, match="no object"):
        criterion.softmax_loss(logits[..., :5], targets)
    matcher = HungarianMatcher(1, 5, 2, cls_loss="softmax")
    boxes = torch.rand(8, 4, generator=g) * 0.5 + 0.25
    tb = torch.tensor([[0.5, 0.5, 0.2, 0.2]])
    cost = matcher.cost_matrix(logits[0], boxes, torch.tensor([2]), tb)
    focal = HungarianMatcher(1, 5, 2).cost_matrix(logits[0], boxes, torch.tensor([2]), tb)
    # The box terms are shared; only the class term differs: -softmax prob of the target class.
    label = torch.tensor([2])
    torch.testing.assert_close(cost + logits[0].softmax(-1)[:, 2:3], focal - focal_class_cost(logits[0], label))


def test_softmax_post_process_drops_no_object():
    logits = torch.tensor([[[0.0, 5.0, 9.0], [3.0, 0.0, -1.0]]])  # query 0 is "no object" but keeps class 1
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.4], [0.25, 0.25, 0.5, 0.5]]])
    out = SoftmaxPostProcess()({"pred_logits": logits, "pred_boxes": boxes}, torch.tensor([[100, 200]]))[0]
    assert out["labels"].tolist() == [1, 0]
    torch.testing.assert_close(out["scores"], logits.softmax(-1)[0, [0, 1], [1, 0]])
    torch.testing.assert_close(out["boxes"][0], torch.tensor([80.0, 30.0, 120.0, 70.0]))


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--num_queries_one2many", "6"]], ids=["plain", "hybrid"])
def test_train_two_iterations_then_eval_resume(tmp_path, extra):
    flags = synthetic_flags(tmp_path, "out", "-m", "detr", "--epochs", "1", "--backbone_from_scratch", *extra)
    train_main.main(finalize_args(get_args_parser().parse_args(flags)))
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert torch.isfinite(torch.tensor(log[0]["train_loss"]))
    assert ("train_loss_ce_one2many" in log[0]) == bool(extra)
    flags = synthetic_flags(tmp_path, "out", "-m", "detr", "--backbone_from_scratch", "--eval", "--resume",
                            str(out / "checkpoint.pth"), *extra)
    stats = train_main.main(finalize_args(get_args_parser().parse_args(flags)))
    assert stats["test_coco_eval_bbox"] == pytest.approx(log[-1]["test_coco_eval_bbox"], abs=1e-9)
