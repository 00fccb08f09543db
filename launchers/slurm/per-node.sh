#!/usr/bin/env bash
# What each Slurm task runs when every task is one node (LAUNCH=per-node, --ntasks-per-node=1): the deepspeed
# launcher for this node's NGPUS ranks (default: the GPUs Slurm gave the node), joined to the other nodes without ssh.
# The hostfile lists the job's nodes; in --no_ssh mode DeepSpeed only counts its entries, it never connects to them.
set -euo pipefail
hostfile=${TMPDIR:-/tmp}/ipt-ds-hosts-$SLURM_JOB_ID-$SLURM_NODEID
export NGPUS=${NGPUS:-${SLURM_GPUS_ON_NODE:-1}}
scontrol show hostnames "$SLURM_JOB_NODELIST" | sed "s/\$/ slots=$NGPUS/" > "$hostfile"
HOSTFILE=$hostfile NUM_NODES=$SLURM_NNODES NODE_RANK=$SLURM_NODEID exec "$(dirname "$0")/../deepspeed.sh" "$@"
