#!/usr/bin/env bash
# OD-DETR on two-stage Deformable-DETR + refinement, 1x schedule (12 epochs, lr drop at 11). Selected proposals have no
# teacher counterpart: matching distillation runs on the teacher-initial group (--od_md_main auto).
# No official code: every OD-DETR weight and detail is this project's reading of the paper (README, OD-DETR);
# the EMA teacher decays with --ema_decay 0.9997 (DINO's). Both the model (test_*) and its EMA (test_ema_*) are
# evaluated each epoch; the paper reports both.
set -x

EXP_DIR=exps/od_detr/r50_od_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage_12eps
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    --with_box_refine \
    --two_stage \
    --epochs 12 \
    --lr_drop 11 \
    --addons od \
    ${PY_ARGS}
