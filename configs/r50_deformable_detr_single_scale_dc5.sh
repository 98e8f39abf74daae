#!/usr/bin/env bash
# Deformable-DETR single scale DC5
set -x

EXP_DIR=exps/r50_deformable_detr_single_scale_dc5
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    --num_feature_levels 1 \
    --dilation \
    ${PY_ARGS}
