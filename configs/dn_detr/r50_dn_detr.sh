#!/usr/bin/env bash
# DN-DETR R50 (IDEA-Research/DN-DETR README: -m dn_dab_detr --use_dn, main.py defaults: 50 epochs, drop at 40,
# 5 denoising groups, label noise 0.2, box noise 0.4; 2 images x 8 GPUs); 44.4 AP reported (paper 44.1)
set -x

EXP_DIR=exps/dn_detr/r50
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dn_dab_detr \
    --use_dn \
    ${PY_ARGS}
