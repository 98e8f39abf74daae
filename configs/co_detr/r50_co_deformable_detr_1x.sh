#!/usr/bin/env bash
# Co-DETR over the official Deformable-DETR two-stage + iterative box refinement, 12 epochs (lr drop at epoch 11).
# Auxiliary heads: R-CNN (RPN + RoI) and ATSS on the encoder memory (strides 8-128); lambda_1 1, lambda_2 2 x 6
# decoder layers. The paper's +5.8 AP over basic Deformable-DETR (12 ep) is this kind of base (spec §3.1 item 5).
# --contiguous_classes: 80 class logits in every head, as Co-DETR (the plain base alone has 91).
set -x

EXP_DIR=exps/co_detr/r50_co_deformable_detr_1x
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    --with_box_refine \
    --two_stage \
    --epochs 12 \
    --lr_drop 11 \
    --addons co_detr \
    --contiguous_classes \
    --lambda_1 1.0 \
    --lambda_2 2.0 \
    --num_dec_layer 6 \
    ${PY_ARGS}
