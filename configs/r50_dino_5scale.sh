#!/usr/bin/env bash
# DINO-5scale R50, 12 epochs (DINO_5scale.py: C2-C5 + 1 level, batch 1 per GPU x 16 GPUs); 49.4 AP reported.
# -m dino brings DINO_4scale.py's defaults; DINO's scripts override dn_box_noise_scale to 1.0.
set -x

EXP_DIR=exps/r50_dino_5scale
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dino \
    --dn_box_noise_scale 1.0 \
    --num_feature_levels 5 \
    --batch_size 1 \
    ${PY_ARGS}
