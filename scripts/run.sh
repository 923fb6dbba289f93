#!/usr/bin/env bash
# Set up .venv and run diffusion-lsp (default: the denoising demo on the bundled model).
# Any arguments are passed to diffusion-lsp, e.g. `scripts/run.sh serve`. Setup is skipped,
# silently, when .venv is up to date with pyproject.toml (scripts/setup.sh's stamp).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
VENV="$VENV" bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- demo; fi
exec "$VENV/bin/diffusion-lsp" "$@"
