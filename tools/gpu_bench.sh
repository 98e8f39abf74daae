#!/usr/bin/env bash
# The GPU benchmark in one command (about 7 minutes on one H100/H200: the builds, then --budget 330 s of steps):
# builds the deformable-attention op for this GPU's architecture only (and the official one beside it where
# .official/ is there), then runs tools/gpu_bench.py (CUDA tests, the op on the encoder/decoder shapes in
# fp32/bf16, R50 two-stage + refine 800x1333 batch 2 in fp32, bf16 and bf16 + --compile, DINO-4scale with
# denoising, the small demo model, every add-on's side-by-side cost, Co-DETR's device NMS against torchvision's).
# Results: OUT/gpu_bench.md and .json.
#   bash tools/gpu_bench.sh [OUT]      (default outputs/gpu_bench; extra arguments go to gpu_bench.py)
# On a lent GPU machine (no pycocotools there, no network): bash tools/device_wheels.sh and
# bash tools/device_official.sh PATH here first, then run this there with .whl and .official carried:
#   RETURN_DIR=$OUT bash tools/gpu_bench.sh /tmp/gb
# At the end, whatever happened, every output is packed into OUT/gpu_bench_all.tar.gz, and with RETURN_DIR set the
# report, its JSON and that archive are copied there (a lent machine returns 8 files at most).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-outputs/gpu_bench}
shift || true
# the Python that has torch (python3 on the lent machines)
PY=${PYTHON:-$(for p in python3 python; do command -v $p > /dev/null && $p -c "import torch" 2>/dev/null && echo $p && break; done)}
PY=${PY:-python3}
mkdir -p "$OUT"
pack() {
    tar -czf /tmp/gpu_bench_all.tar.gz -C "$OUT" --exclude=gpu_bench_all.tar.gz . && mv /tmp/gpu_bench_all.tar.gz "$OUT/"
    if [ -n "${RETURN_DIR:-}" ]; then
        mkdir -p "$RETURN_DIR"
        for f in gpu_bench.md gpu_bench.json gpu_bench_all.tar.gz; do [ -f "$OUT/$f" ] && cp "$OUT/$f" "$RETURN_DIR/"; done
    fi
    return 0
}
trap pack EXIT
# pycocotools (imported by the data and training tools) is not on the lent GPU machines: tools/device_wheels.sh puts
# its wheel in .whl/ here, the device run carries .whl and it is installed for this run
if ! $PY -c "import pycocotools" 2>/dev/null && compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import pycocotools" 2>/dev/null || { echo "pycocotools is missing: run tools/device_wheels.sh here and carry .whl"; exit 1; }
ARCH=$($PY -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
# The official kernel beside ours (tools/device_official.sh here put its code in .official/, carried): built at the
# same time as ours, into /tmp/official_op; without it ours is timed alone.
OFFICIAL=.official/Deformable-DETR
OFFICIAL_PID=
if [ -f "$OFFICIAL/models/ops/src/cuda/ms_deform_attn_cuda.cu" ]; then
    TORCH_CUDA_ARCH_LIST="$ARCH" $PY tools/build_official_op.py "$OFFICIAL" /tmp/official_op > "$OUT/official_build.txt" 2>&1 &
    OFFICIAL_PID=$!
else
    echo "no $OFFICIAL (run tools/device_official.sh PATH here and carry .official): our op is timed alone"
fi
echo "building the op for sm_${ARCH/./} only"
start=$(date +%s)
(cd models/ops && TORCH_CUDA_ARCH_LIST="$ARCH" FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} $PY setup.py build_ext --inplace) \
    > "$OUT/build.txt" 2>&1 || { tail -30 "$OUT/build.txt"; echo "op build failed: $OUT/build.txt"; exit 1; }
echo "op built in $(( $(date +%s) - start )) s"
OFFICIAL_ARGS=()
if [ -n "$OFFICIAL_PID" ]; then
    if wait "$OFFICIAL_PID"; then
        echo "official op built ($(( $(date +%s) - start )) s after the start of ours)"
        OFFICIAL_ARGS=(--official_op /tmp/official_op --official "$OFFICIAL")
    else
        tail -15 "$OUT/official_build.txt"; echo "the official op did not build ($OUT/official_build.txt): ours is timed alone"
    fi
fi
$PY tools/gpu_bench.py --out "$OUT" ${OFFICIAL_ARGS[@]+"${OFFICIAL_ARGS[@]}"} "$@"
