#!/usr/bin/env bash
# Conditional-DETR R50, 50 epochs (Atten4Vis/ConditionalDETR scripts/conddetr_r50_epoch50.sh: its main.py defaults,
# 2 images x 8 GPUs); 41.0 AP reported
set -x

EXP_DIR=exps/conditional_detr/r50
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m conditional_detr \
    ${PY_ARGS}
