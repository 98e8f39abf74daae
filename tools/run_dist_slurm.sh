#!/usr/bin/env bash
# Launch a config on Slurm with srun, as the seed repos' launcher:
#   GPUS_PER_NODE=8 ./tools/run_dist_slurm.sh <partition> <job name> 16 ./configs/r50_deformable_detr.sh [flags]
# Each task runs the command; main.py reads SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID and resolves
# MASTER_ADDR from the allocation (scontrol). Set SRUN_ARGS for anything else (e.g. --time, --account).
set -euo pipefail

if [ $# -lt 4 ]; then
    echo "usage: GPUS_PER_NODE=N $0 <partition> <job name> <total GPUs> <command> [args...]" >&2
    exit 2
fi
PARTITION=$1
JOB_NAME=$2
GPUS=$3
shift 3
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
if [ "$GPUS" -lt "$GPUS_PER_NODE" ]; then
    GPUS_PER_NODE=$GPUS
fi
CPUS_PER_TASK=${CPUS_PER_TASK:-4}
SRUN_ARGS=${SRUN_ARGS:-""}
export MASTER_PORT=${MASTER_PORT:-29500}

# shellcheck disable=SC2086
srun -p "$PARTITION" --job-name="$JOB_NAME" --gres=gpu:"$GPUS_PER_NODE" --ntasks="$GPUS" \
    --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 $SRUN_ARGS "$@"
