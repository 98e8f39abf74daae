#!/usr/bin/env bash
# DINO-4scale R50, 12 epochs; 49.0 AP reported. -m dino brings DINO_4scale.py's defaults (900 queries, CDN, ...);
# DINO's scripts/DINO_train.sh overrides dn_box_noise_scale to 1.0.
set -x

EXP_DIR=exps/r50_dino_4scale
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dino \
    --dn_box_noise_scale 1.0 \
    ${PY_ARGS}
