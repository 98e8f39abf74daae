"""Benchmark multi-scale deformable attention: every implementation side by side, in one run.

Shapes from specs/performance.md (M=8 heads, D=32, L=4 levels, P=4 points unless noted):
  cpu-enc        320x512 image, batch 1, encoder (Lq = S = 3400)      the CPU-sized case
  cpu-dec300/900 same value map, 300 / 900 decoder queries
  enc            800x1333, batch 2, encoder (Lq = S = 22223)           Deformable-DETR R50
  dec300/dec900  800x1333, batch 2, 300 / 900 decoder queries
  dcnv4          batch 1, 100x152 base level, Lq = 15200, P = 8         (the DCNv4 #106 shape)
  b8-640         640x640, batch 8, encoder (S = 8500)                   throughput case
Locations: "encoder" (reference at the query's own position plus offsets of a few cells, as a
trained encoder samples) and "random" (uniform in [0, 1], the worst case for caches).

Reports forward and forward+backward time (median; CPU: perf_counter, GPU: CUDA events), the
speed-up over the pure-PyTorch reference, peak memory of one forward+backward above its inputs
(GPU: allocator peak; CPU on Linux: peak RSS), and ns per sample on CPU or, on GPU, the fraction
of the memory-traffic floor (compulsory bytes at the measured device-to-device copy bandwidth).

    python tools/benchmark_msda.py                        # CPU cases, or GPU cases with a GPU
    python tools/benchmark_msda.py --cases cpu-enc --repeats 15 --json out.json
    python tools/benchmark_msda.py --cases dec300 --tunings point_lanes=1 "point_lanes=1,bwd_vec_bytes=16"

--tunings adds the CUDA kernel under other launch settings (DETR_MSDA_CUDA_TUNING, see
models/ops/src/cuda/ms_deform_attn_cuda.cu), named "cuda:<setting>", side by side with its defaults.
--official_op DIR adds the official Deformable-DETR kernel as built by tools/build_official_op.py (impl
"official", fp32 and fp64 only, as the original), side by side with ours, and reports how far each of our
implementations is from it on the same inputs (output and the three gradients, relative to the largest value).
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from models.ops.functions.ms_deform_attn_func import available_impls, ms_deform_attn  # noqa: E402

# name: (batch, image height, image width, queries (None: encoder, Lq = S), heads, head dim, levels, points)
CASES = {
    "cpu-enc": (1, 320, 512, None, 8, 32, 4, 4),
    "cpu-dec300": (1, 320, 512, 300, 8, 32, 4, 4),
    "cpu-dec900": (1, 320, 512, 900, 8, 32, 4, 4),
    "enc": (2, 800, 1333, None, 8, 32, 4, 4),
    "dec300": (2, 800, 1333, 300, 8, 32, 4, 4),
    "dec900": (2, 800, 1333, 900, 8, 32, 4, 4),
    "dcnv4": (1, 800, 1216, 15200, 8, 32, 4, 8),
    "b8-640": (8, 640, 640, None, 8, 32, 4, 4),
}
DEFAULT_CASES = {"cpu": ["cpu-enc", "cpu-dec300", "cpu-dec900"], "cuda": ["enc", "dec300", "dec900", "dcnv4", "b8-640"]}


@dataclass
class Result:
    case: str
    impl: str
    dtype: str
    locations: str
    samples: int
    fwd_ms: float
    fwd_bwd_ms: float
    peak_mb: float | None
    ns_per_sample: float | None = None
    floor_fraction_fwd: float | None = None
    floor_fraction_fwd_bwd: float | None = None


def level_shapes(height: int, width: int, levels: int) -> list[tuple[int, int]]:
    """Feature map sizes at strides 8, 16, 32, 64 (ResNet ceil division)."""
    shapes, h, w = [], height, width
    for _ in range(3):
        h, w = (h + 1) // 2, (w + 1) // 2
    for _ in range(levels):
        shapes.append((h, w))
        h, w = (h + 1) // 2, (w + 1) // 2
    return shapes


def make_inputs(case: str, dtype: torch.dtype, locations: str, device: str, seed: int = 0):
    batch, height, width, len_q, heads, head_dim, levels, points = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    shapes = torch.tensor(level_shapes(height, width, levels), dtype=torch.long)
    sizes = shapes.prod(1)
    starts = torch.cat([sizes.new_zeros(1), sizes.cumsum(0)[:-1]])
    len_in = int(sizes.sum())
    len_q = len_in if len_q is None else len_q
    value = torch.randn(batch, len_in, heads, head_dim, generator=gen)
    if locations == "random":
        loc = torch.rand(batch, len_q, heads, levels, points, 2, generator=gen)
    else:
        if len_q == len_in:  # encoder: each query sits at its own token's centre
            ref = torch.cat([torch.stack(torch.meshgrid((torch.arange(w) + 0.5) / w, (torch.arange(h) + 0.5) / h,
                                                        indexing="xy"), -1).reshape(-1, 2) for h, w in shapes.tolist()])
            ref = ref[None].expand(batch, -1, -1)
        else:
            ref = torch.rand(batch, len_q, 2, generator=gen)
        # Offsets in cells of the sampled level: the module's initial rays plus noise.
        angle = torch.arange(heads) * (2 * torch.pi / heads)
        ray = torch.stack([angle.cos(), angle.sin()], -1)
        ray = ray / ray.abs().max(-1, keepdim=True)[0]
        offsets = ray[:, None, None] * torch.arange(1, points + 1)[None, None, :, None]
        offsets = offsets + torch.randn(batch, len_q, heads, levels, points, 2, generator=gen)
        cells = torch.stack([shapes[:, 1], shapes[:, 0]], -1).float()[:, None]
        loc = ref[:, :, None, None, None] + offsets / cells
    attn = torch.randn(batch, len_q, heads, levels * points, generator=gen).softmax(-1)
    attn = attn.view(batch, len_q, heads, levels, points)
    return value.to(device, dtype), shapes.to(device), starts.to(device), loc.to(device), attn.to(device)


TUNING_VARIABLE = "DETR_MSDA_CUDA_TUNING"
# The official kernel (--official_op): its autograd Function, and the im2col step its module passes (64)
OFFICIAL = {"function": None, "im2col_step": 64}
OFFICIAL_DTYPES = (torch.float32, torch.float64)


def load_official(build_dir: str) -> None:
    """The official op's Python wrapper and extension, from tools/build_official_op.py's folder."""
    sys.path.insert(0, os.path.abspath(build_dir))
    from functions.ms_deform_attn_func import MSDeformAttnFunction  # noqa: PLC0415 (the official package)
    OFFICIAL["function"] = MSDeformAttnFunction


@contextlib.contextmanager
def implementation(impl: str):
    """The op of an implementation, ``op(value, shapes, starts, loc, attn)``: ours by name (``cuda:<setting>``: with
    that launch setting, for the forward and backward run inside the block) or "official"."""
    if impl == "official":
        yield lambda *inputs: OFFICIAL["function"].apply(*inputs, OFFICIAL["im2col_step"])
        return
    with launch_settings(impl) as name:
        yield lambda *inputs: ms_deform_attn(*inputs, impl=name)


@contextlib.contextmanager
def launch_settings(impl: str):
    """For "cuda:<setting>", the CUDA kernel's launch setting in the environment (read at every call)."""
    _, _, setting = impl.partition(":")
    previous = os.environ.get(TUNING_VARIABLE)
    if setting:
        os.environ[TUNING_VARIABLE] = setting
    else:
        os.environ.pop(TUNING_VARIABLE, None)
    try:
        yield impl.partition(":")[0]
    finally:
        if previous is None:
            os.environ.pop(TUNING_VARIABLE, None)
        else:
            os.environ[TUNING_VARIABLE] = previous


class Timer:
    """Median wall time of a callable: CUDA events on GPU, perf_counter on CPU."""

    def __init__(self, device: str) -> None:
        self.device = device

    def once(self, fn) -> float:
        if self.device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        begin = time.perf_counter()
        fn()
        return (time.perf_counter() - begin) * 1e3


def memory_peak_mb(fn, device: str) -> float | None:
    """Peak memory of one call above what was allocated before it."""
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    if platform.system() != "Linux":
        return None
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets the peak RSS (VmHWM)
    except OSError:
        return None

    def status(key: str) -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

    base = status("VmRSS:")
    fn()
    return (status("VmHWM:") - base) / 2**20


def release_freed_cpu_memory_at_once() -> None:
    """Fix glibc's mmap threshold and return the free heap, so that every large buffer is fresh
    pages, freed at once: peak RSS is then exact. Allocation gets slower, so only after the timings."""
    if platform.system() == "Linux":
        try:
            libc = ctypes.CDLL("libc.so.6")
            libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
            libc.malloc_trim(0)
        except (OSError, AttributeError):
            pass


def copy_bandwidth(device: str) -> float:
    """Device-to-device copy bandwidth in bytes/s (read + write), the practical traffic ceiling."""
    src = torch.empty(2**28, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timer = Timer(device)
    for _ in range(3):
        dst.copy_(src)
    ms = statistics.median(timer.once(lambda: dst.copy_(src)) for _ in range(20))
    return 2 * src.numel() / (ms * 1e-3)


def compulsory_bytes(inputs, backward: bool) -> int:
    """Bytes every implementation must move: read the inputs once, write the outputs once."""
    value, _, _, loc, attn = inputs
    out = value.numel() // value.shape[1] * loc.shape[1] * value.element_size()
    fwd = value.numel() * value.element_size() + loc.numel() * 4 + attn.numel() * 4 + out
    if not backward:
        return fwd
    # + read grad_out; write grad_value, grad_loc, grad_attn
    return fwd + out + value.numel() * value.element_size() + loc.numel() * 4 + attn.numel() * 4


def case_functions(case: str, dtype: torch.dtype, locations: str, impls: list[str], device: str):
    """Inputs, and forward / forward+backward calls by implementation name."""
    inputs = make_inputs(case, dtype, locations, device)
    value, shapes, starts, loc, attn = inputs
    leaves = {impl: [t.detach().clone().requires_grad_() for t in (value, loc, attn)] for impl in impls}
    grad = torch.randn(value.shape[0], loc.shape[1], value.shape[2] * value.shape[3], device=device, dtype=dtype)

    def forward(impl: str):
        with torch.no_grad(), implementation(impl) as op:
            return op(value, shapes, starts, loc, attn)

    def forward_backward(impl: str, keep: bool = False):
        v, lc, a = leaves[impl]
        with implementation(impl) as op:
            out = op(v, shapes, starts, lc, a)
            torch.autograd.backward(out, grad, inputs=[v, lc, a])
        grads = (out.detach(), v.grad, lc.grad, a.grad) if keep else None
        v.grad = lc.grad = a.grad = None
        return grads

    return inputs, forward, forward_backward


def agreement_with_official(case: str, dtype: torch.dtype, locations: str, impls: list[str], device: str) -> list[dict]:
    """How far each implementation is from the official kernel on the same inputs: max |ours - official| of the
    output and the value, location and weight gradients, over the official tensor's largest magnitude."""
    _, _, forward_backward = case_functions(case, dtype, locations, impls, device)
    theirs = forward_backward("official", keep=True)
    rows = []
    for impl in impls:
        if impl == "official":
            continue
        ours = forward_backward(impl, keep=True)
        diff = {name: float((o.double() - t.double()).abs().max() / t.double().abs().max().clamp_min(1e-30))
                for name, o, t in zip(("output", "grad_value", "grad_loc", "grad_attn"), ours, theirs)}
        rows.append({"case": case, "impl": impl, "dtype": str(dtype).replace("torch.", ""), "locations": locations,
                     **diff})
    return rows


def bench_case(case: str, dtype: torch.dtype, locations: str, impls: list[str], device: str, warmup: int,
               repeats: int, bandwidth: float | None) -> list[Result]:
    impls = [i for i in impls if i != "official" or dtype in OFFICIAL_DTYPES]
    inputs, forward, forward_backward = case_functions(case, dtype, locations, impls, device)
    samples = inputs[3].numel() // 2
    timer = Timer(device)
    times = {(impl, kind): [] for impl in impls for kind in ("fwd", "fwd_bwd")}
    for impl in impls:
        for _ in range(warmup):
            forward(impl)
            forward_backward(impl)
    # Round-robin over implementations, so that a change of machine load hits all of them alike.
    for _ in range(repeats):
        for impl in impls:
            times[(impl, "fwd")].append(timer.once(lambda impl=impl: forward(impl)))
            times[(impl, "fwd_bwd")].append(timer.once(lambda impl=impl: forward_backward(impl)))
    results = []
    for impl in impls:
        fwd, fwd_bwd = statistics.median(times[(impl, "fwd")]), statistics.median(times[(impl, "fwd_bwd")])
        result = Result(case, impl, str(dtype).replace("torch.", ""), locations, samples, fwd, fwd_bwd, None)
        if device == "cpu":
            result.ns_per_sample = fwd * 1e6 / samples
        elif bandwidth:
            result.floor_fraction_fwd = compulsory_bytes(inputs, False) / bandwidth * 1e3 / fwd
            result.floor_fraction_fwd_bwd = compulsory_bytes(inputs, True) / bandwidth * 1e3 / fwd_bwd
        results.append(result)
    return results


def measure_memory(results: list[Result], device: str) -> None:
    """Fills in peak_mb, after all timings (on CPU the allocator setting it needs slows allocation)."""
    for result in results:
        _, _, forward_backward = case_functions(result.case, getattr(torch, result.dtype), result.locations,
                                                [result.impl], device)
        forward_backward(result.impl)
        if device == "cpu":
            release_freed_cpu_memory_at_once()
        result.peak_mb = memory_peak_mb(lambda fn=forward_backward, r=result: fn(r.impl), device)


def print_table(results: list[Result]) -> None:
    ref = {(r.case, r.dtype, r.locations): r for r in results if r.impl == "pytorch"}
    width = max([8] + [len(r.impl) + 1 for r in results])
    head = (f"{'case':<11}{'locations':<10}{'dtype':<9}{'impl':<{width}}{'fwd ms':>9}{'fwd+bwd ms':>11}"
            f"{'x fwd':>8}{'x f+b':>8}{'peak MB':>9}  {'ns/sample or % of floor (fwd, fwd+bwd)'}")
    print(head)
    print("-" * len(head))
    for r in results:
        base = ref.get((r.case, r.dtype, r.locations))
        speed = (f"{base.fwd_ms / r.fwd_ms:>8.1f}{base.fwd_bwd_ms / r.fwd_bwd_ms:>8.1f}" if base else f"{'':>16}")
        peak = f"{r.peak_mb:>9.1f}" if r.peak_mb is not None else f"{'n/a':>9}"
        if r.ns_per_sample is not None:
            extra = f"{r.ns_per_sample:.1f} ns/sample"
        elif r.floor_fraction_fwd is not None:
            extra = f"{100 * r.floor_fraction_fwd:.0f}%, {100 * r.floor_fraction_fwd_bwd:.0f}%"
        else:
            extra = ""
        print(f"{r.case:<11}{r.locations:<10}{r.dtype:<9}{r.impl:<{width}}{r.fwd_ms:>9.3f}{r.fwd_bwd_ms:>11.3f}"
              f"{speed}{peak}  {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), help="default: the device's cases")
    parser.add_argument("--impls", nargs="+", choices=["pytorch", "cpu", "cuda"],
                        help="default: every implementation available on the device")
    parser.add_argument("--tunings", nargs="+", default=[],
                        help="also time the CUDA kernel under these DETR_MSDA_CUDA_TUNING settings, e.g. point_lanes=1")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=["float32", "float16", "bfloat16"],
                        help="default: float32 on CPU, float32 and bfloat16 on GPU")
    parser.add_argument("--locations", nargs="+", default=["encoder", "random"], choices=["encoder", "random"])
    parser.add_argument("--warmup", type=int, default=None, help="default: 2 on CPU, 20 on GPU")
    parser.add_argument("--repeats", type=int, default=None, help="default: 7 on CPU, 100 on GPU")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--official_op", metavar="DIR",
                        help="also the official kernel, built in DIR by tools/build_official_op.py (fp32 cases)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    impls = args.impls or available_impls(args.device)[::-1]  # reference first
    if args.tunings:
        if "cuda" not in available_impls(args.device):
            parser.error("--tunings needs the CUDA kernel on a CUDA device")
        impls = impls + [f"cuda:{setting}" for setting in args.tunings]
    if args.official_op:
        load_official(args.official_op)
        impls = impls + ["official"]
    dtypes = [getattr(torch, d) for d in (args.dtypes or (["float32", "bfloat16"] if gpu else ["float32"]))]
    warmup = args.warmup if args.warmup is not None else (20 if gpu else 2)
    repeats = args.repeats if args.repeats is not None else (100 if gpu else 7)
    bandwidth = copy_bandwidth("cuda") if gpu else None
    device_name = torch.cuda.get_device_name() if gpu else f"{platform.processor() or platform.machine()} CPU"
    print(f"torch {torch.__version__}, {device_name}, {torch.get_num_threads()} threads, implementations {impls}, "
          f"load average {os.getloadavg()[0]:.1f}" + (f", copy bandwidth {bandwidth / 1e9:.0f} GB/s" if gpu else ""))
    results, agreement = [], []
    for case in args.cases or DEFAULT_CASES[args.device]:
        for dtype in dtypes:
            for locations in args.locations:
                results += bench_case(case, dtype, locations, impls, args.device, warmup, repeats, bandwidth)
                if args.official_op and dtype in OFFICIAL_DTYPES:
                    agreement += agreement_with_official(case, dtype, locations, impls, args.device)
    measure_memory(results, args.device)
    print_table(results)
    if agreement:
        print("\nagainst the official kernel, same inputs (max |difference| / max |official|):")
        for a in agreement:
            print(f"{a['case']:<11}{a['locations']:<10}{a['dtype']:<9}{a['impl']:<12}output {a['output']:.1e}  "
                  f"grad value {a['grad_value']:.1e}  grad loc {a['grad_loc']:.1e}  grad attn {a['grad_attn']:.1e}")
    print(f"load average at the end {os.getloadavg()[0]:.1f} (times are medians of {repeats}, implementations "
          "interleaved; x = speed-up over pytorch)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name, "threads": torch.get_num_threads(), "torch": torch.__version__,
                       "results": [asdict(r) for r in results], "agreement_with_official": agreement}, f, indent=1)


if __name__ == "__main__":
    main()
