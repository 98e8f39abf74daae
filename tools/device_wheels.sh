#!/usr/bin/env bash
# The wheels a lent GPU machine lacks (its image has torch, torchvision, timm, scipy, numpy, but not pycocotools,
# which the data and training tools import), downloaded here into .whl/ (git-ignored through .git/info/exclude)
# for the device's Python (3.12, manylinux x86-64). tools/gpu_bench.sh installs them there when it finds .whl/.
#   bash tools/device_wheels.sh            then, on the device:  carry [".whl"], command "bash tools/gpu_bench.sh $OUT/gb"
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "pycocotools>=2.0.7"
ls -l .whl
