#!/usr/bin/env bash
# YOLOS-Ti (hustvl/YOLOS README: DeiT-Ti, 300 epochs, lr 5e-5, batch 2 per GPU x 8, positions at 800x1333, train scales 256..608 step 16 (max 1013), eval 512 (max 853); COCO AP 28.7). Pass --pretrained_backbone_path with the local DeiT-Ti weights.
set -x

EXP_DIR=exps/yolos/yolos_ti
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m yolos \
    --backbone_name tiny \
    --init_pe_size 800 1333 \
    --batch_size 2 \
    --lr 5e-5 \
    --epochs 300 \
    --train_scales 256 272 288 304 320 336 352 368 384 400 416 432 448 464 480 496 512 528 544 560 576 592 608 \
    --train_max_size 1013 \
    --val_size 512 \
    --val_max_size 853 \
    ${PY_ARGS}
