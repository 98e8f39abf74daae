"""Flags: -m NAME brings its repository's defaults, user flags win, --no-X turns them off, bad values are refused."""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from pathlib import Path

import pytest

import main as train_main
from flags import FlagError, describe_model_defaults, get_args_parser, validate_args
from models.registry import MODEL_DEFAULTS, MODELS, register_model

ROOT = Path(__file__).resolve().parents[1]

# What each model trains with when only -m NAME is given (read from the official repositories).
EXPECTED = {
    "deformable_detr": {"lr": 2e-4, "lr_backbone": 2e-5, "lr_linear_proj_mult": 0.1, "epochs": 50, "lr_drop": 40,
                        "num_queries": 300, "dim_feedforward": 1024, "dropout": 0.1, "cls_loss_coef": 2,
                        "use_dn": False, "two_stage": False, "topk": 100},
    "dab_deformable_detr": {"lr": 1e-4, "lr_backbone": 1e-5, "lr_linear_proj_mult": 1.0, "epochs": 300,
                            "lr_drop": 200, "num_queries": 300, "dim_feedforward": 2048, "dropout": 0.0,
                            "cls_loss_coef": 1.0, "use_dn": False, "two_stage": False, "topk": 100},
    "dn_dab_deformable_detr": {"lr": 1e-4, "lr_backbone": 1e-5, "lr_linear_proj_mult": 1.0, "epochs": 50,
                               "lr_drop": 40, "num_queries": 300, "dim_feedforward": 2048, "dropout": 0.0,
                               "cls_loss_coef": 1.0, "use_dn": False, "scalar": 5, "label_noise_scale": 0.2,
                               "box_noise_scale": 0.4, "topk": 100},
    "dino": {"lr": 1e-4, "lr_backbone": 1e-5, "lr_linear_proj_mult": 1.0, "epochs": 12, "lr_drop": 11,
             "num_queries": 900, "dim_feedforward": 2048, "dropout": 0.0, "cls_loss_coef": 1.0, "use_dn": True,
             "contrastive": True, "dn_number": 100, "dn_box_noise_scale": 0.4, "dn_label_noise_ratio": 0.5,
             "topk": 300, "num_select": None, "pe_temperatureH": 20.0, "pe_temperatureW": 20.0,
             "dec_pred_class_embed_share": True, "dec_pred_bbox_embed_share": True, "two_stage": True,
             "with_box_refine": True, "mixed_selection": True, "look_forward_twice": True,
             "num_feature_levels": 4, "bbox_loss_coef": 5, "giou_loss_coef": 2, "batch_size": 2},
    "detr": {"lr": 1e-4, "lr_backbone": 1e-5, "epochs": 300, "lr_drop": 200, "num_queries": 100,
             "dim_feedforward": 2048, "dropout": 0.1, "cls_loss_coef": 1.0, "cls_loss": "softmax", "eos_coef": 0.1,
             "set_cost_class": 1.0, "num_feature_levels": 1, "pre_norm": False, "clip_max_norm": 0.1},
    "yolos": {"lr": 1e-4, "epochs": 150, "lr_drop": 100, "sched": "warmupcos", "num_queries": 100,
              "cls_loss": "softmax", "eos_coef": 0.1, "cls_loss_coef": 1.0, "set_cost_class": 1.0,
              "drop_path_rate": 0.0, "aux_loss": False},
    "conditional_detr": {"lr": 1e-4, "lr_backbone": 1e-5, "lr_linear_proj_mult": 1.0, "epochs": 50, "lr_drop": 40,
                         "num_queries": 300, "dim_feedforward": 2048, "dropout": 0.1, "cls_loss_coef": 2,
                         "cls_loss": "focal", "num_feature_levels": 1, "topk": 100},
    "dab_detr": {"lr": 1e-4, "lr_backbone": 1e-5, "epochs": 300, "lr_drop": 200, "num_queries": 300,
                 "dim_feedforward": 2048, "dropout": 0.0, "cls_loss_coef": 1.0, "transformer_activation": "prelu",
                 "num_select": 300, "pe_temperatureH": 20.0, "pe_temperatureW": 20.0, "num_feature_levels": 1},
    "dn_dab_detr": {"lr": 1e-4, "lr_backbone": 1e-5, "epochs": 50, "lr_drop": 40, "dropout": 0.0,
                    "cls_loss_coef": 1.0, "transformer_activation": "prelu", "scalar": 5, "label_noise_scale": 0.2,
                    "box_noise_scale": 0.4, "num_feature_levels": 1, "use_dn": False},
}
SOURCES = {"deformable_detr": "fundamentalvision/Deformable-DETR main.py",
           "detr": "facebookresearch/detr main.py", "yolos": "hustvl/YOLOS main.py",
           "conditional_detr": "Atten4Vis/ConditionalDETR main.py", "dab_detr": "IDEA-Research/DAB-DETR main.py",
           "dn_dab_detr": "IDEA-Research/DN-DETR main.py",
           "dab_deformable_detr": "IDEA-Research/DAB-DETR main.py",
           "dn_dab_deformable_detr": "IDEA-Research/DN-DETR main.py",
           "dino": "IDEA-Research/DINO config/DINO/DINO_4scale.py"}


def parse(*flags: str) -> argparse.Namespace:
    return get_args_parser().parse_args(list(flags))


def test_every_model_has_expectations():
    assert set(EXPECTED) == set(MODELS.names())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_model_defaults(name):
    args = parse("-m", name)
    for dest, value in EXPECTED[name].items():
        assert getattr(args, dest) == value, dest
    assert args.model_defaults == dict(MODEL_DEFAULTS[name].values)  # nothing given: every default applied
    assert type(args.model_defaults) is dict
    line = describe_model_defaults(args)
    assert line.startswith(f"model {name}: defaults of {SOURCES[name]}")
    for dest, value in args.model_defaults.items():
        assert f"{dest}={value}" in line
    validate_args(args)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_defaults_have_the_flag_type(name):
    actions = {a.dest: a for a in get_args_parser()._actions}
    for dest, value in MODEL_DEFAULTS[name].values.items():
        action = actions[dest]
        if action.type is not None:
            assert isinstance(value, action.type), dest
        elif action.choices is not None:
            assert value in action.choices, dest
        else:
            assert isinstance(value, bool), dest


def test_dino_log_line():
    line = describe_model_defaults(parse("-m", "dino"))
    assert "num_queries=900" in line and "dropout=0.0" in line and "use_dn=True" in line


@pytest.mark.parametrize("flags,dest,value", [
    (["--num_queries", "300"], "num_queries", 300),  # the base default's value, given explicitly
    (["--num_queries_one2one", "300"], "num_queries", 300),
    (["--dropout", "0.1"], "dropout", 0.1),
    (["--dim_feedforward", "1024"], "dim_feedforward", 1024),
    (["--lr", "2e-4"], "lr", 2e-4),
    (["--lr_linear_proj_mult", "0.1"], "lr_linear_proj_mult", 0.1),
    (["--epochs", "50"], "epochs", 50),
    (["--cls_loss_coef", "2"], "cls_loss_coef", 2.0),
    (["--topk", "100"], "topk", 100),
    (["--topk_eval", "100"], "topk", 100),
    (["--dn_box_noise_scale", "1.0"], "dn_box_noise_scale", 1.0),
    (["--use_dn"], "use_dn", True),
    (["--two_stage"], "two_stage", True),
])
def test_user_flags_win(flags, dest, value):
    args = parse("-m", "dino", *flags)
    assert getattr(args, dest) == value
    assert dest not in args.model_defaults
    assert args.num_feature_levels == 4 and args.epochs in (12, 50)  # the rest keeps DINO's values
    if dest != "dropout":
        assert args.dropout == 0.0 and args.model_defaults["dropout"] == 0.0


def test_flag_before_or_after_model():
    before = parse("--dropout", "0.1", "-m", "dino")
    after = parse("--model=dino", "--dropout", "0.1")
    assert vars(before) == vars(after)
    assert before.dropout == 0.1 and before.num_queries == 900


@pytest.mark.parametrize("flag,dest", [("--no-use_dn", "use_dn"), ("--no-contrastive", "contrastive"),
                                       ("--no-two_stage", "two_stage"), ("--no-with_box_refine", "with_box_refine"),
                                       ("--no-mixed_selection", "mixed_selection"),
                                       ("--no-look_forward_twice", "look_forward_twice"),
                                       ("--no-dec_pred_class_embed_share", "dec_pred_class_embed_share"),
                                       ("--no-dec_pred_bbox_embed_share", "dec_pred_bbox_embed_share")])
def test_no_flag_turns_a_model_default_off(flag, dest):
    args = parse("-m", "dino", flag)
    assert getattr(args, dest) is False
    assert dest not in args.model_defaults
    assert parse("-m", "dino", flag, f"--{flag[5:]}").__dict__[dest] is True  # the last one wins, as in argparse


def test_dino_without_denoising():
    from models.addons.dn import Denoising

    assert Denoising.enabled(parse("-m", "dino"))
    assert not Denoising.enabled(parse("-m", "dino", "--no-use_dn", "--no-contrastive"))


def test_every_store_true_flag_has_a_negation():
    parser = get_args_parser()
    options = parser._option_string_actions
    for action in parser._actions:
        if action.nargs == 0 and action.const is True:
            for opt in action.option_strings:
                if opt.startswith("--"):
                    assert f"--no-{opt[2:]}" in options, opt
    assert parse("--no-use_dn").use_dn is False
    assert parse("--eval", "--no-eval").eval is False


def test_official_spellings():
    args = parse("--no_aux_loss", "--num_queries_one2one", "900", "--topk_eval", "50", "--num_queries_one2many",
                 "1500", "--k_one2many", "6", "--use_fp16")
    assert args.aux_loss is False and args.num_queries == 900 and args.topk == 50
    assert args.num_queries_one2many == 1500 and args.k_one2many == 6
    assert parse().aux_loss is True
    assert parse("-m", "dino", "--num_select", "100").num_select == 100


def test_parser_is_not_mutated():
    parser = get_args_parser()
    before = {a.dest: a.default for a in parser._actions}
    dino = parser.parse_args(["-m", "dino"])
    base = parser.parse_args([])
    assert {a.dest: a.default for a in parser._actions} == before
    assert dino.num_queries == 900 and base.num_queries == 300 and base.dropout == 0.1
    assert base.model_defaults == {} and base.use_dn is False


def test_namespace_argument_is_honoured():
    ns = argparse.Namespace(dropout=0.3)
    args = get_args_parser().parse_args(["-m", "dino"], namespace=ns)
    assert args is ns and args.dropout == 0.3 and "dropout" not in args.model_defaults
    assert args.num_queries == 900


def test_unknown_default_is_a_programming_error():
    name = "test_args_bad_defaults"
    register_model(name, defaults={"no_such_flag": 1}, source="nowhere")(lambda args: None)
    try:
        with pytest.raises(KeyError, match="no_such_flag"):
            get_args_parser().parse_args(["-m", name])
    finally:
        MODELS._items.pop(name)
        MODEL_DEFAULTS.pop(name)


def test_duplicate_registration_raises():
    with pytest.raises(KeyError, match="already registered"):
        register_model("dino", defaults={})(lambda args: None)
    assert MODEL_DEFAULTS["dino"].values["num_queries"] == 900


def test_model_defaults_are_read_only():
    with pytest.raises(TypeError):
        MODEL_DEFAULTS["dino"].values["num_queries"] = 1  # type: ignore[index]


# --- validation --------------------------------------------------------------------------------------------------

TINY = ["--hidden_dim", "32", "--nheads", "4"]
REFUSED = [
    (["--num_feature_levels", "0"], "--num_feature_levels"),
    (["--num_feature_levels", "6"], "--num_feature_levels"),
    (["--dec_layers", "0"], "--dec_layers"),
    (["--enc_layers", "-1"], "--enc_layers"),
    (["--nheads", "0"], "--nheads"),
    (["--nheads", "3"], "--nheads"),
    (["--hidden_dim", "48", "--nheads", "4"], "--hidden_dim"),
    (["--hidden_dim", "0"], "--hidden_dim"),
    (["--num_queries", "0"], "--num_queries"),
    (["--dec_n_points", "0"], "--dec_n_points"),
    (["--enc_n_points", "0"], "--enc_n_points"),
    (["--dim_feedforward", "0"], "--dim_feedforward"),
    (["--dropout", "1"], "--dropout"),
    (["--dropout", "-0.1"], "--dropout"),
    (["--topk", "0"], "--topk"),
    (["--num_select", "0"], "--num_select"),
    (["--batch_size", "0"], "--batch_size"),
    (["--epochs", "-1"], "--epochs"),
    (["--lr_drop", "0"], "--lr_drop"),
    (["--save_every", "0"], "--save_every"),
    (["--eval_every", "0"], "--eval_every"),
    (["--print_freq", "0"], "--print_freq"),
    (["--num_queries_one2many", "-1"], "--num_queries_one2many"),
    (["--num_queries_one2many", "10", "--k_one2many", "0"], "--k_one2many"),
    (["--use_dn", "--scalar", "0"], "--scalar"),
    (["-m", "dino", "--dn_number", "0"], "--dn_number"),
    (["--addons", "dn", "--scalar", "0"], "--scalar"),
    (["--max_nonfinite_steps", "0"], "--max_nonfinite_steps"),
    (["--num_workers", "-1"], "--num_workers"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--lr", "-1"], "--lr"),
    (["--lr_linear_proj_mult", "-1"], "--lr_linear_proj_mult"),
    (["--weight_decay", "-1"], "--weight_decay"),
    (["--clip_max_norm", "-1"], "--clip_max_norm"),
    (["--max_iters_per_epoch", "-1"], "--max_iters_per_epoch"),
    (["--start_epoch", "-1"], "--start_epoch"),
    (["--num_classes", "0"], "--num_classes"),
    (["--dn_max_queries", "-1"], "--dn_max_queries"),
    (["--num_patterns", "3"], "--num_patterns"),
    (["--drop_path_rate", "1"], "--drop_path_rate"),
    (["--use_ms_detr", "--o2m_matcher_k", "0"], "--o2m_matcher_k"),
    (["--synthetic_image_size", "16"], "--synthetic_image_size"),
    (["--synthetic_val_size", "0"], "--synthetic_val_size"),
    (["--dataset_file", "synthetic", "--synthetic_train_size", "1", "--batch_size", "2"], "--synthetic_train_size"),
]


@pytest.mark.parametrize("flags,flag", REFUSED, ids=[" ".join(f) for f, _ in REFUSED])
def test_refused(flags, flag):
    with pytest.raises(FlagError, match=re.escape(flag)):
        validate_args(parse(*flags))


@pytest.mark.parametrize("flags", [
    [], TINY, ["--enc_layers", "0"], ["--num_feature_levels", "1"], ["--num_feature_levels", "5"],
    ["--dropout", "0"], ["--epochs", "0"], ["--use_dn", "--dn_number", "0"],  # dn_number is CDN's
    ["-m", "dino", "--scalar", "0"],  # scalar is DN-DETR's
    ["--k_one2many", "0"],  # the hybrid branch is off
    ["--eval", "--synthetic_train_size", "1"],
])
def test_accepted(flags):
    validate_args(parse(*flags))


def test_problems_are_reported_together_in_one_line():
    with pytest.raises(FlagError) as info:
        validate_args(parse("--dec_layers", "0", "--dropout", "2"))
    assert "--dec_layers" in str(info.value) and "--dropout" in str(info.value) and "\n" not in str(info.value)


def test_hand_made_namespace_checks_what_it_has():
    validate_args(argparse.Namespace(hidden_dim=64, nheads=8))
    with pytest.raises(FlagError, match="--nheads"):
        validate_args(argparse.Namespace(hidden_dim=64, nheads=3))


def test_cli_exits_with_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(sys, "argv", ["main.py", "--dec_layers", "0", "--output_dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit) as info:
        train_main.cli()
    assert info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--dec_layers" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before anything was made


# --- config scripts ----------------------------------------------------------------------------------------------

def script_flags(path: Path) -> list[str]:
    """The flags a config/recipe script passes to main.py (variables replaced by placeholders)."""
    text = path.read_text().replace("\\\n", " ")
    line = next(ln for ln in text.splitlines() if "main.py" in ln and not ln.lstrip().startswith("#"))
    line = line.split("main.py", 1)[1]
    line = re.split(r'\$\{PY_ARGS\}|"\$@"|>', line)[0]
    line = re.sub(r"\$\{?(\w+)\}?", r"/tmp/\1", line)
    return shlex.split(line)


SCRIPTS = sorted(p for p in [*ROOT.glob("configs/**/*.sh"), *ROOT.glob("scripts/**/*.sh")]
                 if "main.py" in p.read_text())


@pytest.mark.parametrize("path", SCRIPTS, ids=[str(p.relative_to(ROOT)) for p in SCRIPTS])
def test_scripts_parse_and_validate(path):
    args = parse(*script_flags(path))
    validate_args(args)


# The long command lines the config scripts had before -m NAME brought the defaults: the same values now.
OLD_CONFIGS = {
    "r50_dino_4scale": "-m dino --use_dn --contrastive --dn_number 100 --dn_box_noise_scale 1.0 "
                       "--dn_label_noise_ratio 0.5 --num_queries 900 --num_feature_levels 4 --lr 1e-4 "
                       "--lr_backbone 1e-5 --lr_linear_proj_mult 1.0 --dim_feedforward 2048 --dropout 0.0 "
                       "--cls_loss_coef 1 --bbox_loss_coef 5 --giou_loss_coef 2 --epochs 12 --lr_drop 11 "
                       "--topk 300 --with_box_refine --two_stage --mixed_selection --look_forward_twice "
                       "--pe_temperatureH 20 --pe_temperatureW 20 --dec_pred_class_embed_share "
                       "--dec_pred_bbox_embed_share",
    "r50_dn_dab_deformable_detr": "-m dn_dab_deformable_detr --use_dn --scalar 5 --label_noise_scale 0.2 "
                                  "--box_noise_scale 0.4 --transformer_activation relu --num_queries 300 --lr 1e-4 "
                                  "--lr_backbone 1e-5 --lr_linear_proj_mult 1.0 --dim_feedforward 2048 "
                                  "--dropout 0.0 --cls_loss_coef 1 --bbox_loss_coef 5 --giou_loss_coef 2 "
                                  "--epochs 50 --lr_drop 40 --topk 100",
    "r50_dab_deformable_detr": "-m dab_deformable_detr --num_queries 300 --lr 1e-4 --lr_backbone 1e-5 "
                               "--lr_linear_proj_mult 1.0 --dim_feedforward 2048 --dropout 0.0 --cls_loss_coef 1 "
                               "--bbox_loss_coef 5 --giou_loss_coef 2 --epochs 50 --lr_drop 40 --topk 100 "
                               "--transformer_activation relu",
}


@pytest.mark.parametrize("name", sorted(OLD_CONFIGS))
def test_short_configs_train_what_the_long_ones_did(name):
    new = vars(parse(*script_flags(ROOT / "configs" / f"{name}.sh")))
    old = vars(parse(*OLD_CONFIGS[name].split(), "--output_dir", "/tmp/EXP_DIR"))
    new.pop("model_defaults"), old.pop("model_defaults")
    assert new == old


def test_dino_reference_flags_match_the_model_defaults():
    """The DINO reference's command line (every value spelled out) builds what -m dino alone builds."""
    ref = ROOT / "tests" / "data" / "reference" / "dino_4scale.pt"
    import torch

    flags = list(torch.load(ref, weights_only=True)["flags"])
    spelled, short = vars(parse(*flags)), vars(parse("-m", "dino"))
    for d in (spelled, short):
        d.pop("model_defaults")
        d["topk"] = d.pop("num_select") or d["topk"]  # --num_select overrides --topk
    assert spelled == short
