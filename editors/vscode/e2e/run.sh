#!/usr/bin/env bash
# The packaged extension in a real VS Code (code-server) driven by Chromium: open a Python file,
# type, wait for ghost text from the real server, screenshot, accept it with Tab.
#
#   editors/vscode/e2e/setup.sh            # once: Chromium, code-server, playwright-core
#   editors/vscode/e2e/run.sh [VSIX]       # builds the .vsix first when none is given
#
# MODEL=tiny (default: a tiny random-weight model, fast, its text is noise) | bundled | DIR
# SHOT=path.png (default: $RUN/vscode.png)  PORT=18081  DIFFUSION_LSP_E2E_DIR=install dir
# SETTINGS='{"diffusionLsp.completion.maxTokensSingleLine": 8}': more user settings
# SCRIPT=nes-test.js FILE=shapes.py: next edits instead of ghost text
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
EXT=$(cd "$HERE/.." && pwd)
ROOT=$(cd "$EXT/../.." && pwd)
DIR=${DIFFUSION_LSP_E2E_DIR:-$HOME/.cache/diffusion-lsp-e2e}
CS=$DIR/node_modules/.bin/code-server
PORT=${PORT:-18081}
MODEL=${MODEL:-tiny}
SETTINGS=${SETTINGS:-"{}"}
PYTHON=${PYTHON:-$ROOT/.venv/bin/python}
SERVER=${SERVER:-$ROOT/.venv/bin/diffusion-lsp}
[ -x "$CS" ] || { echo "code-server not found in $DIR: run $HERE/setup.sh first" >&2; exit 3; }

VSIX=${1:-${VSIX:-}}  # VSIX=path: that package (e.g. an older build, to compare)
if [ -z "$VSIX" ]; then
  (cd "$EXT" && { [ -d node_modules ] || npm ci --no-audit --no-fund; } && npm run package >/dev/null)
  VSIX=$EXT/diffusion-lsp.vsix
fi

RUN=$(mktemp -d)
SHOT=${SHOT:-$RUN/vscode.png}
mkdir -p "$RUN/ud/User" "$RUN/ext" "$RUN/ws"
case $MODEL in
  tiny) (cd "$ROOT" && "$PYTHON" -m model.network.tiny "$RUN/model" --seed "${TINY_SEED:-0}" >/dev/null)
        MODEL_JSON="\"$RUN/model\"" ;;
  bundled) MODEL_JSON=null ;;
  *) MODEL_JSON="\"$MODEL\"" ;;
esac
"$PYTHON" - "$HERE/settings.json" "$RUN/ud/User/settings.json" "$SERVER" "$MODEL_JSON" \
  "$SETTINGS" <<'PY'
import json, sys
settings = json.load(open(sys.argv[1]))
settings["diffusionLsp.serverPath"] = sys.argv[3]
settings["diffusionLsp.model.path"] = json.loads(sys.argv[4])
settings.update(json.loads(sys.argv[5]))
json.dump(settings, open(sys.argv[2], "w"), indent=2)
PY
cat > "$RUN/ws/fibonacci.py" <<'PY'
def fibonacci(n: int) -> int:
    """Return the n-th Fibonacci number."""
    if n < 2:
        return n
PY
cat > "$RUN/ws/shapes.py" <<'PY'
def area(width, height):
    """The area of a width by height rectangle."""
    return width * height


print(area(2, 3))
PY
printf 'bind-addr: 127.0.0.1:%s\nauth: none\ncert: false\n' "$PORT" > "$RUN/config.yaml"
export XDG_DATA_HOME=$RUN/xdg-data XDG_CONFIG_HOME=$RUN/xdg-config XDG_CACHE_HOME=$RUN/xdg-cache
COMMON=(--config "$RUN/config.yaml" --user-data-dir "$RUN/ud" --extensions-dir "$RUN/ext")
"$CS" "${COMMON[@]}" --install-extension "$VSIX" >"$RUN/install.log" 2>&1 \
  || { cat "$RUN/install.log"; exit 1; }
"$CS" "${COMMON[@]}" --auth none --disable-telemetry --disable-update-check \
  --disable-workspace-trust --bind-addr "127.0.0.1:$PORT" "$RUN/ws" >"$RUN/code-server.log" 2>&1 &
CSPID=$!
trap 'kill $CSPID 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break; sleep 0.2; done
status=0
SCRIPT=${SCRIPT:-ghost-test.js}  # nes-test.js: next edits (FILE=shapes.py)
NODE_PATH=$DIR/node_modules PORT=$PORT WS=$RUN/ws FILE=${FILE:-fibonacci.py} SHOT=$SHOT \
  node "$HERE/$SCRIPT" || status=$?
echo "screenshot: $SHOT"
[ $status -eq 0 ] || { echo "--- code-server log"; tail -30 "$RUN/code-server.log"; }
exit $status
