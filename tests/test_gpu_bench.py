"""tools/gpu_bench.py wiring: its steps run (tiny, on the CPU) and land in the markdown and JSON reports."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # four subprocesses importing torch: ~40 s
def test_smoke_run_reports_every_kind_of_step(tmp_path):
    # small_fp32_compile: the small model (trainable stem) under --compile, which once crashed on the CPU
    steps = ["msda", "small_fp32", "addon_dn", "small_fp32_compile"]
    cmd = [sys.executable, "tools/gpu_bench.py", "--smoke", "--out", str(tmp_path), "--only", *steps]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, timeout=600)
    data = json.loads((tmp_path / "gpu_bench.json").read_text())
    assert {k: v["status"] for k, v in data["steps"].items()} == dict.fromkeys(steps, "ok")
    dn = data["results"]["addon_dn.json"]
    assert dn["addon_flags"] == "--use_dn" and dn["ratio"] > 0
    small = data["results"]["small_fp32.json"]["results"]
    # fp32, then bf16 timed in turns with it: both rows in the report, the second with its speed-up
    assert list(small) == ["base", "--amp --amp_dtype bf16"] and all(r["train_step_s"] > 0 for r in small.values())
    report = (tmp_path / "gpu_bench.md").read_text()
    assert "| cpu-dec300 | cpu | float32 |" in report and "| dn | `--use_dn` |" in report and "| small_fp32 |" in report
    bf16_row = next(line for line in report.splitlines() if line.startswith("| small_fp32 + `--amp --amp_dtype bf16`"))
    assert float(bf16_row.split("|")[5]) > 0 and float(bf16_row.split("|")[6]) > 0
    # the small model's step profiled: its phases in the report, the top operators next to it
    profile = small["base"]["profile"]
    assert all(profile[f"{phase}_host_ms"] > 0 for phase in ("forward", "loss", "backward", "optimizer"))
    assert "## Where the step's time goes" in report and "| small_fp32 | " in report.split("Where the step")[1]
    assert "Operators by host self time" in (tmp_path / "profile_small_fp32.md").read_text()


def test_launch_verdict_flags_a_faster_setting_only():
    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_bench import launch_verdict
    rows = [{"case": "dec300", "dtype": "float32", "impl": "cuda", "fwd_bwd_ms": 0.50},
            {"case": "dec300", "dtype": "float32", "impl": "cuda:point_lanes=1", "fwd_bwd_ms": 0.56},
            {"case": "dec300", "dtype": "float32", "impl": "cuda:vector_atomics=0", "fwd_bwd_ms": 0.30},
            {"case": "enc", "dtype": "bfloat16", "impl": "cuda", "fwd_bwd_ms": 1.00},
            {"case": "enc", "dtype": "bfloat16", "impl": "cuda:point_lanes=1", "fwd_bwd_ms": 0.99},
            {"case": "enc", "dtype": "bfloat16", "impl": "pytorch", "fwd_bwd_ms": 9.0}]
    lines = [line for line in launch_verdict(rows) if line.startswith("- ")]
    assert lines[0] == ("- dec300 float32: time against the defaults: point_lanes=1 x1.12, vector_atomics=0 x0.60. "
                        "**vector_atomics=0 is faster: consider it as the default**")
    assert lines[1] == "- enc bfloat16: time against the defaults: point_lanes=1 x0.99."  # within 3 %: no flag
    assert launch_verdict(rows[3:4]) == []  # nothing timed beside the defaults


def test_report_renders_the_nms_comparison(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_bench import report
    nms = {"device": "cpu", "results": [{"case": "coco", "batch": 2, "candidates": [4000, 4000, 4000, 2457, 693],
                                         "device_ms": 4.0, "torchvision_ms": 6.0, "ratio": 1.5, "rounds_needed": 12,
                                         "default_rounds": 16, "converged_in_default_rounds": True,
                                         "same_proposals": True}]}
    text = report(tmp_path, {"nms": {"status": "ok", "seconds": 1.0, "command": ""}}, {"nms.json": nms}, True)
    assert "| coco (batch 2) | 15150 | 4.00 | 6.00 | 1.50 | 12 (16) | True |" in text


STAND_IN = '''# Stands in for the official wrapper (Deformable-DETR's models/ops/functions/ms_deform_attn_func.py) on a
# CPU: its call signature, our pure-PyTorch op behind it.
from models.ops.functions.ms_deform_attn_func import ms_deform_attn


class MSDeformAttnFunction:
    @staticmethod
    def apply(value, shapes, starts, locations, weights, im2col_step):
        return ms_deform_attn(value, shapes, starts, locations, weights, impl="pytorch")
'''


def test_official_kernel_is_timed_beside_ours_and_reported(tmp_path):
    build = tmp_path / "official_op"
    (build / "functions").mkdir(parents=True)
    (build / "functions" / "__init__.py").write_text("")
    (build / "functions" / "ms_deform_attn_func.py").write_text(STAND_IN)
    out = tmp_path / "msda.json"
    subprocess.run([sys.executable, "tools/benchmark_msda.py", "--device", "cpu", "--cases", "cpu-dec300", "--impls",
                    "cpu", "--dtypes", "float32", "--locations", "encoder", "--repeats", "1", "--warmup", "0",
                    "--official_op", str(build), "--json", str(out)], cwd=ROOT, check=True, capture_output=True,
                   timeout=300)
    msda = json.loads(out.read_text())
    assert [r["impl"] for r in msda["results"]] == ["cpu", "official"]
    (agreement,) = msda["agreement_with_official"]
    assert agreement["impl"] == "cpu" and 0 < agreement["output"] < 1e-5 and agreement["grad_value"] < 1e-5

    sys.path.insert(0, str(ROOT / "tools"))
    from gpu_bench import report
    step = {"results": [{"config": "r50_800x1333_refine_two_stage", "batch": 2, "size": [800, 1333],
                         "official_s": 0.195, "ours_pytorch_op_s": 0.25, "ours_s": 0.150}]}
    log = {k: {"status": "ok", "seconds": 1.0, "command": ""} for k in ("msda", "official_step")}
    text = report(tmp_path, log, {"msda.json": msda, "official_step.json": step}, True)
    cpu, official = msda["results"]
    assert f"{official['fwd_bwd_ms'] / cpu['fwd_bwd_ms']:.2f} |" in text.split("| cpu-dec300 | cpu | float32 |")[1]
    assert "Our kernel against the official one on the same inputs" in text
    assert "| r50_800x1333_refine_two_stage (batch 2, 800x1333) | 0.1950 | 0.2500 | 0.1500 | 1.30 |" in text


def test_official_sources_are_updated_for_torch_2_or_refused(tmp_path):
    sys.path.insert(0, str(ROOT / "tools"))
    from build_official_op import UPDATES, update_sources
    ops = tmp_path / "official" / "models" / "ops"
    (ops / "src" / "cuda").mkdir(parents=True)
    (ops / "functions").mkdir()
    source = ('#include <THC/THCAtomics.cuh>\nAT_ASSERTM(value.type().is_cuda(), "x");\n'
              'AT_DISPATCH_FLOATING_TYPES(value.type(), "f", ([&] { value.data<scalar_t>(); }));\nAT_ERROR("cpu");\n')
    (ops / "src" / "cuda" / "ms_deform_attn_cuda.cu").write_text(source)
    counts = update_sources(tmp_path / "official", tmp_path / "build")
    assert set(counts) == {pattern for pattern, _, _ in UPDATES} and all(counts.values())
    assert (tmp_path / "build" / "src" / "cuda" / "ms_deform_attn_cuda.cu").read_text() == (
        '#include <ATen/cuda/Atomic.cuh>\nTORCH_CHECK(value.is_cuda(), "x");\n'
        'AT_DISPATCH_FLOATING_TYPES(value.scalar_type(), "f", ([&] { value.data_ptr<scalar_t>(); }));\n'
        'TORCH_CHECK(false, "cpu");\n')
    (ops / "src" / "cuda" / "ms_deform_attn_cuda.cu").write_text("// already updated\n")
    with pytest.raises(SystemExit, match="found nothing to update"):
        update_sources(tmp_path / "official", tmp_path / "build")
    with pytest.raises(SystemExit, match="not a checkout"):
        update_sources(tmp_path, tmp_path / "build")
