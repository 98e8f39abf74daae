#!/usr/bin/env bash
# Teach-DETR on DINO-4scale R50, 12 epochs (configs/r50_dino_4scale.sh: -m dino, contrastive denoising) with the
# teachers' boxes on its 900 matching queries (no released code for DINO; the paper reports Swin-L, 36 epochs,
# 57.8 -> 58.9). TEACHERS=folder of the detection files.
set -x

EXP_DIR=exps/teach_detr/r50_dino_4scale_teach
TEACHERS=${TEACHERS:-data/coco/teachers}
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dino \
    --dn_box_noise_scale 1.0 \
    --ensemble \
    --ext_ann_files retinanet=${TEACHERS}/swin_small_retinanet_nms_0.3_top_50_det_results.json mask_rcnn=${TEACHERS}/swin_small_mask_rcnn_det_results.json \
    ${PY_ARGS}
