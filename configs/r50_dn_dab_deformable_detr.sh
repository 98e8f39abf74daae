#!/usr/bin/env bash
# DN-DAB-Deformable-DETR (DN-DETR: -m dn_dab_deformable_detr --use_dn --transformer_activation relu), 50 epochs; 49.5 AP reported
set -x

EXP_DIR=exps/r50_dn_dab_deformable_detr
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dn_dab_deformable_detr \
    --use_dn \
    --scalar 5 \
    --label_noise_scale 0.2 \
    --box_noise_scale 0.4 \
    --transformer_activation relu \
    --num_queries 300 \
    --lr 1e-4 \
    --lr_backbone 1e-5 \
    --lr_linear_proj_mult 1.0 \
    --dim_feedforward 2048 \
    --dropout 0.0 \
    --cls_loss_coef 1 \
    --bbox_loss_coef 5 \
    --giou_loss_coef 2 \
    --epochs 50 \
    --lr_drop 40 \
    --topk 100 \
    ${PY_ARGS}
