#!/usr/bin/env bash
# One device call of the GPU speed benchmarks (docs/training.md), JSON and PNG into $OUT:
#   vs-ar-<shape>-tps<N>  diffusion vs autoregressive decoding, random weights of a published
#                         shape (default qwen2.5-7b, Dream-Coder-7B's), 64-token holes filled
#                         at a fixed N tokens per step (N = 4, then 8: JSON only)
#   latency-bundled, throughput-bundled   the bundled model on the GPU
# HumanEval-infilling holes come from $DATA, carried in (the ../shared beside the checkout does
# not travel). Each benchmark has STEP_S seconds at most; the whole call stays under 9 minutes.
#
#   OUT=/some/dir scripts/gpu-bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
PY=${PY:-python3}
DATA=${DATA:-runs/eval-data}
SHAPE=${SHAPE:-qwen2.5-7b}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-20}         # holes per benchmark (vs-ar) or per split (latency)
HOLE_TOKENS=${HOLE_TOKENS:-64}
STEP_S=${STEP_S:-120}       # 4 benchmarks: 8 minutes at most
export PYTHONUNBUFFERED=1
mkdir -p "$OUT"

# bench TAG ARGS...: `diffusion-lsp bench ARGS` (without the LSP packages, which the device
# lacks), its JSON and PNG kept as $OUT/TAG.json and $OUT/TAG.png
bench() {
    local tag=$1 status=0
    shift
    echo "== $tag: bench $*"
    rm -rf "$OUT/partial" && mkdir "$OUT/partial"
    timeout "$STEP_S" $PY - "$OUT/partial" "$@" <<'EOF' || status=$?
import sys
from pathlib import Path

import benchmarks.report
from diffusion_lsp.cli import main

benchmarks.report.RESULTS = Path(sys.argv[1])
sys.exit(main(["bench", *sys.argv[2:]]))
EOF
    [ "$status" = 0 ] || echo "== $tag failed or ran out of time (exit $status)"
    for file in "$OUT"/partial/*; do
        [ -e "$file" ] && mv "$file" "$OUT/$tag.${file##*.}"
    done
    rmdir "$OUT/partial"
}

main() {
    began=$SECONDS
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available()
and torch.cuda.get_device_name(0))'
    bench "vs-ar-$SHAPE-tps4" vs-autoregressive --shape "$SHAPE" --device "$DEVICE" \
        --data "$DATA" --limit "$LIMIT" --max-tokens "$HOLE_TOKENS" --tokens-per-step 4
    bench "vs-ar-$SHAPE-tps8" vs-autoregressive --shape "$SHAPE" --device "$DEVICE" \
        --data "$DATA" --limit "$LIMIT" --max-tokens "$HOLE_TOKENS" --tokens-per-step 8
    rm -f "$OUT/vs-ar-$SHAPE-tps8.png"  # a device call returns 8 files at most
    bench latency-bundled latency --device "$DEVICE" --data "$DATA" --limit "$LIMIT"
    bench throughput-bundled throughput --device "$DEVICE" --data "$DATA" --limit "$LIMIT"
    echo "gpu-bench: $((SECONDS - began))s"
}

main 2>&1 | tee "$OUT/console.log"
