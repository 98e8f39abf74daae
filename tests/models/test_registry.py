"""Every registered model builds, honours the output contract and trains every parameter."""
import pytest
import torch

from engine import _query_providers
from models import MODELS, build_model
from models.addons import StepContext
from models.registry import Registry
from tests.conftest import tiny_args
from util.misc import nested_tensor_from_tensor_list

VARIANTS = {
    "plain": [],
    "single_scale": ["--num_feature_levels", "1"],
    "refine": ["--with_box_refine"],
    "two_stage": ["--two_stage"],
    "refine_two_stage": ["--with_box_refine", "--two_stage"],
    "plusplus": ["--with_box_refine", "--two_stage", "--mixed_selection", "--look_forward_twice", "--dropout", "0"],
    "dc5_learned_pos": ["--num_feature_levels", "1", "--dilation", "--position_embedding", "learned",
                        "--backbone", "resnet50"],
}
# Models with their own variant sets (default: VARIANTS); add-on variants train with the add-on's groups.
MODEL_VARIANTS = {
    "dab_deformable_detr": {"plain": [], "single_scale": ["--num_feature_levels", "1"],
                            "look_forward_twice": ["--look_forward_twice", "--random_refpoints_xy"],
                            "dn": ["--use_dn"], "cdn": ["--use_dn", "--contrastive"]},
    "dn_dab_deformable_detr": {"dn": ["--use_dn", "--transformer_activation", "relu"]},
    "dino": {"plain": [], "no_aux": ["--no_aux_loss"],
             "cdn": ["--use_dn", "--contrastive", "--dn_box_noise_scale", "1.0"], "dn": ["--use_dn"]},
    "conditional_detr": {"plain": [], "hybrid": ["--num_queries_one2many", "6"],
                         "dc5_learned_pos": ["--dilation", "--position_embedding", "learned",
                                             "--backbone", "resnet50"]},
    "dab_detr": {"plain": [], "dn": ["--use_dn"], "hybrid": ["--num_queries_one2many", "6"],
                 "fixxy_no_aux": ["--random_refpoints_xy", "--no_aux_loss"]},
    "dn_dab_detr": {"plain": [], "dn": ["--use_dn"]},
    "detr": {"plain": [], "pre_norm": ["--pre_norm"], "hybrid": ["--num_queries_one2many", "6"]},
    "yolos": {"plain": ["--init_pe_size", "64", "64"]},
}
# Official: DETR's queries start with zero content, so the first decoder layer's self-attention sees equal values
# everywhere (the query/key part of its input projection gets a float-noise zero gradient) and, with --pre_norm, its
# first LayerNorm normalises zeros (its weight gets an exactly zero gradient).
ZERO_GRAD_OK = {"detr": {"transformer.decoder.layers.0.self_attn.in_proj_weight",
                         "transformer.decoder.layers.0.norm1.weight"}}
VARIANTS_DEFORMABLE_DN = {"dn_refine_two_stage": ["--with_box_refine", "--two_stage", "--use_dn"],
                          "cdn_plusplus": VARIANTS["plusplus"] + ["--use_dn", "--contrastive"]}
# Official: the first decoder layer's queries start with zero content (Conditional-DETR, DAB-DETR without
# denoising), so that layer's content projections get an exactly zero gradient (they stay in the state dict).
ZERO_FIRST_CONTENT = {"conditional_detr", "dab_detr"}
ZERO_FIRST_CONTENT_PARAMS = {f"transformer.decoder.layers.0.sa_{p}_proj.weight" for p in ("qcontent", "kcontent", "v")}
CASES = [(name, variant, flags) for name in sorted(MODELS.names())
         for variant, flags in sorted(MODEL_VARIANTS.get(name, {**VARIANTS, **VARIANTS_DEFORMABLE_DN}).items())]


def _randomize(model):
    """Non-zero weights everywhere (zero-initialised heads would hide missing gradients)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_duplicate_name_raises():
    reg = Registry("thing")
    reg.register("a")(object)
    with pytest.raises(KeyError, match="already registered"):
        reg.register("a")(object)
    with pytest.raises(KeyError, match="unknown thing"):
        reg.get("b")


@pytest.mark.parametrize("name,variant,flags", CASES, ids=[f"{n}-{v}" for n, v, _ in CASES])
def test_builds_contract_and_gradients(name, variant, flags, batch):
    args = tiny_args("-m", name, *flags)
    model, criterion, post = build_model(args)
    _randomize(model)
    images, targets = batch
    model.train()
    providers = _query_providers(criterion.addons, StepContext(targets=targets))
    out = model(nested_tensor_from_tensor_list(images), providers=providers)
    b, q = 2, args.num_queries
    assert out["pred_logits"].shape == (b, q, args.num_classes + (args.cls_loss == "softmax"))
    assert out["pred_boxes"].shape == (b, q, 4)
    assert ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()
    assert len(out.get("aux_outputs", [])) == (args.dec_layers - 1 if args.aux_loss else 0)
    assert ("enc_outputs" in out) == model.two_stage  # dino is always two-stage
    losses = criterion(out, targets)
    criterion.total_loss(losses).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    if name in ZERO_FIRST_CONTENT and "--use_dn" not in flags:
        no_grad = [n for n in no_grad if n not in ZERO_FIRST_CONTENT_PARAMS]
    no_grad = [n for n in no_grad if n not in ZERO_GRAD_OK.get(name, ())]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    res = post["bbox"](out, torch.tensor([[64, 64], [48, 56]]))
    # softmax models (DETR, YOLOS): one detection per query; sigmoid models: the top-k over queries x classes
    expected = q if args.cls_loss == "softmax" else min(args.topk, q * args.num_classes)
    assert res[0]["boxes"].shape == (expected, 4)


def test_frozen_layers_follow_official():
    model, _, _ = build_model(tiny_args())
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("backbone.0.body.") for n in frozen)
    assert all(("layer1" in n or ".conv1." in n or n.endswith("body.conv1.weight")) for n in frozen)
    trainable_backbone = [n for n, p in model.named_parameters() if p.requires_grad and "backbone" in n]
    assert all(any(x in n for x in ("layer2", "layer3", "layer4")) for n in trainable_backbone)


def test_official_key_list_loads_strictly(tmp_path):
    from tests.conftest import ROOT
    keys_file = ROOT / "tests" / "data" / "official_keys" / "deformable_detr_two_stage_refine.txt"
    args = tiny_args("--with_box_refine", "--two_stage")
    for flag, value in [("backbone", "resnet50"), ("hidden_dim", 256), ("nheads", 8), ("enc_layers", 6),
                        ("dec_layers", 6), ("dim_feedforward", 1024), ("num_queries", 300), ("num_classes", 91)]:
        setattr(args, flag, value)
    model, _, _ = build_model(args)
    state = {}
    for line in keys_file.read_text().splitlines():
        name, shape = line.split()
        dims = [int(x) for x in shape.strip("[]").split(",")] if shape != "[]" else []
        state[name] = torch.zeros(dims)
    assert {k: list(v.shape) for k, v in model.state_dict().items()} == {k: list(v.shape) for k, v in state.items()}
    model.load_state_dict(state, strict=True)
    assert sum(p.numel() for p in model.parameters()) == 41_181_529
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 40_959_129
