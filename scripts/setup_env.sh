#!/usr/bin/env bash
# Create the project virtualenv and install the pinned requirements, then msclip itself.
# Idempotent: re-running only re-checks what pip already has. Never loosens the torch pin.
set -euo pipefail
PY="${1:-python3}"
VENV="${2:-.venv}"
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "[setup] creating $VENV with $($PY --version)"
    "$PY" -m venv "$VENV"
fi
# A fresh torch (CUDA build) takes about 6.2 GB in the venv: say so up front rather than fail mid-install
# with pip's bare "No space left on device". Skipped when torch is already installed there.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    need_kb=$((7 * 1024 * 1024))
    free_kb=$(df -Pk "$VENV" | awk 'NR==2 {print $4}')
    if (( free_kb < need_kb )); then
        echo "[setup] error: $(( free_kb / 1024 )) MB free on the disk holding $VENV; installing torch and the" \
             "pinned packages needs about $(( need_kb / 1024 )) MB. Free some space and re-run." >&2
        exit 1
    fi
fi
# No cache (it would be a second copy of the wheels); pip's warning about empty find-links folders dropped.
pip_install() {
    "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
echo "[setup] installing pinned requirements (torch==2.14.1, torchvision==0.29.1, ...)"
pip_install -r requirements.txt
# CLIP_benchmark (test oracle, loader target): --no-deps so pip never re-resolves torch or pulls transformers.
pip_install --no-deps clip-benchmark==1.6.2
# --no-deps: requirements.txt already pinned everything; this keeps pip from re-resolving torch.
pip_install --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'PY'
import torch, torchvision, open_clip
assert torch.__version__.startswith("2.14.1"), f"unexpected torch {torch.__version__}"
print(f"[setup] torch {torch.__version__}, torchvision {torchvision.__version__}, open_clip {open_clip.__version__}")
PY
