#!/usr/bin/env bash
# H-Deformable-DETR R50, 36 epochs: hybrid branch (300 one-to-one + 1500 one-to-many queries, GT x6, lambda 1)
# on Deformable-DETR++ (dp0, mixed query selection, look forward twice). Seed: HDETR/H-Deformable-DETR, same path
# under configs/. Launch as the seed does:
#   GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 ./configs/h_detr/two_stage/deformable-detr-hybrid-branch/36eps/r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage.sh --coco_path /path/to/coco
set -x

EXP_DIR=exps/two_stage/deformable-detr-hybrid-branch/36eps/r50_hybrid_branch_lambda1_group6_t1500_dp0_mqs_lft_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    --with_box_refine \
    --two_stage \
    --dim_feedforward 2048 \
    --epochs 36 \
    --lr_drop 30 \
    --num_queries_one2one 300 \
    --num_queries_one2many 1500 \
    --k_one2many 6 \
    --lambda_one2many 1.0 \
    --dropout 0.0 \
    --mixed_selection \
    --look_forward_twice \
    ${PY_ARGS}
