#!/usr/bin/env bash
# Conditional-DETR R101, 50 epochs (scripts/conddetr_r101_epoch50.sh: 2 images x 8 GPUs); 42.8 AP reported
set -x

EXP_DIR=exps/conditional_detr/r101
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m conditional_detr \
    --backbone resnet101 \
    ${PY_ARGS}
