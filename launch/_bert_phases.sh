# Shared by launch/pretrain_bert.sh and launch/pretrain_bert_accelerate.sh: which configs, data and
# output directories the phases of a BERT pretraining recipe use. Source it, define
# `launch_phase CONFIG TRAINER_ARGS...` (start `python -m ds_vrgd.pretrain` on every rank), then
# call `run_phases "$@"`.
#
# Environment (defaults in brackets):
#   MODEL       base | large                                   [large]
#   BATCH       64k: NVIDIA's LAMB recipe, 64k then 32k
#               128k: the VRGD paper's scale, 128k then 64k     [64k]
#   OPTIMIZER   vrlamb | lamb (VRLAMB with "vr": false)         [vrlamb]
#   PHASES      "1 2", "1" or "2"                               ["1 2"]
#   DATA1       seq-128 data (python -m ds_vrgd.pretrain.data)  [data/bert_seq128]
#   DATA2       seq-512 data, made with DATA1's tokenizer       [data/bert_seq512]
#   OUTPUT      runs: OUTPUT/phase1, OUTPUT/phase2              [runs/bert_${MODEL}_${BATCH}_${OPTIMIZER}]
#   CONFIG1/2   override the ds_configs/ file chosen from MODEL, BATCH, OPTIMIZER
# Phase 2 starts from phase 1's final weights (--init-from OUTPUT/phase1). Extra arguments go to the
# trainer of every phase (python -m ds_vrgd.pretrain --help), e.g. --resume --checkpoint-every 200.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODEL="${MODEL:-large}"
BATCH="${BATCH:-64k}"
OPTIMIZER="${OPTIMIZER:-vrlamb}"
case "$BATCH" in
    64k) PHASE2_BATCH=32k ;;
    128k) PHASE2_BATCH=64k ;;
    *) echo "error: BATCH=$BATCH; use 64k (NVIDIA: 64k then 32k) or 128k (VRGD: 128k then 64k)" >&2; exit 2 ;;
esac
CONFIG1="${CONFIG1:-$REPO/ds_configs/bert_${MODEL}_phase1_${BATCH}_${OPTIMIZER}.json}"
CONFIG2="${CONFIG2:-$REPO/ds_configs/bert_${MODEL}_phase2_${PHASE2_BATCH}_${OPTIMIZER}.json}"
DATA1="${DATA1:-data/bert_seq128}"
DATA2="${DATA2:-data/bert_seq512}"
OUTPUT="${OUTPUT:-runs/bert_${MODEL}_${BATCH}_${OPTIMIZER}}"
PHASES="${PHASES:-1 2}"

run_phases() {
    local phase
    for phase in $PHASES; do
        case "$phase" in
            1) launch_phase "$CONFIG1" --data "$DATA1" --output "$OUTPUT/phase1" "$@" ;;
            2) launch_phase "$CONFIG2" --data "$DATA2" --output "$OUTPUT/phase2" --init-from "$OUTPUT/phase1" "$@" ;;
            *) echo "error: PHASES=\"$PHASES\"; use \"1 2\", \"1\" or \"2\"" >&2; exit 2 ;;
        esac
    done
}
