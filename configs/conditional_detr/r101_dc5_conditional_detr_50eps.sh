#!/usr/bin/env bash
# Conditional-DETR DC5-R101, 50 epochs (scripts/conddetr_r101dc5_epoch50.sh: 1 image x 8 GPUs); 45.0 AP reported
set -x

EXP_DIR=exps/conditional_detr/r101_dc5
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m conditional_detr \
    --backbone resnet101 \
    --dilation \
    --batch_size 1 \
    ${PY_ARGS}
