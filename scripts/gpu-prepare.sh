#!/usr/bin/env bash
# What scripts/gpu-check.sh carries to the GPU machine, made here (docs/training.md):
#   .whl/           the packages the GPU machine's image lacks (it has torch, transformers and
#                   pytest, not the language server's), for its Python (3.12, x86_64), from PyPI
#   runs/eval-data/ HumanEval-infilling from ../shared (which does not travel)
# Both are ignored by git; safe to rerun. Then: carry [".whl", "runs/eval-data"] (+ "runs/gpu").
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
PYTHON_VERSION=${PYTHON_VERSION:-3.12}
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")" .whl runs/eval-data
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
for p in msgspec==0.23.0 pygls==2.1.1 lsprotocol==2025.0.0 cattrs==26.2.1 attrs==26.1.0 \
         typing_extensions==4.16.0 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 \
         pytest-asyncio==1.5.0; do
    $PY -m pip download -q --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
        --implementation cp --platform manylinux_2_17_x86_64 -d .whl "$p" 2>/dev/null
done
cp ../shared/eval-data/humaneval-infilling/*.gz runs/eval-data/
echo "gpu-prepare: $(ls .whl | wc -l) wheels in .whl/, $(ls runs/eval-data | wc -l) files in runs/eval-data/"
