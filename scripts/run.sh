#!/usr/bin/env bash
# Set up .venv and run diffusion-lsp (default: the denoising demo on the bundled model).
# Any arguments are passed to diffusion-lsp, e.g. `scripts/run.sh serve`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "$#" -eq 0 ]; then set -- demo; fi
exec .venv/bin/diffusion-lsp "$@"
