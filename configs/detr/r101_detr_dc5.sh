#!/usr/bin/env bash
# DETR-DC5 R101 (batch 1 per GPU; 500 epochs, lr drop at 400; COCO AP 44.9)
set -x

EXP_DIR=exps/detr/r101_detr_dc5
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m detr \
    --backbone resnet101 \
    --dilation \
    --batch_size 1 \
    --epochs 500 \
    --lr_drop 400 \
    ${PY_ARGS}
