#!/usr/bin/env bash
# Everything GPU-specific in one go (at most 8 minutes: pytest 150 s + gpu_check.py 330 s), installing nothing:
#   1. the CUDA-marked tests (pytest -m gpu tests/gpu), when pytest is importable
#   2.-6. benchmarks/gpu_check.py: bf16 training TFLOP/s and MFU (eager and compiled), fp32-vs-bf16
#      agreement, clip-b16 parity, a 2-GPU NCCL step (when 2 GPUs exist), GPU JPEG decoding
# Usage: bash benchmarks/gpu_check.sh [extra gpu_check.py arguments, e.g. --json results.json]
# PYTHON picks the interpreter (default: .venv/bin/python if present, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"   # this checkout, not an installed msclip
start=$(date +%s)
status=0

echo "== environment =="
"$PY" - <<'PYEOF'
import importlib, sys
import torch
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, CUDA {torch.version.cuda}, "
      f"GPUs {torch.cuda.device_count()}: {[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]}")
for mod in ("msclip", "numpy", "yaml", "safetensors", "torchvision", "open_clip", "skimage", "pytest"):
    try:
        importlib.import_module(mod)
        print(f"  {mod}: ok")
    except Exception as exc:  # noqa: BLE001
        print(f"  {mod}: missing ({type(exc).__name__}: {exc})")
PYEOF

echo
echo "== 1. pytest -m gpu tests/gpu =="
if "$PY" -c "import pytest" 2>/dev/null; then
    timeout 150 "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/gpu || status=1
else
    echo "  skipped: pytest is not importable"
fi

echo
echo "== 2.-6. benchmarks/gpu_check.py =="
timeout 330 "$PY" benchmarks/gpu_check.py "$@" || status=1

echo
echo "gpu_check.sh: $(( $(date +%s) - start )) s in total, $([[ $status == 0 ]] && echo 'all passed' || echo 'SOME CHECKS FAILED')"
exit $status
