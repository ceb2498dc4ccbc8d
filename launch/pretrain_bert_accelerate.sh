#!/usr/bin/env bash
# BERT pretraining with `accelerate launch` (DeepSpeed plugin): phase 1 (seq 128), then phase 2
# (seq 512) from phase 1's weights. Multi-node: run it on every node with the same MAIN_PROCESS_IP
# and that node's MACHINE_RANK.
#   MODEL=large BATCH=64k NUM_MACHINES=8 MACHINE_RANK=0 MAIN_PROCESS_IP=10.0.0.1 NUM_PROCESSES=64 \
#       bash launch/pretrain_bert_accelerate.sh
# Recipe, data and output variables: launch/_bert_phases.sh. Launcher variables:
#   NUM_PROCESSES    ranks in total, all machines                [1]
#   NUM_MACHINES / MACHINE_RANK / MAIN_PROCESS_IP                [1 / 0 / 127.0.0.1]
#   MAIN_PROCESS_PORT                                            [29500]
# Uses the python environment it is started from (DS_ACCELERATOR=cpu for CPU runs).
source "$(dirname "${BASH_SOURCE[0]}")/_bert_phases.sh"

launch_phase() {
    local config="$1"
    shift
    accelerate launch --use_deepspeed --deepspeed_config_file "$config" \
        --deepspeed_multinode_launcher standard --num_processes "${NUM_PROCESSES:-1}" \
        --num_machines "${NUM_MACHINES:-1}" --machine_rank "${MACHINE_RANK:-0}" \
        --main_process_ip "${MAIN_PROCESS_IP:-127.0.0.1}" --main_process_port "${MAIN_PROCESS_PORT:-29500}" \
        --mixed_precision no --dynamo_backend no \
        -m ds_vrgd.pretrain --deepspeed_config "$config" "$@"
}

run_phases "$@"
