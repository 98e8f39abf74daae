#!/usr/bin/env bash
# DETR R101 (500 epochs, lr drop at 400, batch 2 per GPU; COCO AP 43.5)
set -x

EXP_DIR=exps/detr/r101_detr
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m detr \
    --backbone resnet101 \
    --epochs 500 \
    --lr_drop 400 \
    ${PY_ARGS}
