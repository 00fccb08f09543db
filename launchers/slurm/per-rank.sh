#!/usr/bin/env bash
# What each Slurm task runs when every task is one rank (one task per GPU; the default of the sbatch scripts):
# DeepSpeed reads no SLURM_* variable, so map Slurm's task ids to the variables torch.distributed reads, then run
# `python -m ipt_ds COMMAND ...` in this task. The batch script exports MASTER_ADDR and MASTER_PORT.
set -euo pipefail
trap '' USR1  # a stop signal that comes before the trainer catches it is dropped, not fatal (docs/launching.md)
export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
exec "${PYTHON:-python}" -m ipt_ds "$@"
