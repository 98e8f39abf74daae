"""YOLOS: detection tokens through a DeiT, interpolated (and mid) position embeddings, DETR's criterion,
official parameter names, local DeiT weights adapted as the official code does, and a CPU training run."""
from __future__ import annotations

import json

import pytest
import torch

import main as train_main
from flags import finalize_args, get_args_parser
from models import build_model
from models.yolos import resize_patch_pos
from tests.conftest import synthetic_flags, tiny_args
from util.misc import nested_tensor_from_tensor_list

TINY_YOLOS = ["-m", "yolos", "--backbone_name", "tiny", "--init_pe_size", "64", "96", "--mid_pe_size", "64", "64"]


def test_defaults_and_official_names():
    args = get_args_parser().parse_args(["-m", "yolos", "--backbone_name", "small", "--init_pe_size", "512", "864",
                                         "--mid_pe_size", "512", "864"])
    assert (args.lr, args.epochs, args.lr_drop, args.num_queries, args.cls_loss, args.eos_coef) == \
        (1e-4, 150, 100, 100, "softmax", 0.1)
    assert (args.set_cost_class, args.cls_loss_coef, args.drop_path_rate, args.aux_loss) == (1, 1, 0, False)
    model, criterion, _ = build_model(args)
    state = model.state_dict()
    assert state["backbone.pos_embed"].shape == (1, 1 + 32 * 54 + 100, 384)
    assert state["backbone.mid_pos_embed"].shape == (11, 1, 1 + 32 * 54 + 100, 384)
    assert state["backbone.det_token"].shape == (1, 100, 384)
    assert state["class_embed.layers.2.weight"].shape == (92, 384)
    assert {"backbone.blocks.11.attn.qkv.weight", "backbone.patch_embed.proj.weight", "backbone.norm.bias",
            "bbox_embed.layers.2.bias"} <= set(state)
    assert criterion.weight_dict == {"loss_ce": 1, "loss_bbox": 5, "loss_giou": 2, "loss_ce_enc": 1,
                                     "loss_bbox_enc": 5, "loss_giou_enc": 2}


def test_trains_every_parameter_at_any_input_size(batch):
    torch.manual_seed(0)
    model, criterion, post = build_model(tiny_args(*TINY_YOLOS, "--num_queries", "8"))
    images, targets = batch  # 64x64 and 48x56: padded to 64x64, positions resized from 4x6 / 4x4 patches
    out = model.train()(nested_tensor_from_tensor_list(images), targets)
    assert out["pred_logits"].shape == (2, 8, 6) and "aux_outputs" not in out
    losses = criterion(out, targets)
    criterion.total_loss(losses).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing
    results = post["bbox"](out, torch.tensor([[64, 64], [48, 56]]))
    assert results[0]["scores"].shape == (8,)


def test_no_weight_decay_group_is_the_official_one():
    args = tiny_args(*TINY_YOLOS, "--num_queries", "8")
    model, _, _ = build_model(args)
    groups = train_main.param_groups(model, args)
    assert len(groups) == 4 and groups[3]["weight_decay"] == 0.0 and groups[3]["lr"] == args.lr
    names = model.no_weight_decay_names()
    assert {"backbone.pos_embed", "backbone.cls_token", "backbone.det_token", "backbone.blocks.0.norm1.weight",
            "backbone.blocks.0.attn.qkv.bias"} <= names
    assert "backbone.mid_pos_embed" not in names and "backbone.blocks.0.attn.qkv.weight" not in names
    assert not any(n.startswith(("class_embed", "bbox_embed")) for n in names)  # the heads decay (official)
    total = sum(len(g["params"]) for g in groups)
    assert total == len([p for p in model.parameters() if p.requires_grad])


def test_resize_patch_pos_is_identity_on_the_same_grid_and_bicubic_otherwise():
    pos = torch.randn(1, 6, 8)
    assert resize_patch_pos(pos, (2, 3), (2, 3)) is pos
    up = resize_patch_pos(pos, (2, 3), (4, 6))
    assert up.shape == (1, 24, 8)
    grid = pos.reshape(1, 2, 3, 8).permute(0, 3, 1, 2)
    ref = torch.nn.functional.interpolate(grid, size=(4, 6), mode="bicubic", align_corners=False)
    torch.testing.assert_close(up, ref.permute(0, 2, 3, 1).reshape(1, 24, 8))


def test_local_deit_weights_are_adapted(tmp_path):
    timm = pytest.importorskip("timm")
    deit = timm.create_model("deit_tiny_patch16_224", pretrained=False)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": deit.state_dict()}, path)
    model, _, _ = build_model(tiny_args(*TINY_YOLOS, "--num_queries", "8", "--pretrained_backbone_path", str(path)))
    vit = model.backbone
    torch.testing.assert_close(vit.blocks[3].mlp.fc1.weight, deit.blocks[3].mlp.fc1.weight)
    torch.testing.assert_close(vit.pos_embed[:, :1], deit.pos_embed[:, :1])  # [CLS] kept, patches resized
    expected = resize_patch_pos(deit.pos_embed[:, 1:].detach(), (14, 14), (4, 6))
    torch.testing.assert_close(vit.pos_embed[:, 1:25], expected)


@pytest.mark.slow
def test_train_two_iterations_then_eval_resume(tmp_path):
    flags = synthetic_flags(tmp_path, "out", *TINY_YOLOS, "--epochs", "1")
    train_main.main(finalize_args(get_args_parser().parse_args(flags)))
    out = tmp_path / "out"
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert torch.isfinite(torch.tensor(log[0]["train_loss"]))
    flags = synthetic_flags(tmp_path, "out", *TINY_YOLOS, "--eval", "--resume", str(out / "checkpoint.pth"))
    stats = train_main.main(finalize_args(get_args_parser().parse_args(flags)))
    assert stats["test_coco_eval_bbox"] == pytest.approx(log[-1]["test_coco_eval_bbox"], abs=1e-9)
