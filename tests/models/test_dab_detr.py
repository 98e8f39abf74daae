"""DAB-DETR and DN-DETR (``dn_dab_detr``): official key lists load strictly, the official computations are
reproduced (references made by running IDEA-Research/DAB-DETR @723ddb8 and IDEA-Research/DN-DETR @ff3902a on
CPU with tests/reference_weights.py's values), every trainable parameter learns with and without the add-ons,
and the options behave as in the originals."""
from __future__ import annotations

import json

import pytest
import torch

import main
from flags import finalize_args, get_args_parser
from models import build_model
from tests.conftest import TINY, tiny_args
from tests.models.test_conditional_detr import check_eval_reference, check_train_reference
from tests.models.test_official_compat import official_state
from util.errors import FlagError
from util.misc import nested_tensor_from_tensor_list


@pytest.mark.parametrize("name", ["dab_detr", "dn_dab_detr"])
def test_official_state_dict_loads_strictly(name):
    model, _, _ = build_model(main.get_args_parser().parse_args(["-m", name] + (["--use_dn"] * (name != "dab_detr"))))
    state = official_state("dab_detr")
    if name == "dn_dab_detr":  # DN-DETR's model adds its label table (num_classes + 1 rows, hidden - 1 wide)
        state["label_enc.weight"] = torch.zeros(92, 255)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    assert model.transformer.decoder.bbox_embed is model.bbox_embed  # the official alias


def test_dn_detr_checkpoint_loads_into_dab_detr_with_denoising():
    """With --use_dn dab_detr's add-on owns the label table; DN-DETR's top-level ``label_enc`` loads into it."""
    model, _, _ = build_model(main.get_args_parser().parse_args(["-m", "dab_detr", "--use_dn"]))
    state = {**official_state("dab_detr"), "label_enc.weight": torch.ones(92, 255)}
    model.load_state_dict(state, strict=True)
    assert torch.all(model.addons["dn"].label_enc.weight == 1)


@pytest.mark.slow
def test_reproduces_the_official_evaluation():
    check_eval_reference("dab_detr")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dab_detr_train", "dn_dab_detr_train"])
def test_reproduces_the_official_training_step(name):
    """DN-DETR's step includes its denoising draws (same calls on torch's global generator, same order)."""
    check_train_reference(name)


def test_repository_defaults():
    args = main.get_args_parser().parse_args(["-m", "dn_dab_detr"])
    assert (args.dropout, args.transformer_activation, args.cls_loss_coef, args.num_select) == (0.0, "prelu", 1.0, 300)
    assert (args.pe_temperatureH, args.pe_temperatureW, args.epochs, args.lr_drop, args.scalar) == (20, 20, 50, 40, 5)
    assert main.get_args_parser().parse_args(["-m", "dab_detr"]).epochs == 300
    model, _, post = build_model(args)
    assert post["bbox"].num_select == 300 and isinstance(model.transformer.decoder.layers[0].activation,
                                                         torch.nn.PReLU)


VARIANTS = {
    "dab": ["-m", "dab_detr"],
    "dab_dn": ["-m", "dab_detr", "--use_dn"],
    "dab_hybrid": ["-m", "dab_detr", "--num_queries_one2many", "6"],
    "dab_patterns_fixxy": ["-m", "dab_detr", "--num_patterns", "2", "--random_refpoints_xy", "--use_dn"],
    "dn": ["-m", "dn_dab_detr", "--use_dn"],
    "dn_hybrid": ["-m", "dn_dab_detr", "--use_dn", "--num_queries_one2many", "6"],
    "dn_without_dn": ["-m", "dn_dab_detr"],
}


@pytest.mark.parametrize("flags", VARIANTS.values(), ids=VARIANTS.keys())
def test_every_trainable_parameter_learns(flags, batch):
    model, criterion, _ = build_model(tiny_args(*flags))
    images, targets = batch
    out = model.train()(nested_tensor_from_tensor_list(images), targets)
    patterns = 2 if "--num_patterns" in flags else 1
    assert out["pred_logits"].shape == (2, 8 * patterns, 5) and len(out["aux_outputs"]) == 1
    assert set(out.get("groups", {})) == {n for f, n in (("--use_dn", "dn"), ("--num_queries_one2many", "one2many"))
                                          if f in flags}
    losses = criterion(out, targets)
    criterion.total_loss(losses).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.eval()
    with torch.no_grad():
        assert "groups" not in model(nested_tensor_from_tensor_list(images))


def test_denoising_never_changes_the_matching_queries(batch):
    """The matching queries cannot see the denoising ones: their outputs are those of a forward without them."""
    model, _, _ = build_model(tiny_args("-m", "dn_dab_detr", "--use_dn"))
    images, targets = batch
    samples = nested_tensor_from_tensor_list(images)
    model.train()
    with torch.no_grad():
        with_dn = model(samples, targets)
        without = model(samples, targets, providers=[])
    assert with_dn["groups"]["dn"]["pred_boxes"].shape[1] == 5 * 3  # 5 groups x 3 boxes (max per image)
    torch.testing.assert_close(with_dn["pred_logits"], without["pred_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(with_dn["pred_boxes"], without["pred_boxes"], rtol=1e-5, atol=1e-5)


def test_matching_content_is_dn_detrs_label_row_and_indicator(batch):
    model, _, _ = build_model(tiny_args("-m", "dn_dab_detr"))
    content = model.content(3)
    assert torch.equal(content[:, :-1], model.label_enc.weight[5].expand(3, -1)) and torch.all(content[:, -1] == 0)
    dab, _, _ = build_model(tiny_args("-m", "dab_detr"))
    assert not dab.content(3).any()


def test_predictions_keep_the_refinement_gradient(batch):
    """Layer l's box is relative to layer l-1's undetached refinement (spec §1.2 step 9): the last layer's box
    loss reaches the first layer's outputs through the shared box head's refinement."""
    model, _, _ = build_model(tiny_args("-m", "dab_detr", "--dec_layers", "2"))
    torch.nn.init.normal_(model.bbox_embed.layers[-1].weight, std=0.1)  # zero at initialisation (no gradient)
    images, _ = batch
    model.train()
    captured = []
    model.transformer.decoder.layers[0].register_forward_hook(lambda m, i, o: captured.append(o))
    out = model(nested_tensor_from_tensor_list(images))
    grad = torch.autograd.grad(out["pred_boxes"].sum(), captured[0], retain_graph=True)[0]
    assert grad.abs().sum() > 0


def test_random_refpoints_xy_are_uniform_centres():
    model, _, _ = build_model(tiny_args("-m", "dab_detr", "--random_refpoints_xy", "--num_queries", "400"))
    xy = model.refpoint_embed.weight[:, :2].sigmoid()
    assert 0.4 < xy.mean() < 0.6 and xy.min() < 0.05 and xy.max() > 0.95
    assert model.refpoint_embed.weight.requires_grad  # they keep training, as in the original (spec P2)


@pytest.mark.parametrize("flags, match", [
    (["-m", "dab_detr", "--use_ms_detr"], "auxiliary one-to-many FFN"),
    (["-m", "dn_dab_detr", "--num_feature_levels", "2"], "single-scale"),
    (["-m", "dab_detr", "--with_box_refine"], "always refined"),
    (["-m", "dab_detr", "--num_patterns", "2", "--num_queries_one2many", "4"], "no patterns"),
    (["-m", "dab_detr", "--no-dec_pred_bbox_embed_share"], "one box head"),
    (["-m", "dab_detr", "--cls_loss", "softmax"], "focal"),
])
def test_inapplicable_options_are_refused_with_the_reason(flags, match):
    with pytest.raises(FlagError, match=match):
        build_model(tiny_args(*flags))


def test_dc5_builds_a_stride_16_map():
    args = tiny_args("-m", "dab_detr", "--backbone", "resnet50", "--dilation")
    model, _, _ = build_model(args)
    assert model.backbone.strides == [16]


def train_then_eval_resume(tmp_path, *model_flags: str) -> None:
    """2 training iterations on the synthetic set, then ``--eval --resume`` reproduces the logged AP."""
    flags = [f for f in TINY if f not in ("--num_classes", "5")]
    flags += ["--dataset_file", "synthetic", "--coco_path", str(tmp_path / "data"), "--synthetic_train_size", "4",
              "--synthetic_val_size", "2", "--synthetic_image_size", "64", "--batch_size", "2", "--num_workers", "0",
              "--max_iters_per_epoch", "2", "--output_dir", str(tmp_path / "out"), "--print_freq", "1",
              "--backbone_from_scratch", *model_flags]
    main.main(finalize_args(get_args_parser().parse_args(flags + ["--epochs", "1"])))
    log = [json.loads(line) for line in (tmp_path / "out" / "log.txt").read_text().splitlines()]
    assert torch.isfinite(torch.tensor(log[-1]["train_loss"]))
    resumed = main.main(finalize_args(get_args_parser().parse_args(
        flags + ["--eval", "--resume", str(tmp_path / "out" / "checkpoint.pth")])))
    assert resumed["test_coco_eval_bbox"] == pytest.approx(log[-1]["test_coco_eval_bbox"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("flags", [["-m", "dab_detr", "--num_queries_one2many", "4"],
                                   ["-m", "dn_dab_detr", "--use_dn"]], ids=["dab_hybrid", "dn"])
def test_two_iterations_then_eval_resume(tmp_path, flags):
    train_then_eval_resume(tmp_path, *flags)


@pytest.mark.slow
def test_dab_deformable_detr_reproduces_the_official_evaluation():
    """IDEA-Research/DAB-DETR @723ddb8 ``-m dab_deformable_detr --transformer_activation relu`` (its README's
    command), the reference made here on 2026-12-05 (tests/data/reference/README.md)."""
    check_eval_reference("dab_deformable_detr")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["dab_deformable_detr_train", "dn_dab_deformable_detr_train"])
def test_deformable_variants_reproduce_the_official_training_step(name):
    """DAB-Deformable-DETR, and DN-DETR's DN-DAB-Deformable-DETR (``--use_dn``, IDEA-Research/DN-DETR @ff3902a) with
    its denoising draws."""
    check_train_reference(name)
