#!/usr/bin/env bash
# OD-DETR on DINO-4scale R50 (its defaults: 12 epochs, lr drop at 11, contrastive denoising; DINO's script sets
# dn_box_noise_scale 1.0). Matching distillation on the teacher-initial group.
# No official code: every OD-DETR weight and detail is this project's reading of the paper (README, OD-DETR);
# the EMA teacher decays with --ema_decay 0.9997 (DINO's). Both the model (test_*) and its EMA (test_ema_*) are
# evaluated each epoch; the paper reports both.
set -x

EXP_DIR=exps/od_detr/r50_od_dino_4scale_12eps
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dino \
    --dn_box_noise_scale 1.0 \
    --addons od \
    ${PY_ARGS}
