#!/usr/bin/env bash
# What each Slurm task runs when every task is one rank (one task per GPU; the default of the sbatch scripts):
# DeepSpeed reads no SLURM_* variable, so map Slurm's task ids to the variables torch.distributed reads, then run
# `python -m ipt_ds COMMAND ...` in this task. The batch script exports MASTER_ADDR and MASTER_PORT.
set -euo pipefail
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
exec "${PYTHON:-python}" -m ipt_ds "$@"
