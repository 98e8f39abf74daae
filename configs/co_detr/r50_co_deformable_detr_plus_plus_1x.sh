#!/usr/bin/env bash
# Co-Deformable-DETR R50 1x (Sense-X/Co-DETR co_deformable_detr_r50_1x_coco.py, 49.5 AP reported): Deformable-DETR++
# (two-stage, refine, mixed query selection, look forward twice, FFN 2048, dropout 0, 300 queries) + R-CNN and ATSS
# auxiliary heads (strides 8-128) + their positive queries; lambda_1 1, lambda_2 2 x 6 decoder layers; 12 epochs,
# lr 2e-4 (x0.1 backbone, sampling_offsets, reference_points), clip 0.1, 2 images x 8 GPUs.
# --contiguous_classes: 80 class logits in every head, as the official MMDetection config.
set -x

EXP_DIR=exps/co_detr/r50_co_deformable_detr_plus_plus_1x
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    --with_box_refine \
    --two_stage \
    --mixed_selection \
    --look_forward_twice \
    --dim_feedforward 2048 \
    --dropout 0.0 \
    --epochs 12 \
    --lr_drop 11 \
    --addons co_detr \
    --contiguous_classes \
    --lambda_1 1.0 \
    --lambda_2 2.0 \
    --num_dec_layer 6 \
    ${PY_ARGS}
