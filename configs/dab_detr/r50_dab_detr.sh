#!/usr/bin/env bash
# DAB-DETR R50 as its README trains it (main.py defaults: prelu, dropout 0, SineHW 20, 300 queries, top-300;
# 50 epochs with the drop at 40 instead of the argparse 300 / 200; 2 images x 8 GPUs); 42.2 AP reported
set -x

EXP_DIR=exps/dab_detr/r50
PY_ARGS=${@:1}

python -u main.py \
    --output_dir ${EXP_DIR} \
    -m dab_detr \
    --epochs 50 \
    --lr_drop 40 \
    ${PY_ARGS}
