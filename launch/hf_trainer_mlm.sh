#!/usr/bin/env bash
# BERT MLM with Hugging Face Trainer and a VR optimizer (examples/hf_trainer_mlm.py),
# started each way Trainer users start it. Sets itself up (launch/_env.sh).
#
#   bash launch/hf_trainer_mlm.sh MODE [example options, e.g. --max-steps 50 --text-file corpus.txt]
#
# MODE:
#   deepspeed             deepspeed launcher, TrainingArguments(deepspeed=$DS_CONFIG)
#   accelerate-deepspeed  accelerate launch with launch/accelerate/deepspeed_zero2.yaml
#                         (ZeRO-2, the ds_config names VRLAMB)
#   accelerate-ddp        accelerate launch with launch/accelerate/ddp.yaml (torch DDP, the
#                         ds_vrgd comm hook, --optimizer VRLAMB by default)
#   single                one process (samples = gradient-accumulation micro-batches)
# Environment: NPROC processes on this machine (default 2), PORT rendezvous port (default
# 29500), DS_CONFIG (default ds_configs/hf_auto_zero2_vrlamb.json; deepspeed mode, the
# accelerate-deepspeed mode reads the path in its yaml), DS_ACCELERATOR (cpu unless set:
# DS_ACCELERATOR=cuda on GPUs). Multi-node: edit the yaml files (see their comments).
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"
MODE="${1:?usage: bash launch/hf_trainer_mlm.sh deepspeed|accelerate-deepspeed|accelerate-ddp|single [options]}"
shift
NPROC="${NPROC:-2}"
PORT="${PORT:-29500}"
DS_CONFIG="${DS_CONFIG:-ds_configs/hf_auto_zero2_vrlamb.json}"
EXAMPLE=examples/hf_trainer_mlm.py
case "$MODE" in
    deepspeed)
        exec deepspeed --num_gpus "$NPROC" --master_port "$PORT" "$EXAMPLE" --deepspeed "$DS_CONFIG" "$@" ;;
    accelerate-deepspeed)
        exec accelerate launch --config_file launch/accelerate/deepspeed_zero2.yaml --num_processes "$NPROC" \
            --main_process_port "$PORT" "$EXAMPLE" "$@" ;;
    accelerate-ddp)
        exec accelerate launch --config_file launch/accelerate/ddp.yaml --num_processes "$NPROC" \
            --main_process_port "$PORT" "$EXAMPLE" "$@" ;;
    single)
        exec python "$EXAMPLE" "$@" ;;
    *)
        echo "unknown mode '$MODE': deepspeed, accelerate-deepspeed, accelerate-ddp or single" >&2
        exit 2 ;;
esac
