#!/usr/bin/env bash
# DN-DAB-Deformable-DETR as DN-DETR's README trains it (-m dn_dab_deformable_detr --use_dn --transformer_activation
# relu; DN-DETR main.py's defaults: 50 epochs, lr drop 40, ...); 49.5 AP reported
set -x

EXP_DIR=exps/r50_dn_dab_deformable_detr
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dn_dab_deformable_detr \
    --use_dn \
    --transformer_activation relu \
    ${PY_ARGS}
