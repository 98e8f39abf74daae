#!/usr/bin/env bash
# DN-DETR DC5-R50 (README: add --dilation, 16 GPUs at 1 image each); 46.3 AP reported
set -x

EXP_DIR=exps/dn_detr/r50_dc5
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dn_dab_detr \
    --use_dn \
    --dilation \
    --batch_size 1 \
    ${PY_ARGS}
