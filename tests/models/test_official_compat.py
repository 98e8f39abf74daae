"""Official by default: bare flags build every model, official state dicts load strictly, the official
calling convention, every --num_feature_levels, and the opt-in fix of the two-stage top-k."""
from __future__ import annotations

import pytest
import torch

import engine
import main
from models import MODELS, build_model
from tests.conftest import ROOT, tiny_args
from util.misc import nested_tensor_from_tensor_list

KEYS = ROOT / "tests" / "data" / "official_keys"
# The official command line of each key list (the model's defaults do the rest).
OFFICIAL = {
    "dino": ["-m", "dino"],  # DINO-4scale: 900 queries, FFN 2048, contrastive denoising, label_enc [92, 256]
    "dn_dab_deformable_detr": ["-m", "dn_dab_deformable_detr", "--use_dn"],  # DN-DETR's README command
    "dab_deformable_detr": ["-m", "dab_deformable_detr"],
}


def official_state(name: str) -> dict[str, torch.Tensor]:
    state = {}
    for line in (KEYS / f"{name}.txt").read_text().splitlines():
        key, shape = line.split()
        state[key] = torch.zeros([int(x) for x in shape.strip("[]").split(",") if x])
    return state


@pytest.mark.parametrize("name", sorted(MODELS.names()))
def test_build_model_on_bare_parsed_flags(name):
    args = main.get_args_parser().parse_args(["-m", name])
    assert args.num_classes is None
    model, criterion, post = build_model(args)
    # COCO's official 91 logits; YOLOS is a plain ViT (DeiT-Ti: 192 wide) without a separate transformer
    width = model.backbone.embed_dim if name == "yolos" else model.transformer.d_model
    assert width == (192 if name == "yolos" else 256) and criterion.num_classes == 91
    synthetic = main.get_args_parser().parse_args(["-m", name, "--dataset_file", "synthetic", "--hidden_dim", "32",
                                                   "--nheads", "4", "--backbone", "resnet18"])
    assert build_model(synthetic)[1].num_classes == 6


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_state_dict_loads_strictly(name):
    torch.manual_seed(0)
    model, _, _ = build_model(main.get_args_parser().parse_args(OFFICIAL[name]))
    state = official_state(name)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def test_label_table_loads_from_either_layout():
    """Checkpoints of this project's earlier layout (the table under the add-on) load into DINO and back."""
    dino, _, _ = build_model(tiny_args("-m", "dino"))
    state = {k: v.clone() for k, v in dino.state_dict().items()}
    assert "label_enc.weight" in state
    old = {("addons.dn.label_enc.weight" if k == "label_enc.weight" else k): v + 1 for k, v in state.items()}
    dino.load_state_dict(old, strict=True)
    assert torch.equal(dino.label_enc.weight, state["label_enc.weight"] + 1)
    dab, _, _ = build_model(tiny_args("-m", "dab_deformable_detr", "--use_dn"))  # the add-on owns the table here
    state = dab.state_dict()
    official = {("label_enc.weight" if k == "addons.dn.label_enc.weight" else k): v for k, v in state.items()}
    assert "label_enc.weight" in official
    dab.load_state_dict(official, strict=True)


HOSTS = {"deformable_detr": ["--with_box_refine", "--two_stage"], "dab_deformable_detr": ["-m", "dab_deformable_detr"],
         "dino": ["-m", "dino"]}


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("host", HOSTS.values(), ids=HOSTS.keys())
def test_every_num_feature_levels_trains(host, levels, batch):
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*host, "--num_feature_levels", str(levels)))
    images, targets = batch
    out = model.train()(nested_tensor_from_tensor_list(images), targets)
    losses = criterion(out, targets)
    criterion.total_loss(losses).backward()
    assert torch.isfinite(criterion.total_loss(losses))
    assert model.transformer.level_embed.shape[0] == levels
    backbone = {1: 1, 2: 2, 3: 3, 4: 3, 5: 4 if host == HOSTS["dino"] else 3}[levels]  # the last ones (C5 back)
    assert len(model.backbone.num_channels) == backbone


@pytest.mark.parametrize("levels", ["0", "6"])
def test_unsupported_num_feature_levels_is_refused(levels):
    with pytest.raises(ValueError, match="num_feature_levels"):
        build_model(tiny_args("--num_feature_levels", levels))


def _losses_of_engine_step(model, criterion, images, targets):
    """The loss dict the engine computes in one training step (captured; lr 0 leaves the weights)."""
    seen = {}
    original = criterion.forward

    def spy(outputs, tgts, ctx=None):
        seen["losses"] = original(outputs, tgts, ctx)
        return seen["losses"]

    criterion.forward = spy
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    loader = [(nested_tensor_from_tensor_list(images), targets)]
    engine.train_one_epoch(model, criterion, loader, optimizer, torch.device("cpu"), 0, 0.1,
                           addons=criterion.addons, print_freq=100)
    criterion.forward = original
    return seen["losses"]


ADDON_HOSTS = {
    "deformable_hybrid_ms_detr_dn": ["--with_box_refine", "--two_stage", "--num_queries_one2many", "6",
                                     "--use_ms_detr", "--use_aux_ffn", "--use_dn"],
    "dino_cdn_hybrid": ["-m", "dino", "--num_queries_one2many", "6"],
    "dn_dab_deformable_detr": ["-m", "dn_dab_deformable_detr", "--use_dn"],
}


@pytest.mark.parametrize("flags", ADDON_HOSTS.values(), ids=ADDON_HOSTS.keys())
def test_official_calling_convention_equals_the_engine_step(flags, batch):
    """model(samples, targets) in training mode returns every add-on's groups; criterion gives their losses."""
    images, targets = batch
    torch.manual_seed(0)
    model, criterion, _ = build_model(tiny_args(*flags, "--dropout", "0"))
    model.train()
    torch.manual_seed(1)
    ours = criterion(model(nested_tensor_from_tensor_list(images), targets), targets)
    torch.manual_seed(1)
    theirs = _losses_of_engine_step(model, criterion, images, targets)
    assert set(ours) == set(theirs)
    suffixes = {k.rsplit("_", 1)[-1] for k in ours if k.startswith("loss_")}
    assert {a.name if a.name != "hybrid" else "one2many" for a in criterion.addons} - {"ms_detr"} <= suffixes
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_groups_in_training_mode_only(batch):
    images, targets = batch
    model, criterion, _ = build_model(tiny_args("-m", "dino", "--num_queries_one2many", "6"))
    samples = nested_tensor_from_tensor_list(images)
    out = model.train()(samples)  # H-DETR: model(samples) returns the one-to-many group; no targets: no denoising
    assert set(out["groups"]) == {"one2many"}
    assert set(model(samples, targets)["groups"]) == {"dn", "one2many"}
    with torch.no_grad():
        assert "groups" not in model.eval()(samples, targets)


def _selected_references(model, images):
    seen = {}
    hook = model.transformer.decoder.register_forward_pre_hook(lambda m, a: seen.__setitem__("ref", a[1]))
    with torch.no_grad():
        model.eval()(nested_tensor_from_tensor_list(images))
    hook.remove()
    return seen["ref"]


def test_mask_invalid_proposals_changes_only_the_padded_picks():
    """Official: the two-stage top-k ranks every token, so heavily padded images get (1, 1, 1, 1) proposals;
    --mask_invalid_proposals never selects them, and changes nothing when no invalid token is selected."""
    base = ["--with_box_refine", "--two_stage", "--num_queries", "30"]
    torch.manual_seed(0)
    official, _, _ = build_model(tiny_args(*base))
    with torch.no_grad():  # make an invalid token (memory zeroed: output LN(enc_output.bias)) outrank any valid one
        t = official.transformer
        direction = t.enc_output_norm(t.enc_output.bias)
        official.class_embed[-1].weight[0] = 10 * direction
    fixed, _, _ = build_model(tiny_args(*base, "--mask_invalid_proposals"))
    fixed.load_state_dict(official.state_dict())
    g = torch.Generator().manual_seed(0)
    padded = [torch.randn(3, 96, 96, generator=g), torch.randn(3, 48, 56, generator=g)]  # 59 valid tokens
    ref_official, ref_fixed = _selected_references(official, padded), _selected_references(fixed, padded)
    assert (ref_official[1] == 1).all(-1).any()  # the small image picks padded tokens officially
    assert not (ref_fixed == 1).all(-1).any()
    assert torch.equal(ref_official[0], ref_fixed[0])  # the large image selects only valid tokens either way
    single = [padded[0][:, :64, :64]]
    torch.testing.assert_close(_selected_references(official, single), _selected_references(fixed, single),
                               rtol=0, atol=0)
