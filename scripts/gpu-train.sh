#!/usr/bin/env bash
# One device call of the GPU training run (docs/training.md): build the corpus from this
# machine's Python, tokenize it with the SHIPPED tokenizer (model/bundled/tokenizer.json, so the
# vocabulary stays the bundled model's), train until the call's time budget is nearly spent
# (resuming RUN when it holds a checkpoint, e.g. carried in), and pack the weights, log and
# tokenizer into $OUT in parts small enough to come back (model/train/gpu_kit.py).
#
#   OUT=/some/dir scripts/gpu-train.sh [extra model.train.train flags]
#
# Every setting is an environment variable with a default below. BUDGET_S is the whole call,
# corpus and data build included: training gets what the build leaves, less RESERVE_S for the
# final evaluation, checkpoint and packing. PHASE=build only builds the corpus and token
# streams; PHASE=train only trains and packs (on a build already in WORK): scripts/gpu-check.sh
# builds while the GPU measures, then trains with the time left (BUDGET_S from then on).
# LOG is the console log's path (default $OUT/console.log).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?set OUT to the folder whose files come back}"
PY=${PY:-python3}
RUN=${RUN:-runs/gpu}                   # carried in to resume; packed out at the end
WORK=${WORK:-/tmp/diffusion-lsp-gpu}   # corpus and token streams (rebuilt every call)
BUDGET_S=${BUDGET_S:-540}              # the whole call (the device allows 600 s)
RESERVE_S=${RESERVE_S:-60}             # after training: final eval, checkpoint, pack
ROOTS=${ROOTS:-}                        # folders the corpus is read from (default: this
                                       # Python's stdlib and site-packages)
CORPUS_MB=${CORPUS_MB:-800}            # cap on the corpus (deterministic sample); keep it
                                       # the same in every call (it fixes the validation set)
WORKERS=${WORKERS:-$(nproc)}
DEVICE=${DEVICE:-auto}
TOTAL_MINUTES=${TOTAL_MINUTES:-15}     # the LR schedule spans this much training over all calls
                                       # (two calls); pass the same value in every call
THREADS=${THREADS:-}                   # torch CPU threads (for a CPU trial run)
PHASE=${PHASE:-all}                    # all | build | train
LOG=${LOG:-$OUT/console.log}
# the network (about 23M parameters: 46 MB in float16, which fits the 64 MiB a call carries in)
HIDDEN=${HIDDEN:-512} LAYERS=${LAYERS:-6} HEADS=${HEADS:-8} KV_HEADS=${KV_HEADS:-4}
SEQ_LEN=${SEQ_LEN:-512} BATCH=${BATCH:-128} LR=${LR:-1e-3}

export PYTHONUNBUFFERED=1
began=$SECONDS
mkdir -p "$OUT" "$WORK"

build() {
roots=()
[ -n "$ROOTS" ] && roots=(--roots $ROOTS)
$PY -m model.train.corpus --out "$WORK/corpus" --max-mb "$CORPUS_MB" --workers "$WORKERS" \
    "${roots[@]}" \
    | $PY -c 'import json, sys; s = json.load(sys.stdin); print("corpus", s["files"], s["bytes"])'
corpus_s=$((SECONDS - began))
$PY -m model.train.data --corpus "$WORK/corpus" --tokenizer model/bundled/tokenizer.json \
    --out "$WORK/data" --workers "$WORKERS"
data_s=$((SECONDS - began - corpus_s))
echo "built corpus in ${corpus_s}s, data in ${data_s}s"
}

train() {
minutes=$($PY -c "print(max(0.5, ($BUDGET_S - $((SECONDS - began)) - $RESERVE_S) / 60))")
resume=()
[ -f "$RUN/ckpt-last.pt" ] && resume=(--resume) && echo "resuming $RUN"
threads=()
[ -n "$THREADS" ] && threads=(--threads "$THREADS")
echo "training for $minutes minutes"
# the hard stop keeps the call inside its limit; the last periodic checkpoint is packed then
timeout --signal=INT "$((BUDGET_S - (SECONDS - began) - 10))" \
$PY -m model.train.train --data "$WORK/data" --tokenizer model/bundled/tokenizer.json \
    --run "$RUN" --minutes "$minutes" --total-minutes "$TOTAL_MINUTES" --device "$DEVICE" \
    --hidden "$HIDDEN" --layers "$LAYERS" --heads "$HEADS" --kv-heads "$KV_HEADS" \
    --seq-len "$SEQ_LEN" --batch-size "$BATCH" --lr "$LR" --eval-every 60 --save-every 120 \
    --no-progress "${resume[@]}" "${threads[@]}" "$@" || echo "training stopped early ($?)"
train_s=$((SECONDS - began))
tail -n 4 "$RUN/log.jsonl"

$PY -m model.train.gpu_kit pack --run "$RUN" --corpus "$WORK/corpus" --out "$OUT"
echo "gpu-train: train and pack ${train_s}s"
}

main() {
echo "gpu-train: $(date -u +%FT%TZ) on $(hostname), $WORKERS workers, run $RUN, phase $PHASE"
$PY -c 'import torch, transformers; print("torch", torch.__version__, "transformers",
transformers.__version__, "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))'
case "$PHASE" in
  all) build && train "$@" ;;
  build) build ;;
  train) train "$@" ;;
  *) echo "PHASE must be all, build or train (got $PHASE)" >&2; return 2 ;;
esac
echo "gpu-train: total $((SECONDS - began))s"
}

main "$@" 2>&1 | tee "$LOG"
