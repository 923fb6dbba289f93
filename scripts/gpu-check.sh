#!/usr/bin/env bash
# The one prepared command for a borrowed GPU (docs/training.md, "The GPU check"): in at most BUDGET_S seconds,
#   1. correct on CUDA: the suite's CUDA tests (pytest -m cuda, tests/test_cuda.py);
#   2. speed: benchmarks/gpu_check.py on a random-weight Qwen2.5-7B (Dream-Coder-7B's shape):
#      one 64-token hole at 1, 2, 4, 8 tokens a step, the HBM bound, the autoregressive twin,
#      the fast step's switches and the context refresh side by side at 8 a step, 4 / 16 / 64
#      editors against one engine (batched steps packed), and over LSP the request after one
#      typed character;
#   3. training of the bundled model with the time left (scripts/gpu-train.sh; its corpus is
#      built on the CPU cores meanwhile), resuming runs/gpu when it was carried in.
# OUT receives gpu.json, check.log and the training kit (8 files at most, 16 MiB each).
#
#   OUT=/some/dir scripts/gpu-check.sh      (carry .whl, runs/eval-data and, if any, runs/gpu;
#                                             scripts/gpu-prepare.sh makes the first two)
#   DRY_RUN=1 OUT=/tmp/x scripts/gpu-check.sh     the same steps on the CPU, tiny, in seconds
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
PY=${PY:-python3}
DRY_RUN=${DRY_RUN:-0}
BUDGET_S=${BUDGET_S:-530}      # the whole call (a device command may run 600 s)
TESTS_S=${TESTS_S:-180}        # the CUDA tests at most
BENCH_S=${BENCH_S:-260}        # the speed sections at most (about 195 s on the H200, estimated)
TRAIN_MIN_S=${TRAIN_MIN_S:-90} # train only with at least this much left
DATA=${DATA:-runs/eval-data}   # HumanEval-infilling, carried in (../shared does not travel)
WORK=${WORK:-/tmp/diffusion-lsp-gpu}
if [ "$DRY_RUN" = 1 ]; then
    SHAPE=${SHAPE:-tiny-qwen2} DEVICE=${DEVICE:-cpu} HOLES=${HOLES:-1} BUDGET_S=${DRY_BUDGET_S:-150}
    stdlib=$($PY -c 'import json, os; print(os.path.dirname(os.path.dirname(json.__file__)))')
    TRAIN_ENV=(CORPUS_MB=2 ROOTS="$stdlib" HIDDEN=32 LAYERS=1 HEADS=2 KV_HEADS=1
               SEQ_LEN=64 BATCH=4 RESERVE_S=5 THREADS=1 WORKERS=1 DEVICE=cpu RUN="$WORK/run")
    TRAIN_MIN_S=${TRAIN_MIN_S_DRY:-20} TRAIN_MAX_S=40
else
    SHAPE=${SHAPE:-qwen2.5-7b} DEVICE=${DEVICE:-cuda} HOLES=${HOLES:-8}
    TRAIN_ENV=(WORKERS=8)   # half the cores: the other half keep the GPU's host side quick
    TRAIN_MAX_S=100000
fi
export PYTHONUNBUFFERED=1
began=$SECONDS
left() { echo $((BUDGET_S - (SECONDS - began))); }
mkdir -p "$OUT" "$WORK"

install_wheels() {  # packages the GPU machine's image lacks (scripts/gpu-prepare.sh makes them)
    if [ "$DRY_RUN" != 1 ] && compgen -G ".whl/*.whl" >/dev/null; then
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/diffusion-lsp-site .whl/*.whl || return 1
        export PYTHONPATH=/tmp/diffusion-lsp-site${PYTHONPATH:+:$PYTHONPATH}
    elif [ "$DRY_RUN" != 1 ]; then
        echo "gpu-check: no .whl/ carried (scripts/gpu-prepare.sh makes it); the LSP parts need it"
    fi
}

failed=0   # set by a step that failed: the call then exits 1, after the others ran
fail() { echo "gpu-check: FAILED: $*"; failed=1; }

main() {
    echo "gpu-check: $(date -u +%FT%TZ), budget ${BUDGET_S}s, shape $SHAPE on $DEVICE"
    if ! compgen -G "$DATA/HumanEval-*Infilling.jsonl.gz" >/dev/null; then
        echo "gpu-check: error: no HumanEval-infilling data in DATA=$DATA (the speed and LSP"
        echo "  sections need HumanEval-*Infilling.jsonl.gz: scripts/gpu-prepare.sh copies them"
        echo "  from ../shared/eval-data into runs/eval-data, or set DATA=DIR)"
        return 2
    fi
    install_wheels || echo "gpu-check: the carried wheels did not install"
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null
    $PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
transformers.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'

    # the training corpus and token streams, on the CPU, while the GPU is measured
    env "${TRAIN_ENV[@]}" WORK="$WORK" PHASE=build LOG="$WORK/build.log" \
        nice -n 10 bash scripts/gpu-train.sh >/dev/null 2>&1 &
    build=$!

    echo "== CUDA tests"
    # SIGINT at the limit: pytest still writes its summary and the JUnit file (SIGTERM would not)
    timeout -s INT -k 15 "$TESTS_S" $PY -m pytest -q -p no:cacheprovider -m cuda \
        tests/test_cuda.py --durations=8 --junitxml="$WORK/cuda-tests.xml" 2>&1 | tail -n 40

    echo "== speed ($(left)s left)"
    timeout "$BENCH_S" $PY -m benchmarks.gpu_check --out "$OUT/gpu.json" --shape "$SHAPE" \
        --device "$DEVICE" --data "$DATA" --holes "$HOLES" --junit "$WORK/cuda-tests.xml" \
        || fail "the speed sections exited with status $? (see above; gpu.json's errors)"
    [ -f "$OUT/gpu.json" ] || $PY -m benchmarks.gpu_check --out "$OUT/gpu.json" --sections "" \
        --device "$DEVICE" --junit "$WORK/cuda-tests.xml"

    echo "== training ($(left)s left)"
    wait "$build" || fail "the corpus build failed: $(tail -n 5 "$WORK/build.log")"
    tail -n 3 "$WORK/build.log"
    if [ "$(left)" -ge "$TRAIN_MIN_S" ]; then
        budget=$(left)
        [ "$budget" -gt "$TRAIN_MAX_S" ] && budget=$TRAIN_MAX_S
        env "${TRAIN_ENV[@]}" WORK="$WORK" PHASE=train BUDGET_S="$budget" \
            LOG="$WORK/train.log" bash scripts/gpu-train.sh --eval-every 30 --save-every 60 \
            >/dev/null 2>&1
        tail -n 8 "$WORK/train.log"
    else
        echo "gpu-check: $(left)s left, under TRAIN_MIN_S=$TRAIN_MIN_S: no training this call"
    fi
    ls -la "$OUT"
    echo "gpu-check: done in $((SECONDS - began))s$([ "$failed" = 1 ] && echo ", with failures")"
    return "$failed"
}

main 2>&1 | tee "$OUT/check.log"
