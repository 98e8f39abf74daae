"""tools/benchmark.py: rows of implementations and flag variants, built from the right flags and timed in turns."""
import json
import sys

import pytest

from tools import benchmark

TINY = ("--device cpu --backbone resnet18 --backbone_from_scratch --hidden_dim 32 --nheads 4 --enc_layers 1 "
        "--dec_layers 1 --dim_feedforward 64 --num_queries 10 --num_classes 5 --bench_size 64 64 --bench_batch 1 "
        "--bench_iters 2 --bench_warmup 1")


def _run(monkeypatch, argv: list[str]) -> list:
    """benchmark.main() on ``argv``; the args of every model it built, in order."""
    built = []
    real = benchmark.build_model

    def recording(args):
        built.append((args.msda_impl, args.amp, args.num_queries))
        return real(args)

    monkeypatch.setattr(benchmark, "build_model", recording)
    monkeypatch.setattr(sys, "argv", ["benchmark.py", *argv])
    benchmark.main()
    return built


def test_variants_add_their_flags_to_the_command_and_make_one_row_each(monkeypatch, tmp_path):
    out = tmp_path / "b.json"
    built = _run(monkeypatch, [*TINY.split(), "--impls", "pytorch", "auto", "--variant=--amp --num_queries 7",
                               "--json", str(out)])
    # every implementation with the command's flags, then with the variant's added
    assert built == [("pytorch", False, 10), ("auto", False, 10), ("pytorch", True, 7), ("auto", True, 7)]
    results = json.loads(out.read_text())["results"]
    assert list(results) == ["pytorch: base", "auto: base", "pytorch: --amp --num_queries 7",
                             "auto: --amp --num_queries 7"]
    assert [r["variant"] for r in results.values()] == ["", "", "--amp --num_queries 7", "--amp --num_queries 7"]
    assert all(r["train_step_s"] > 0 and r["infer_img_s"] > 0 for r in results.values())


def test_without_variants_the_rows_are_the_implementations(monkeypatch, tmp_path):
    out = tmp_path / "b.json"
    assert _run(monkeypatch, [*TINY.split(), "--json", str(out)]) == [("auto", False, 10)]
    assert list(json.loads(out.read_text())["results"]) == ["auto"]  # what gpu_bench.py reads


def test_an_impossible_variant_is_refused_before_any_model_is_built(monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run(monkeypatch, [*TINY.split(), "--variant=--amp", "--variant=--amp --amp_backbone_half"])
    assert exit_info.value.code == 2
    assert "--variant=--amp --amp_backbone_half: --amp_backbone_half" in capsys.readouterr().err
