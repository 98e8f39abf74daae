#!/usr/bin/env bash
# Shared by the MS-DETR scripts: run main.py on $num_gpus processes with the project's launcher
# (tools/run_dist_launch.sh, as the seed's scripts do) or, where it is missing, torchrun.
# Usage: source scripts/ms_detr/launch.sh; launch_main ARGS...
launch_main() {
    if [ -x ./tools/run_dist_launch.sh ]; then
        GPUS_PER_NODE=$num_gpus ./tools/run_dist_launch.sh "$num_gpus" python -u main.py "$@"
    else
        torchrun --nproc_per_node="$num_gpus" main.py "$@"
    fi
}
