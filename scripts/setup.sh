#!/usr/bin/env bash
# Set up .venv with everything diffusion-lsp needs (idempotent).
# On a machine without an NVIDIA GPU, the CPU build of torch is installed first
# so that pip does not pull a multi-GB CUDA build.
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
if ! "$VPY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$VPY" -m pip install -q --disable-pip-version-check "torch>=2.5,<3"
  else
    "$VPY" -m pip install -q --disable-pip-version-check "torch==2.13.0"
  fi
fi
if [ -n "$EXTRAS" ]; then
  "$VPY" -m pip install -q --disable-pip-version-check -e ".[$EXTRAS]"
else
  "$VPY" -m pip install -q --disable-pip-version-check -e .
fi
echo "diffusion-lsp is set up in $VENV" >&2
