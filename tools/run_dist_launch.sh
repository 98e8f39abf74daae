#!/usr/bin/env bash
# Launch a config (or any command) on GPUS processes with torchrun, as the seed repos' launcher:
#   GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 8 ./configs/r50_deformable_detr.sh [extra main.py flags]
# Multi-node: run on every node with the same MASTER_ADDR/MASTER_PORT and its own NODE_RANK:
#   MASTER_ADDR=10.0.0.1 NODE_RANK=0 GPUS_PER_NODE=8 ./tools/run_dist_launch.sh 16 ./configs/X.sh
# The command may also be `python -u main.py ...` (MS-DETR style). On CPU add --device cpu (gloo).
set -euo pipefail

if [ $# -lt 2 ]; then
    echo "usage: GPUS_PER_NODE=N $0 <total processes> <command> [args...]" >&2
    exit 2
fi
GPUS=$1
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ "$GPUS" -lt "$GPUS_PER_NODE" ]; then
    GPUS_PER_NODE=$GPUS
fi
NNODES=$(( (GPUS + GPUS_PER_NODE - 1) / GPUS_PER_NODE ))
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
NODE_RANK=${NODE_RANK:-0}

PY=${PYTHON:-python}
if [ "$1" = "python" ] || [ "$1" = "python3" ]; then
    shift  # `python -u main.py ...`: let torchrun start the interpreter itself
    [ "${1:-}" = "-u" ] && shift
    exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
        --nproc_per_node "$GPUS_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" "$@"
fi
# A config script (it calls `python -u main.py ...` once per process, with RANK/WORLD_SIZE set).
exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --no-python "$@"
