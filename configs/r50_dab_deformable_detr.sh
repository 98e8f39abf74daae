#!/usr/bin/env bash
# DAB-Deformable-DETR as DAB-DETR's README trains it (its main.py defaults, but 50 epochs with the lr drop at 40
# instead of its argparse 300 / 200), without denoising
set -x

EXP_DIR=exps/r50_dab_deformable_detr
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dab_deformable_detr \
    --epochs 50 \
    --lr_drop 40 \
    --transformer_activation relu \
    ${PY_ARGS}
