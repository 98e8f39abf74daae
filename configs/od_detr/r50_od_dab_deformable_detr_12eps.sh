#!/usr/bin/env bash
# OD-DETR on DAB-Deformable-DETR (DAB-DETR's defaults), 1x schedule (12 epochs, lr drop at 11).
# No official code: every OD-DETR weight and detail is this project's reading of the paper (README, OD-DETR);
# the EMA teacher decays with --ema_decay 0.9997 (DINO's). Both the model (test_*) and its EMA (test_ema_*) are
# evaluated each epoch; the paper reports both.
set -x

EXP_DIR=exps/od_detr/r50_od_dab_deformable_detr_12eps
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dab_deformable_detr \
    --epochs 12 \
    --lr_drop 11 \
    --transformer_activation relu \
    --addons od \
    ${PY_ARGS}
