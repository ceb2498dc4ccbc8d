#!/usr/bin/env bash
# The main command: BERT pretraining end to end on this machine's CPU in a few minutes.
#   default corpus (docstrings of the Python standard library, no download) -> WordPiece tokenizer
#   -> packed, masked seq-128 shards -> tiny BERT trained with VRLAMB under DeepSpeed ZeRO-2 on
#   2 ranks (ds_configs/cpu_demo_zero2_vrlamb.json) -> summary and plot.
# Sets itself up first (launch/_env.sh). Output: runs/demo (DEMO_OUTPUT), data in runs/demo/data.
# Re-running reuses the prepared data and trains afresh. Extra arguments go to the trainer
# (python -m ds_vrgd.pretrain --help), e.g. --max-steps 50, or --resume to continue an interrupted
# run from its last checkpoint.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
cd "$REPO"
OUTPUT="${DEMO_OUTPUT:-runs/demo}"
if [ ! -f "$OUTPUT/data/meta.json" ]; then
    python -m ds_vrgd.pretrain.data --output "$OUTPUT/data" --max-seq-len 128 --vocab-size 8192 --overwrite
fi
case " $* " in
    *" --resume "*) REPLACE="" ;;
    *) REPLACE="--overwrite" ;;
esac
exec deepspeed --num_gpus 2 --master_port "${MASTER_PORT:-29500}" --log_level warning \
    --module ds_vrgd.pretrain --data "$OUTPUT/data" --deepspeed_config ds_configs/cpu_demo_zero2_vrlamb.json \
    --output "$OUTPUT" --eval-every 25 --checkpoint-every 50 ${REPLACE:+"$REPLACE"} "$@"
