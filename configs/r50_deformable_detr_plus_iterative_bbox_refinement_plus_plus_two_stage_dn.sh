#!/usr/bin/env bash
# Deformable-DETR + iterative box refinement + two-stage + DN-DETR query denoising (the dn add-on)
set -x

EXP_DIR=exps/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage_dn
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    --with_box_refine \
    --two_stage \
    --use_dn \
    ${PY_ARGS}
