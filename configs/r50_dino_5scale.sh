#!/usr/bin/env bash
# DINO-5scale R50, 12 epochs (DINO_5scale.py: C2-C5 + 1 level, batch 1 per GPU x 16 GPUs); 49.4 AP reported
set -x

EXP_DIR=exps/r50_dino_5scale
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dino \
    --use_dn \
    --contrastive \
    --dn_number 100 \
    --dn_box_noise_scale 1.0 \
    --dn_label_noise_ratio 0.5 \
    --num_queries 900 \
    --num_feature_levels 5 \
    --batch_size 1 \
    --lr 1e-4 \
    --lr_backbone 1e-5 \
    --lr_linear_proj_mult 1.0 \
    --dim_feedforward 2048 \
    --dropout 0.0 \
    --cls_loss_coef 1 \
    --bbox_loss_coef 5 \
    --giou_loss_coef 2 \
    --epochs 12 \
    --lr_drop 11 \
    --num_select 300 \
    ${PY_ARGS}
