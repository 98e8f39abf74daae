#!/usr/bin/env bash
# DAB-Deformable-DETR (DN-DETR repo's deformable encoder+decoder v2 model), 50 epochs, without denoising
set -x

EXP_DIR=exps/r50_dab_deformable_detr
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dab_deformable_detr \
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
