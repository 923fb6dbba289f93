#!/usr/bin/env bash
# Set up .venv with everything diffusion-lsp needs (idempotent).
# On a machine without an NVIDIA GPU, the CPU build of torch is installed first, from
# PyTorch's CPU wheel index where it is reachable, so that pip does not pull a multi-GB CUDA
# build (DIFFUSION_LSP_TORCH_INDEX=cpu|default to choose; it prints which one it used).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${1:-}"   # e.g. "test"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null 2>&1 || true
# Without an NVIDIA GPU, torch comes from PyTorch's CPU wheel index when it answers within
# TORCH_INDEX_PROBE_S seconds (the default index would fetch the CUDA build and GBs of NVIDIA
# libraries); otherwise from the default index. DIFFUSION_LSP_TORCH_INDEX=cpu|default forces one.
TORCH_CPU_INDEX="${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}"
TORCH_INDEX_PROBE_S=3
TORCH_CPU_VERSION="torch==2.13.0"
cpu_index_answers() {
  "$VPY" - "$TORCH_CPU_INDEX/torch/" "$TORCH_INDEX_PROBE_S" <<'PY' >/dev/null 2>&1
import sys, urllib.request
urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2]))
PY
}
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "torch: NVIDIA GPU found, CUDA build from the default index" >&2
    "$VPY" -m pip install -q --disable-pip-version-check "torch>=2.5,<3"
  else
    choice="${DIFFUSION_LSP_TORCH_INDEX:-auto}"
    case "$choice" in
      auto) if cpu_index_answers; then choice=cpu; else choice=default; fi ;;
      cpu|default) ;;
      *) echo "DIFFUSION_LSP_TORCH_INDEX must be auto, cpu or default (got $choice)" >&2
         exit 2 ;;
    esac
    if [ "$choice" = cpu ]; then
      echo "torch: no NVIDIA GPU; CPU build from PyTorch's CPU index $TORCH_CPU_INDEX" >&2
      "$VPY" -m pip install -q --disable-pip-version-check --index-url "$TORCH_CPU_INDEX" \
        "$TORCH_CPU_VERSION"
    else
      echo "torch: no NVIDIA GPU; $TORCH_CPU_INDEX not used (unreachable or" \
           "DIFFUSION_LSP_TORCH_INDEX=default): $TORCH_CPU_VERSION from the default index" >&2
      "$VPY" -m pip install -q --disable-pip-version-check "$TORCH_CPU_VERSION"
    fi
  fi
fi
if [ -n "$EXTRAS" ]; then
  "$VPY" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
else
  "$VPY" -m pip install -q --disable-pip-version-check -e .
fi
echo "diffusion-lsp is set up in $VENV" >&2
