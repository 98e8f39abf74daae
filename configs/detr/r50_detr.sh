#!/usr/bin/env bash
# DETR R50, the model-zoo recipe (facebookresearch/detr: 500 epochs, lr drop at 400, batch 2 per GPU; COCO AP 42.0)
set -x

EXP_DIR=exps/detr/r50_detr
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m detr \
    --epochs 500 \
    --lr_drop 400 \
    ${PY_ARGS}
