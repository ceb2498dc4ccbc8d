#!/usr/bin/env bash
# BERT pretraining with the deepspeed launcher: phase 1 (seq 128), then phase 2 (seq 512) from
# phase 1's weights. Run it on one node; with HOSTFILE the launcher starts every node over ssh/pdsh.
#   MODEL=large BATCH=64k OPTIMIZER=vrlamb HOSTFILE=hostfile bash launch/pretrain_bert.sh
# Recipe, data and output variables: launch/_bert_phases.sh. Launcher variables:
#   HOSTFILE     deepspeed hostfile ("node1 slots=8" per line); unset: this node only
#   NUM_GPUS     GPUs (CPU: processes) per node                  [all]
#   NUM_NODES    first N nodes of the hostfile                   [all]
#   MASTER_PORT                                                  [29500]
# Uses the python environment it is started from (DS_ACCELERATOR=cpu for CPU runs).
source "$(dirname "${BASH_SOURCE[0]}")/_bert_phases.sh"

launch_phase() {
    local config="$1"
    shift
    deepspeed ${HOSTFILE:+--hostfile "$HOSTFILE"} ${NUM_NODES:+--num_nodes "$NUM_NODES"} \
        ${NUM_GPUS:+--num_gpus "$NUM_GPUS"} --master_port "${MASTER_PORT:-29500}" \
        --module ds_vrgd.pretrain --deepspeed_config "$config" "$@"
}

run_phases "$@"
