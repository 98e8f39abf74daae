"""Console and logs people read: the short progress line, args.json, log.txt, TensorBoard, tools/plot_logs.py."""
import json
import logging
import sys

import pytest

import main as train_main
from flags import finalize_args, get_args_parser
from tests.conftest import synthetic_flags
from util.errors import FlagError
from util.logger import COCO_STAT_NAMES, MetricLogger, SmoothedValue, check_tensorboard, group_losses

ADDONS = ["--with_box_refine", "--two_stage", "--use_dn", "--num_queries_one2many", "6", "--use_ms_detr",
          "--use_aux_ffn"]


def _weighted_terms(layers: int, groups: list) -> dict:
    """Weighted loss keys as the criterion generates them: loss_{term}[_{layer}][_{group}]."""
    out = {}
    for group in ["", *groups]:
        for layer in [None] if group == "_enc" else [None, *range(layers - 1)]:
            for term in ("ce", "bbox", "giou"):
                out[f"loss_{term}{'' if layer is None else f'_{layer}'}{group}"] = 1.0
    return out


def test_group_losses_add_up_to_the_total():
    terms = _weighted_terms(6, ["_dn", "_one2many", "_o2m", "_enc"])
    figures = group_losses({**terms, **{f"{k}_unscaled": 9.0 for k in terms}, "class_error": 50.0})
    assert list(figures) == ["ce", "bbox", "giou", "aux", "dn", "enc", "o2m", "one2many"]
    assert figures["aux"] == 15 and figures["dn"] == 18 and figures["enc"] == 3
    assert sum(figures.values()) == sum(terms.values())
    # An add-on's own multi-word term without a suffix keeps its name.
    assert group_losses({"loss_ce": 1.0, "loss_rpn_cls": 2.0}) == {"ce": 1.0, "rpn_cls": 2.0}


def test_summary_stays_short_for_a_large_run():
    ml = MetricLogger()
    ml.add_meter("lr", SmoothedValue(window_size=1))
    ml.add_meter("grad_norm", SmoothedValue(window_size=1))
    terms = {k: 123.456 for k in _weighted_terms(6, ["_dn", "_one2many", "_o2m", "_enc"])}
    ml.update(loss=sum(terms.values()), **terms, **{f"{k}_unscaled": 1.0 for k in terms}, lr=2e-4, grad_norm=1234.5)
    line = f"Epoch: [49] [14000/14658] {ml.summary()} | 1.234 s/it (data 0.012) | mem 23456M | eta 26:03:04"
    assert len(line) < 200, line
    assert "lr 2.0e-04" in line and "grad 1234" in line and "one2many" in line


def test_tiny_run_logs_args_log_txt_and_tensorboard(tmp_path, caplog):
    """Three add-ons: a short progress line, args.json, every term in log.txt, TensorBoard tags read back."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    flags = synthetic_flags(tmp_path, "out", "--epochs", "1", "--backbone_from_scratch", "--tensorboard", *ADDONS)
    args = finalize_args(get_args_parser().parse_args(flags))
    expected_flags = dict(vars(args))
    with caplog.at_level(logging.INFO, logger="detr"):
        train_main.main(args)
    out = tmp_path / "out"

    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Epoch: [0] [")]
    assert len(progress) == 2  # --print_freq 1, 2 iterations
    for line in progress:
        assert len(line) < 200, line
        for field in ("loss ", "(ce ", " dn ", " o2m ", " one2many ", " enc ", "lr ", "grad ", "s/it", "eta "):
            assert field in line, (field, line)
    messages = [r.getMessage() for r in caplog.records]
    assert not any(m.startswith("args:") for m in messages) and max(len(m) for m in messages) < 400
    assert any(m.startswith("model deformable_detr: backbone resnet18") and "add-ons: dn, hybrid, ms_detr" in m
               for m in messages)

    saved = json.loads((out / "args.json").read_text())
    assert set(expected_flags) <= set(saved)
    assert saved["num_queries_one2many"] == 6 and saved["use_dn"] is True and saved["tensorboard"] is True

    entry = json.loads((out / "log.txt").read_text().splitlines()[0])
    for key in ("loss_ce", "loss_bbox_0", "loss_giou_enc", "loss_ce_dn", "loss_bbox_0_one2many", "loss_giou_0_o2m"):
        assert f"train_{key}" in entry and f"train_{key}_unscaled" in entry, key
    assert "test_loss" in entry and len(entry["test_coco_eval_bbox"]) == 12

    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    acc = EventAccumulator(str(files[0]))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"iter/loss", "iter/lr", "iter/grad_norm", "iter_terms/loss_ce", "iter_terms/loss_bbox_0_dn",
            "iter_terms/loss_giou_0_o2m", "iter_terms/loss_ce_one2many", "train/loss", "train/loss_ce_dn_unscaled",
            "test/loss", "test/loss_ce_enc"} <= tags
    assert {f"coco/{name}" for name in COCO_STAT_NAMES} <= tags
    assert [e.step for e in acc.Scalars("iter/loss")] == [0, 1]
    assert acc.Scalars("train/loss")[0].value == pytest.approx(entry["train_loss"], rel=1e-6)
    assert acc.Scalars("coco/AP50")[0].value == pytest.approx(entry["test_coco_eval_bbox"][1], abs=1e-6)


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process test on Linux")
def test_two_processes_print_one_progress_line_per_step(tmp_path):
    """Under DDP only rank 0 logs: the same short lines as in one process; one args.json, one event file."""
    pytest.importorskip("tensorboard")
    from tests.test_distributed import _launch

    proc = _launch(2, synthetic_flags(tmp_path, "ddp", "--epochs", "1", "--backbone_from_scratch", "--tensorboard",
                                      "--use_dn", "--two_stage"))
    progress = [line for line in proc.stdout.splitlines() if line.startswith("Epoch: [0] [")]
    assert len(progress) == 2 and all(len(line) < 200 and " dn " in line for line in progress), progress
    assert "[rank 1]" not in proc.stdout
    assert json.loads((tmp_path / "ddp" / "args.json").read_text())["world_size"] == 2
    assert len(list((tmp_path / "ddp" / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_without_output_dir_flags_are_logged_as_json(caplog):
    from util.logger import save_args

    args = finalize_args(get_args_parser().parse_args(["--device", "cpu"]))
    with caplog.at_level(logging.INFO, logger="detr"):
        assert save_args(args, "") is None
    text = caplog.records[-1].getMessage()
    assert json.loads(text[text.index("{"):]) == json.loads(json.dumps(vars(args), default=str))


def test_tensorboard_missing_or_without_output_dir_stops_at_start(tmp_path, monkeypatch):
    with pytest.raises(FlagError, match="--output_dir"):
        check_tensorboard(True, "")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # makes the import fail
    with pytest.raises(FlagError, match="pip install tensorboard"):
        check_tensorboard(True, str(tmp_path))
    args = finalize_args(get_args_parser().parse_args(synthetic_flags(tmp_path, "out", "--tensorboard")))
    with pytest.raises(FlagError, match="pip install tensorboard"):
        train_main.main(args)
    assert not (tmp_path / "out").exists()  # stopped before anything was built or written
    check_tensorboard(False, "")  # off: nothing is checked


def test_plot_logs_draws_two_runs(tmp_path):
    pytest.importorskip("matplotlib")
    from tools import plot_logs

    for run, scale in (("a", 1.0), ("b", 2.0)):
        (tmp_path / run).mkdir()
        lines = []
        for epoch in range(3):
            entry = {"epoch": epoch, "train_loss": scale * (10 - epoch)}
            if epoch != 1:  # --eval_every 2: test keys only on some epochs
                entry.update(test_loss=scale * (11 - epoch), test_coco_eval_bbox=[0.1 * epoch / scale] * 12)
            lines.append(json.dumps(entry))
        (tmp_path / run / "log.txt").write_text("\n".join(lines) + "\n{\"epoch\": 3, \"tra")  # a torn last line
    png = plot_logs.main([str(tmp_path / "a"), str(tmp_path / "b"), "--output", str(tmp_path / "curves.png")])
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
    assert plot_logs.run_names([tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    assert plot_logs.series(plot_logs.read_log(tmp_path / "a"), "test_coco_eval_bbox", 1) == ([0, 2], [0.0, 0.2])
