#!/usr/bin/env bash
# DETR-DC5 R50 (dilated last stage, batch 1 per GPU as the official DC5 runs; 500 epochs, lr drop at 400; COCO AP 43.3)
set -x

EXP_DIR=exps/detr/r50_detr_dc5
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m detr \
    --dilation \
    --batch_size 1 \
    --epochs 500 \
    --lr_drop 400 \
    ${PY_ARGS}
