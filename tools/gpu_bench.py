"""Every GPU figure of the README's Benchmarks section in one run: the op, the models, the add-ons' costs.

    bash tools/gpu_bench.sh [OUT]            # builds the op for this GPU, then runs this script
    python tools/gpu_bench.py --out OUT      # the op already built
    python tools/gpu_bench.py --smoke --out OUT   # the same steps on the CPU with tiny sizes (wiring check)

With ``--official_op`` (the official kernel built by tools/build_official_op.py) the op is timed beside the official
kernel, and with ``--official`` (its checkout) the official training step beside ours; gpu_bench.sh passes both
when .official/Deformable-DETR is there (tools/device_official.sh).

Each step is a subprocess of the repository's own tools with a time limit; a step that fails or times out is
reported as such and the next one runs. Steps are ordered by what the performance spec needs most, and once
``--budget`` seconds are spent the remaining ones are reported as skipped. Writes ``OUT/gpu_bench.md`` (tables
with the spec's targets) and ``OUT/gpu_bench.json`` (every raw result), plus each tool's own output.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

R50 = "--backbone resnet50 --num_classes 91"
TWO_STAGE = "--with_box_refine --two_stage"
SMALL = ("--backbone resnet18 --backbone_from_scratch --hidden_dim 64 --nheads 8 --enc_layers 2 --dec_layers 3 "
         "--dim_feedforward 256 --num_queries 30 --num_classes 6 --with_box_refine --two_stage --dropout 0.0 "
         "--mixed_selection --look_forward_twice")
# name: (flags added to the baseline, flags of the baseline): COCO-scale costs of the performance spec
ADDONS = {
    "hybrid": ("--num_queries_one2many 1500 --k_one2many 6", ""),
    "dn": ("--use_dn", ""),
    "ms_detr": ("--use_ms_detr --use_aux_ffn", ""),
    "teach": ("--ensemble --ext_ann_files t=unused.json", ""),
    "od": ("--addons od", "--use_ema"),
    "co_detr": ("--addons co_detr", ""),
}
# The opt-in speed flags (each changes numerics against the official code: README "Deliberate differences")
SPEED_OPT_INS = "--amp_backbone_half --channels_last --fused_optimizer"
# DETR_MSDA_CUDA_TUNING settings timed beside the defaults: the layout before point slices and 8-byte half backward
# and scalar atomics (the official kernel's; whether the vector ones suffer from the decoder's colliding updates)
LAUNCH_SETTINGS = ["point_lanes=1", "point_lanes=1,bwd_vec_bytes=16", "vector_atomics=0"]
# Where a step's time goes (host and device time per phase, the device's busy time, the top kernels): the bf16 R50
# step and the host-bound small model, written next to the report as profile_*.md
PROFILE = ["--profile_steps", "3", "--profile"]


def run(name: str, cmd: list[str], out: Path, timeout: float, log: dict) -> bool:
    """Run one step, its output to OUT/name.txt; record status and seconds in ``log``."""
    start = time.time()
    with open(out / f"{name}.txt", "w") as f:
        try:
            rc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout).returncode
            status = "ok" if rc == 0 else f"failed (exit {rc})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {timeout:.0f} s"
    log[name] = {"status": status, "seconds": round(time.time() - start, 1), "command": " ".join(cmd)}
    print(f"{name}: {status} ({log[name]['seconds']} s)", flush=True)
    return status == "ok"


def load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def plan(smoke: bool, official_op: str | None = None, official: str | None = None
         ) -> list[tuple[str, list[str], float, str]]:
    """(name, command, time limit in seconds, JSON file or '') of every step, most needed first. ``official_op``:
    the official kernel's build (tools/build_official_op.py), timed beside ours; ``official``: its checkout, whose
    training step is timed beside ours (tools/compare_official_step.py)."""
    py = sys.executable
    if smoke:  # CPU, tiny: checks that every step runs and reports
        dev, size, batch, iters = "--device cpu", ["64", "64"], "1", ["--bench_iters", "1", "--bench_warmup", "0"]
        model = f"--backbone resnet18 --hidden_dim 32 --nheads 2 --enc_layers 1 --dec_layers 1 --dim_feedforward 64 " \
                f"--num_queries 20 --num_classes 6 {dev}"
        msda = [py, "tools/benchmark_msda.py", "--device", "cpu", "--cases", "cpu-dec300", "--repeats", "1",
                "--warmup", "0", "--locations", "encoder"]
        addon = ["--batch_size", "1", "--image_size", "64", "--steps", "1", "--warmup", "0"]
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops", "-k", "cuda"]
    else:
        dev, size, batch, iters = "--device cuda", ["800", "1333"], "2", ["--bench_iters", "8", "--bench_warmup", "3"]
        model = f"{R50} {dev}"
        # The kernel's launch choices side by side with the layout of the last GPU run (one point slice, and for
        # bf16 a 16-byte backward): which default the figures support.
        msda = [py, "tools/benchmark_msda.py", "--device", "cuda", "--cases", "enc", "dec300", "dec900",
                "--impls", "cuda", "--dtypes", "float32", "bfloat16", "--locations", "encoder",
                "--tunings", *LAUNCH_SETTINGS]
        addon = ["--batch_size", "2", "--image_size", "800", "--image_width", "1333", "--steps", "5", "--warmup", "2"]
        tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/ops", "tests/test_nms.py",
                 "tests/addons/test_co_rcnn.py"]
    bench = [py, "tools/benchmark.py", *model.split(), "--bench_size", *size, "--bench_batch", batch, *iters]
    if official_op:
        msda += ["--official_op", official_op]
    steps = [("cuda_tests", tests, 240, ""),
             ("msda", msda + ["--json", "{out}/msda.json"], 150 if official_op else 120, "msda.json")]
    # fp32 steps carry a bf16 row, timed in turns with the fp32 one in the same process: the "bf16 faster than
    # fp32" ratio of one run
    bf16_row = ["--variant=--amp --amp_dtype bf16"]
    for name, extra in (("r50_two_stage_fp32", bf16_row),
                        ("r50_two_stage_bf16", ["--amp", "--amp_dtype", "bf16", *PROFILE, "{out}/profile_r50_bf16.md"]),
                        ("r50_two_stage_bf16_optins", ["--amp", "--amp_dtype", "bf16", *SPEED_OPT_INS.split()])):
        steps.append((name, bench + TWO_STAGE.split() + extra + ["--json", f"{{out}}/{name}.json"], 150,
                      f"{name}.json"))
        if name == "r50_two_stage_bf16" and official and official_op:
            # The official code's training step beside ours (fp32 both; the official op as built), same weights
            where = ["--only", "r50_320x512", "--rounds", "1", "--steps", "1"] if smoke else ["--rounds", "3",
                                                                                             "--steps", "5"]
            # its extension first on the path, and what gpu_bench.sh put there (pycocotools on a lent machine)
            path = os.pathsep.join(p for p in (official_op, os.environ.get("PYTHONPATH", "")) if p)
            steps.append(("official_step", ["env", f"PYTHONPATH={path}", py, "tools/compare_official_step.py",
                                             "--official", official, "--device", dev.split()[1], *where, "--json",
                                             "{out}/official_step.json"], 200, "official_step.json"))
    small = [py, "tools/benchmark.py", *SMALL.split(), dev.split()[0], dev.split()[1], "--bench_size",
             *(["128", "128"] if not smoke else size), "--bench_batch", "8" if not smoke else "1", *iters]
    steps.append(("small_fp32", small + [*bf16_row, *PROFILE, "{out}/profile_small_fp32.md", "--json",
                                         "{out}/small_fp32.json"],
                  90, "small_fp32.json"))
    steps.append(("dino_4scale_dn_bf16", bench + ["-m", "dino", "--use_dn", "--amp", "--amp_dtype", "bf16", "--json",
                                                  "{out}/dino_4scale_dn_bf16.json"], 150, "dino_4scale_dn_bf16.json"))
    for name, (flags, base) in ADDONS.items():
        steps.append((f"addon_{name}", [py, "tools/addon_step_time.py", f"--model={model}",  # '=': values start with --
                                        f"--flags={TWO_STAGE} {base}".strip(), f"--addon_flags={flags}", *addon,
                                        "--json", f"{{out}}/addon_{name}.json"], 150, f"addon_{name}.json"))
    nms = [py, "tools/benchmark_nms.py", "--device", dev.split()[1], *(["--cases", "small", "--repeats", "1"]
                                                                       if smoke else []), "--json", "{out}/nms.json"]
    steps.append(("nms", nms, 90, "nms.json"))
    steps.append(("small_fp32_compile", small + ["--compile", *(["--compile_backend", "eager"] if smoke else []),
                                                 "--json", "{out}/small_fp32_compile.json"], 150,
                  "small_fp32_compile.json"))
    steps.append(("r50_two_stage_bf16_compile",
                  bench + TWO_STAGE.split() + ["--amp", "--amp_dtype", "bf16", "--compile", "--bench_warmup", "3",
                                               *(["--compile_backend", "eager"] if smoke else []),
                                               "--json", "{out}/r50_two_stage_bf16_compile.json"], 300,
                  "r50_two_stage_bf16_compile.json"))
    return steps


def fmt(value: float | None, scale: float = 1.0, digits: int = 2) -> str:
    return "—" if value is None or value != value else f"{value * scale:.{digits}f}"  # None or NaN: not measured


def launch_verdict(rows: list[dict]) -> list[str]:
    """Per case and dtype, the CUDA kernel's defaults against the DETR_MSDA_CUDA_TUNING settings timed beside them:
    which default the figures support (forward + backward; a setting that wins by more than 3 % is flagged)."""
    by_key: dict[tuple[str, str], dict[str, float]] = {}
    for r in rows:
        if r["impl"].startswith("cuda"):
            by_key.setdefault((r["case"], r["dtype"]), {})[r["impl"]] = r["fwd_bwd_ms"]
    lines = []
    for (case, dtype), times in by_key.items():
        if "cuda" not in times or len(times) < 2:
            continue
        best = min(times, key=times.get)
        ratios = ", ".join(f"{k.removeprefix('cuda:')} x{times[k] / times['cuda']:.2f}" for k in times if k != "cuda")
        flag = f" **{best.removeprefix('cuda:')} is faster: consider it as the default**" if (
            best != "cuda" and times[best] < 0.97 * times["cuda"]) else ""
        lines.append(f"- {case} {dtype}: time against the defaults: {ratios}.{flag}")
    return ["", "Launch settings (`DETR_MSDA_CUDA_TUNING`, forward + backward time / the defaults' time):", "",
            *lines] if lines else []


def report(out: Path, log: dict, results: dict, smoke: bool) -> str:
    lines = [f"# tools/gpu_bench.py ({time.strftime('%Y-%m-%d')}{', smoke run on CPU' if smoke else ''})", ""]
    device = next((r.get("device_name") or r.get("device") for r in results.values() if isinstance(r, dict)
                   and (r.get("device_name") or r.get("device"))), "?")
    lines += [f"Device: {device}", "", "| step | status | s |", "|---|---|---|"]
    lines += [f"| {k} | {v['status']} | {v['seconds']} |" for k, v in log.items()]
    msda = results.get("msda.json")
    if msda:
        official = {(r["case"], r["locations"]): r for r in msda["results"] if r["impl"] == "official"}
        lines += ["", "## Deformable-attention op (median ms; targets: encoder forward <= 0.150, backward <= 0.500, "
                  "decoder forward + backward <= the official kernel's, timed in the same run where it was built; "
                  "the H200 run of 2026-12-04 gave it 0.13 / 0.19 at 300 / 900 queries)", "",
                  "| case | impl | dtype | forward | forward + backward | backward | official fp32 f+b / this f+b |",
                  "|---|---|---|---|---|---|---|"]
        for r in msda["results"]:
            theirs = official.get((r["case"], r["locations"]))
            ratio = f"{theirs['fwd_bwd_ms'] / r['fwd_bwd_ms']:.2f}" if theirs and r["impl"] != "official" else ""
            lines.append(f"| {r['case']} | {r['impl']} | {r['dtype']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
                         f"{r['fwd_bwd_ms'] - r['fwd_ms']:.3f} | {ratio} |")
        lines += launch_verdict(msda["results"])
        ours = [a for a in msda.get("agreement_with_official", []) if a["impl"] in ("cuda", "cpu")]
        if ours:
            worst = {k: max(a[k] for a in ours) for k in ("output", "grad_value", "grad_loc", "grad_attn")}
            lines += ["", "Our kernel against the official one on the same inputs (max |difference| / max |official|, "
                      "worst case): " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()) + "."]
    models = [k for k in results if k.startswith(("r50", "small", "dino")) and results[k]]
    if models:
        lines += ["", "## Training step and inference (targets: R50 two-stage + refine bf16 step <= 100 ms; the small "
                  "model <= 50 ms; bf16 faster than fp32; a step's added rows are timed in turns with its first, "
                  "speed-ups against it)", "",
                  "| configuration | train ms/step | inference img/s | peak MiB | train speed-up "
                  "| inference speed-up |",
                  "|---|---|---|---|---|---|"]
        for k in models:
            rows = results[k]["results"]
            first = next(iter(rows.values()))
            for i, (label, r) in enumerate(rows.items()):
                name = k.removesuffix(".json") + (f" + `{label}`" if i else "")
                speed = (f"{fmt(first['train_step_s'] / r['train_step_s'], 1, 2)} | "
                         f"{fmt(r['infer_img_s'] / first['infer_img_s'], 1, 2)}") if i else " | "
                lines.append(f"| {name} | {fmt(r['train_step_s'], 1e3, 1)} | {fmt(r['infer_img_s'])} "
                             f"| {fmt(r['peak_mem_mib'], 1, 0)} | {speed} |")
    profiled = [(k, next(iter(results[k]["results"].values())).get("profile")) for k in models]
    profiled = [(k, p) for k, p in profiled if p]
    if profiled:
        lines += ["", "## Where the step's time goes (ms per step; host / device time of each phase, profile_*.md: the "
                  "top kernels)", "", "| configuration | forward | loss | backward | optimizer | step wall under the "
                  "profiler | device busy |", "|---|---|---|---|---|---|---|"]
        for k, p in profiled:
            cells = " | ".join(f"{fmt(p[f'{ph}_host_ms'], 1, 1)} / {fmt(p[f'{ph}_device_ms'], 1, 1)}"
                               for ph in ("forward", "loss", "backward", "optimizer"))
            lines.append(f"| {k.removesuffix('.json')} | {cells} | {fmt(p['profiled_wall_ms'], 1, 1)} | "
                         f"{fmt(p['device_busy_ms'], 1, 1)} |")
    addons = [k for k in results if k.startswith("addon_") and results[k]]
    if addons:
        lines += ["", "## Add-on cost, side by side (R50 two-stage + refine; goals: MS-DETR <= 1.15x)", "",
                  "| add-on | flags | baseline ms/step | with it ms/step | ratio |", "|---|---|---|---|---|"]
        for k in addons:
            r = results[k]
            lines.append(f"| {k.removeprefix('addon_').removesuffix('.json')} | `{r['addon_flags']}` | "
                         f"{r['a_s'] * 1e3:.1f} | {r['b_s'] * 1e3:.1f} | {r['ratio']:.2f} |")
    step = results.get("official_step.json")
    if step:
        lines += ["", "## Training step against the official code (tools/compare_official_step.py: same weights, "
                  "batch and targets, fp32, alternating rounds; s/step)", "",
                  "| configuration | official | ours, official's grid_sample op | ours | official / ours |",
                  "|---|---|---|---|---|"]
        for r in step["results"]:
            lines.append(f"| {r['config']} (batch {r['batch']}, {r['size'][0]}x{r['size'][1]}) | "
                         f"{r['official_s']:.4f} | {r['ours_pytorch_op_s']:.4f} | {r['ours_s']:.4f} | "
                         f"{r['official_s'] / r['ours_s']:.2f} |")
    nms = results.get("nms.json")
    if nms:
        lines += ["", "## Co-DETR's RPN proposals: device NMS against torchvision's image by image (ms, ending with "
                  "one sync; tools/benchmark_nms.py)", "", "| case | candidates per image | device NMS | torchvision "
                  "| torchvision / device | rounds needed (default) | same proposals |",
                  "|---|---|---|---|---|---|---|"]
        for r in nms["results"]:
            lines.append(f"| {r['case']} (batch {r['batch']}) | {sum(r['candidates'])} | {r['device_ms']:.2f} | "
                         f"{r['torchvision_ms']:.2f} | {r['ratio']:.2f} | {r['rounds_needed']} ({r['default_rounds']}) "
                         f"| {r['same_proposals']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/gpu_bench")
    p.add_argument("--budget", type=float, default=330, help="seconds; steps that would start later are skipped")
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of every step (checks the wiring)")
    p.add_argument("--only", nargs="*", help="run only these steps")
    p.add_argument("--official_op", help="the official kernel built by tools/build_official_op.py: timed beside ours")
    p.add_argument("--official", help="a checkout of the official code (with --official_op): its step beside ours")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    start, log, results = time.time(), {}, {}
    for name, cmd, limit, json_file in plan(args.smoke, args.official_op, args.official):
        if args.only and name not in args.only:
            continue
        left = args.budget - (time.time() - start)
        if left < 10:
            log[name] = {"status": "skipped (budget spent)", "seconds": 0, "command": ""}
            continue
        run(name, [c.replace("{out}", str(out)) for c in cmd], out, min(limit, left), log)
        if json_file:
            results[json_file] = load(out / json_file)
    (out / "gpu_bench.json").write_text(json.dumps({"steps": log, "results": results}, indent=1))
    (out / "gpu_bench.md").write_text(report(out, log, results, args.smoke))
    print((out / "gpu_bench.md").read_text())


if __name__ == "__main__":
    main()
