#!/usr/bin/env bash
# DAB-DETR DC5-R50 (README: add --dilation; the DC5 and 3-pattern runs need 16 GPUs for the total batch
# of 16 at 1 image each); 44.5 AP reported (fixxy: add --random_refpoints_xy, 44.7; 3 patterns: --num_patterns 3, 45.7)
set -x

EXP_DIR=exps/dab_detr/r50_dc5
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dab_detr \
    --dilation \
    --epochs 50 \
    --lr_drop 40 \
    --batch_size 1 \
    ${PY_ARGS}
