#!/usr/bin/env bash
# Co-DINO-5scale R50 1x (Sense-X/Co-DETR co_dino_5scale_r50_1x_coco.py, 52.1 AP reported): DINO-5scale (900 queries,
# CDN, box noise 1.0) + R-CNN and ATSS auxiliary heads on the memory pyramid (strides 4-128, RoIs on 4-64) + their
# positive queries (no feature term, no head embedding); lambda_1 1, lambda_2 2 x 6; lr 2e-4 (backbone x0.1),
# 12 epochs, 2 images x 8 GPUs. As there: 80 logits in every head (--contiguous_classes), the quality focal loss
# (beta 2) for every classification term of the DETR head (--cls_loss qfl), class-wise soft-NMS 0.8 over the top
# 900 (query, class) pairs keeping 300 at evaluation (--soft_nms 0.8).
set -x

EXP_DIR=exps/co_detr/r50_co_dino_5scale_1x
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dino \
    --num_feature_levels 5 \
    --dn_box_noise_scale 1.0 \
    --lr 2e-4 \
    --lr_backbone 2e-5 \
    --batch_size 2 \
    --addons co_detr \
    --contiguous_classes \
    --cls_loss qfl \
    --soft_nms 0.8 \
    --lambda_1 1.0 \
    --lambda_2 2.0 \
    --num_dec_layer 6 \
    ${PY_ARGS}
