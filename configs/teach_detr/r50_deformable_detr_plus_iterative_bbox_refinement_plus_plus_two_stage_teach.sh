#!/usr/bin/env bash
# Teach-DETR on Deformable-DETR + iterative box refinement + two-stage (the official recipe, 50 epochs), no hybrid
# branch: teacher boxes supervise the 300 one-to-one queries (released code: only with the hybrid branch; here any
# model). The paper reports Swin-S, 36 epochs: 50.7 -> 53.2 AP. TEACHERS=folder of the detection files.
set -x

EXP_DIR=exps/teach_detr/r50_deformable_detr_plus_iterative_bbox_refinement_plus_plus_two_stage_teach
TEACHERS=${TEACHERS:-data/coco/teachers}
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    --with_box_refine \
    --two_stage \
    --ensemble \
    --ext_ann_files retinanet=${TEACHERS}/swin_small_retinanet_nms_0.3_top_50_det_results.json mask_rcnn=${TEACHERS}/swin_small_mask_rcnn_det_results.json \
    ${PY_ARGS}
