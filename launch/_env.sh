# Shared set-up for launch/*.sh: a project venv with torch (CPU wheel unless
# TORCH_SPEC says otherwise) and ds_vrgd installed editable. Idempotent: it
# reinstalls only when pyproject.toml changed. Source it, do not run it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VRGD_VENV:-$REPO/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${VRGD_EXTRAS:-all,test}"
WANT="$(sha256sum < "$REPO/pyproject.toml" | cut -d' ' -f1) $TORCH_SPEC $EXTRAS"
STAMP="$VENV/.ds_vrgd-installed"
install_once() {
    # under an exclusive lock, so that scripts started together install once, not concurrently
    if [ ! -x "$VENV/bin/python" ]; then
        python3 -m venv "$VENV"
    fi
    if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
        echo "[setup] installing $TORCH_SPEC and ds_vrgd[$EXTRAS] into $VENV" >&2
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "is ignored" >&2 || true
        "$VENV/bin/python" -c "import torch" || { echo "[setup] torch failed to install ($TORCH_SPEC)" >&2; return 1; }
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$REPO[$EXTRAS]" 2>&1 \
            | grep -v "is ignored" >&2 || true
        "$VENV/bin/python" -c "import ds_vrgd" || { echo "[setup] ds_vrgd failed to install" >&2; return 1; }
        echo "$WANT" > "$STAMP"
    fi
}
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    mkdir -p "$(dirname "$VENV")"
    exec 9> "$VENV.lock"
    if command -v flock > /dev/null; then flock 9; fi
    install_once
    exec 9>&-
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
