#!/usr/bin/env bash
# Thin wrapper over the `deepspeed` launcher: launchers/deepspeed.sh COMMAND CONFIG.yaml [--section.key=value ...]
# (COMMAND is `train`). Everything after the command goes to `ipt-ds` unchanged. Environment knobs, all optional:
#
#   NGPUS        ranks on each node (deepspeed --num_gpus); default: every visible GPU (set it on CPUs)
#   HOSTFILE     a DeepSpeed hostfile ("HOST slots=N" per line); without it, one node (this one)
#   NUM_NODES    how many hostfile nodes to use (--num_nodes); default: all of them
#   NODE_RANK    launch only this node's ranks, without ssh/pdsh (--no_ssh --node_rank): run the script once on every
#                node, with NODE_RANK=0..NUM_NODES-1 and the same HOSTFILE, MASTER_ADDR and MASTER_PORT
#   MASTER_ADDR  address of node 0 that every rank can reach; needed with NODE_RANK (with HOSTFILE alone DeepSpeed
#                asks node 0 over ssh)
#   MASTER_PORT  rendezvous port (29500)
#   DEEPSPEED    the launcher executable (`deepspeed` from PATH)
#
# On machines without GPUs also export DS_ACCELERATOR=cpu (and OMP_NUM_THREADS). Examples:
#   NGPUS=8 launchers/deepspeed.sh train configs/rte/prompt_tuning_minilm.yaml
#   HOSTFILE=hosts launchers/deepspeed.sh train configs/rte/prompt_tuning_minilm.yaml
#   HOSTFILE=hosts NUM_NODES=2 NODE_RANK=0 MASTER_ADDR=node0 launchers/deepspeed.sh train cfg.yaml   # on node0
#   HOSTFILE=hosts NUM_NODES=2 NODE_RANK=1 MASTER_ADDR=node0 launchers/deepspeed.sh train cfg.yaml   # on node1
set -euo pipefail
# The launcher ignores SIGUSR1 (by default it would die of it): a SIGUSR1 sent to every process, by Slurm or to the
# process group, then reaches only the ranks, which stop cleanly (run.stop_signals); they inherit the ignore until
# their own handler is installed.
trap '' USR1
exec "${DEEPSPEED:-deepspeed}" \
    ${NGPUS:+"--num_gpus=$NGPUS"} \
    ${HOSTFILE:+"--hostfile=$HOSTFILE"} \
    ${NUM_NODES:+"--num_nodes=$NUM_NODES"} \
    ${NODE_RANK:+--no_ssh "--node_rank=$NODE_RANK"} \
    ${MASTER_ADDR:+"--master_addr=$MASTER_ADDR"} \
    "--master_port=${MASTER_PORT:-29500}" \
    --module ipt_ds "$@"
