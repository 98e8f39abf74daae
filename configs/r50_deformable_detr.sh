#!/usr/bin/env bash
# Deformable-DETR R50, official recipe (50 epochs, lr drop at 40)
set -x

EXP_DIR=exps/r50_deformable_detr
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    ${PY_ARGS}
