"""Time and memory of loading teacher-box files (Teach-DETR), at COCO scale by default.

    python tools/benchmark_teacher_load.py                      # 118,287 images, 2 teachers, 12 M boxes
    python tools/benchmark_teacher_load.py --boxes 3000000 --json_load   # smaller, and plain json.load beside it

Writes one synthetic file per teacher (random boxes, ``--format`` released or coco) to a temporary folder, then
loads them in a fresh process with ``datasets.teacher_boxes.load_teacher_boxes`` (as the training set does) and
reports the load time (wall and CPU), the peak RSS of that process (and its RSS before loading) and the bytes of
the arrays.
``--json_load`` also measures a plain ``json.load`` of the first file in another fresh process (the released
code's way). The files are removed unless ``--keep``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from datasets.teacher_boxes import Detections, write_teacher_file  # noqa: E402

# Peak RSS of the process itself: VmHWM (ru_maxrss would include the parent's peak, inherited at fork).
PEAK = """
def peak_kb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""
LOAD = PEAK + """
import json, sys, time
sys.path.insert(0, {root!r})
import numpy as np
from datasets.teacher_boxes import load_teacher_boxes
files, images = json.loads(sys.argv[1]), int(sys.argv[2])
ids = np.arange(1, images + 1)
before = peak_kb()
start, cpu = time.time(), time.process_time()
tb = load_teacher_boxes(files, ids, sizes=np.full((images, 2), 640), category_ids=list(range(1, 91)))
seconds, cpu = time.time() - start, time.process_time() - cpu
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu, "rss_before_kb": before, "peak_rss_kb": peak_kb(),
                  "nbytes": tb.nbytes, "boxes": len(tb), "images": len(tb.image_ids)}}))
"""
JSON_LOAD = PEAK + """
import json, sys, time
before = peak_kb()
start = time.time()
with open(sys.argv[1]) as f:
    data = json.load(f)
print(json.dumps({"seconds": time.time() - start, "rss_before_kb": before, "peak_rss_kb": peak_kb()}))
"""


def synthetic_detections(num_boxes: int, num_images: int, seed: int) -> Detections:
    """Random COCO-like detections: image ids 1..num_images, boxes inside 640 x 640, 80 classes, 2-decimal values."""
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.integers(1, num_images + 1, num_boxes))
    xy = rng.random((num_boxes, 2)) * 600
    wh = 1 + rng.random((num_boxes, 2)) * (640 - xy - 1)
    boxes = np.round(np.concatenate([xy, wh], axis=1), 2).astype(np.float32)
    return Detections(ids.astype(np.int64), boxes, rng.integers(1, 91, num_boxes).astype(np.int64),
                      np.round(rng.random(num_boxes), 4).astype(np.float32))


def _run(code: str, *argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *argv], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--boxes", type=int, default=12_000_000, help="boxes over all teachers")
    p.add_argument("--images", type=int, default=118_287, help="images (COCO train2017: 118,287)")
    p.add_argument("--teachers", type=int, default=2)
    p.add_argument("--format", default="released", choices=("released", "coco"))
    p.add_argument("--dir", default=None, help="where to write the files (default: a temporary folder)")
    p.add_argument("--keep", action="store_true", help="keep the files")
    p.add_argument("--reuse", action="store_true", help="with --dir: load the files a --keep run left there")
    p.add_argument("--json_load", action="store_true", help="also measure a plain json.load of one file")
    args = p.parse_args()
    folder = Path(args.dir or tempfile.mkdtemp(prefix="teacher_bench_"))
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    start = time.time()
    for t in range(args.teachers):
        path = folder / f"teacher{t}.json"
        if not (args.reuse and path.is_file()):
            write_teacher_file(path, synthetic_detections(args.boxes // args.teachers, args.images, t), args.format)
        files[f"teacher{t}"] = str(path)
    size = sum(Path(f).stat().st_size for f in files.values())
    print(f"wrote {args.teachers} file(s), {size / 2**20:.0f} MiB, {args.boxes:,} boxes on {args.images:,} images "
          f"({args.format}) in {time.time() - start:.0f} s")
    try:
        r = _run(LOAD.format(root=str(ROOT)), json.dumps(files), str(args.images))
        print(f"load_teacher_boxes: {r['seconds']:.1f} s ({r['cpu_seconds']:.1f} s CPU), "
              f"peak RSS {r['peak_rss_kb'] / 2**20:.2f} GiB (before "
              f"loading {r['rss_before_kb'] / 2**20:.2f} GiB), arrays {r['nbytes'] / 2**20:.0f} MiB "
              f"({r['nbytes'] / max(r['boxes'], 1):.1f} bytes/box), {r['boxes']:,} boxes on {r['images']:,} images")
        if args.json_load:
            first = next(iter(files.values()))
            j = _run(JSON_LOAD, first)
            print(f"plain json.load of {Path(first).name} ({Path(first).stat().st_size / 2**20:.0f} MiB): "
                  f"{j['seconds']:.1f} s, peak RSS {j['peak_rss_kb'] / 2**20:.2f} GiB")
    finally:
        if not args.keep:
            for f in files.values():
                Path(f).unlink(missing_ok=True)
            if args.dir is None:
                folder.rmdir()


if __name__ == "__main__":
    main()
