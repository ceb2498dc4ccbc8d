# Shared set-up for launch/*.sh: a project venv with torch (CPU wheel unless
# TORCH_SPEC says otherwise) and ds_vrgd installed editable. Idempotent: it
# reinstalls only when pyproject.toml changed. Source it, do not run it.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VRGD_VENV:-$REPO/.venv}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
EXTRAS="${VRGD_EXTRAS:-all,test}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
STAMP="$VENV/.ds_vrgd-installed"
WANT="$(cat "$REPO/pyproject.toml" | sha256sum | cut -d' ' -f1) $TORCH_SPEC $EXTRAS"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
    echo "[setup] installing $TORCH_SPEC and ds_vrgd[$EXTRAS] into $VENV" >&2
    python -m pip install -q --disable-pip-version-check "$TORCH_SPEC" 2>&1 | grep -v "is ignored" >&2 || true
    python -c "import torch" || { echo "[setup] torch failed to install ($TORCH_SPEC)" >&2; exit 1; }
    python -m pip install -q --disable-pip-version-check -e "$REPO[$EXTRAS]" 2>&1 | grep -v "is ignored" >&2 || true
    python -c "import ds_vrgd" || { echo "[setup] ds_vrgd failed to install" >&2; exit 1; }
    echo "$WANT" > "$STAMP"
fi
export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"
export TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1
