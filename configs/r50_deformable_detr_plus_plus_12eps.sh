#!/usr/bin/env bash
# H-DETR's Deformable-DETR++ (dp0, mixed selection, look forward twice), 12 epochs
set -x

EXP_DIR=exps/r50_deformable_detr_plus_plus_12eps
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    --with_box_refine \
    --two_stage \
    --dim_feedforward 2048 \
    --epochs 12 \
    --lr_drop 11 \
    --dropout 0.0 \
    --mixed_selection \
    --look_forward_twice \
    ${PY_ARGS}
