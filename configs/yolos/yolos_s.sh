#!/usr/bin/env bash
# YOLOS-S (hustvl/YOLOS README: DeiT-S, 150 epochs, lr 2.5e-5, batch 1 per GPU x 8, position embeddings at 512x864 with mid position embeddings, train scales 480..800 step 16, eval 800; COCO AP 36.1). Pass --pretrained_backbone_path with the local DeiT-S weights (its --pre_trained). Official schedule: warm-up cosine; this project: --lr_drop 100 (YOLOS's --sched step).
set -x

EXP_DIR=exps/yolos/yolos_s
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m yolos \
    --backbone_name small \
    --init_pe_size 512 864 \
    --mid_pe_size 512 864 \
    --batch_size 1 \
    --lr 2.5e-5 \
    --epochs 150 \
    --train_scales 480 496 512 528 544 560 576 592 608 624 640 656 672 688 704 720 736 752 768 784 800 \
    --train_max_size 1333 \
    --val_size 800 \
    --val_max_size 1333 \
    ${PY_ARGS}
