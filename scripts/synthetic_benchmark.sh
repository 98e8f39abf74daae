#!/usr/bin/env bash
# Train every configuration of scripts/synthetic_benchmark.txt for the same budget on the synthetic
# data set and print a table of COCO AP / AP50 / AP75 and step time. Extra flags go to the tool, e.g.
#   bash scripts/synthetic_benchmark.sh --only deformable_detr --budget "--epochs 2 --lr_drop 1"
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/synthetic_benchmark.py "$@"
