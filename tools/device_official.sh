#!/usr/bin/env bash
# The official Deformable-DETR code for a lent GPU machine (which cannot download it): a clone or mirror of
# fundamentalvision/Deformable-DETR, exported into .official/Deformable-DETR (git-ignored through
# .git/info/exclude; nothing of it enters the repository). tools/gpu_bench.sh then builds its CUDA op
# (tools/build_official_op.py) and times it and its training step beside ours.
#   bash tools/device_official.sh PATH       then, on the device: carry [".whl", ".official"]
set -euo pipefail
SRC=${1:?usage: bash tools/device_official.sh PATH (a clone, or a bare mirror, of fundamentalvision/Deformable-DETR)}
cd "$(dirname "$0")/.."
grep -qx '/.official/' .git/info/exclude 2>/dev/null || echo '/.official/' >> .git/info/exclude
rm -rf .official/Deformable-DETR
mkdir -p .official/Deformable-DETR
if git -C "$SRC" rev-parse --git-dir > /dev/null 2>&1; then
    git -C "$SRC" archive --format=tar HEAD | tar -x -C .official/Deformable-DETR
    echo "$(git -C "$SRC" rev-parse HEAD)" > .official/Deformable-DETR/COMMIT
else
    cp -r "$SRC"/. .official/Deformable-DETR/
    rm -rf .official/Deformable-DETR/.git
fi
[ -f .official/Deformable-DETR/models/ops/src/cuda/ms_deform_attn_cuda.cu ] || {
    echo "$SRC: not fundamentalvision/Deformable-DETR (no models/ops/src/cuda/ms_deform_attn_cuda.cu)"; exit 1; }
du -sh .official/Deformable-DETR
