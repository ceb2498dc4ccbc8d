#!/usr/bin/env bash
# GPU acceptance in one command, on a machine with a CUDA GPU: the tests marked gpu (tests/gpu/): the
# optimizer math and rho on a real BERT on CUDA against float64, DeepSpeed ZeRO-2/3 and ZeRO-Offload on one
# GPU with NCCL against the single-process reference, and the VR step time next to fused AdamW and FusedLamb
# (a table, printed at the end). A few minutes on one GPU.
# Uses the machine's own python3 (VRGD_PYTHON to choose another) and its CUDA build of torch: unlike
# launch/_env.sh it never installs torch. If ds_vrgd or what the tests need is missing it installs
# ds_vrgd[deepspeed,hf,test] (editable) with the installed torch pinned; offline, VRGD_WHEELHOUSE=/path/to/wheels
# installs from that folder only. Extra arguments go to pytest; the exit status is pytest's.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PYTHON="${VRGD_PYTHON:-python3}"

# 1. A CUDA torch that sees a GPU, or stop here.
if ! TORCH="$("$PYTHON" -c 'import torch; print(torch.__version__)' 2> /dev/null)"; then
    echo "gpu_check: no CUDA GPU: $PYTHON has no torch. Install your CUDA build of torch first (pytorch.org)," \
         "then rerun this on the CUDA machine." >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' 2> /dev/null; then
    CUDA_BUILD="$("$PYTHON" -c 'import torch; print(torch.version.cuda or "none: a CPU build")')"
    echo "gpu_check: no CUDA GPU: torch $TORCH (CUDA $CUDA_BUILD) from $PYTHON sees none." \
         "Run this on a CUDA machine with a CUDA build of torch (on CPU the gpu tests are skipped)." >&2
    exit 1
fi

# 2. ds_vrgd with a supported DeepSpeed (ds_vrgd.deepspeed checks the version) and the tests' imports, else install
#    them; the constraint keeps pip from replacing the installed torch (it fails instead).
ready() {
    "$PYTHON" -c 'import importlib.metadata as m; m.version("ds-vrgd")
import ds_vrgd.deepspeed, transformers, tokenizers, tqdm, pytest, pytest_timeout' > /dev/null 2>&1
}
if ! ready; then
    CONSTRAINT="$(mktemp)"
    trap 'rm -f "$CONSTRAINT"' EXIT
    echo "torch==$TORCH" > "$CONSTRAINT"
    PIP=("$PYTHON" -m pip install --disable-pip-version-check -c "$CONSTRAINT")
    if [ -n "${VRGD_WHEELHOUSE:-}" ]; then
        PIP+=(--no-index --find-links "$VRGD_WHEELHOUSE")
    fi
    echo "[gpu_check] installing ds_vrgd[deepspeed,hf,test] (torch stays $TORCH)" >&2
    "${PIP[@]}" -e ".[deepspeed,hf,test]"
    ready || { echo "gpu_check: ds_vrgd or a test dependency still fails to import" >&2; exit 1; }
fi

# 3. The gpu tests: DeepSpeed runs in spawned ranks set to DS_ACCELERATOR=cuda; the step-time table is
#    appended to REPORT and printed after pytest's summary.
REPORT="$(mktemp)"
export DS_ACCELERATOR=cuda TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 VRGD_GPU_REPORT="$REPORT"
status=0
"$PYTHON" -m pytest -m gpu -q -rs -p no:cacheprovider --timeout="${VRGD_GPU_TIMEOUT:-300}" tests/gpu "$@" || status=$?
if [ -s "$REPORT" ]; then
    echo
    cat "$REPORT"
fi
rm -f "$REPORT"
exit "$status"
