#!/usr/bin/env bash
# Teach-DETR on DAB-Deformable-DETR (configs/r50_dab_deformable_detr.sh: DAB-DETR's defaults, 50 epochs, lr drop
# at 40) with the teachers' boxes on its 300 queries (no released code for this model; the paper reports DAB-DETR
# DC5 R101, 45.8 -> 48.5). TEACHERS=folder of the detection files.
set -x

EXP_DIR=exps/teach_detr/r50_dab_deformable_detr_teach
TEACHERS=${TEACHERS:-data/coco/teachers}
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dab_deformable_detr \
    --epochs 50 \
    --lr_drop 40 \
    --transformer_activation relu \
    --ensemble \
    --ext_ann_files retinanet=${TEACHERS}/swin_small_retinanet_nms_0.3_top_50_det_results.json mask_rcnn=${TEACHERS}/swin_small_mask_rcnn_det_results.json \
    ${PY_ARGS}
