#!/usr/bin/env bash
# One-time install of what the real-editor test needs, outside the checkout (~450 MB, ~1.5 min):
# Debian's Chromium and ripgrep, then code-server (VS Code 1.100, the newest on Node 20) and
# playwright-core from npm. Needs Node 20 and root (apt-get). Idempotent.
set -euo pipefail
DIR=${1:-${DIFFUSION_LSP_E2E_DIR:-$HOME/.cache/diffusion-lsp-e2e}}
CODE_SERVER=4.100.3
PLAYWRIGHT=1.65.1
mkdir -p "$DIR"
if [ -x "$DIR/node_modules/.bin/code-server" ] && [ -d "$DIR/node_modules/playwright-core" ] \
    && command -v chromium >/dev/null; then
  echo "$DIR: already set up"; exit 0
fi
if ! command -v chromium >/dev/null || ! command -v rg >/dev/null; then
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium libkrb5-dev ripgrep \
    build-essential python3 >/dev/null
fi
# @vscode/ripgrep's postinstall downloads rg from GitHub: pre-seed its cache with Debian's rg.
export TMPDIR=$DIR/tmp
mkdir -p "$TMPDIR/vscode-ripgrep-cache-1.15.11" "$DIR/rgstage"
cp "$(command -v rg)" "$DIR/rgstage/rg"
tar czf "$TMPDIR/vscode-ripgrep-cache-1.15.11/ripgrep-v13.0.0-10-x86_64-unknown-linux-musl.tar.gz" \
  -C "$DIR/rgstage" rg
cd "$DIR"
[ -f package.json ] || npm init -y >/dev/null
# node-pty's postinstall runs `npx node-gyp` (npm_config_yes), which needs Node's headers
# locally (nodedir) rather than downloading them.
npm_config_yes=true npm_config_nodedir=${npm_config_nodedir:-/usr} npm install --no-audit --no-fund \
  --unsafe-perm --foreground-scripts "code-server@$CODE_SERVER" "playwright-core@$PLAYWRIGHT" \
  >"$DIR/install.log" 2>&1 || { tail -40 "$DIR/install.log"; exit 1; }
echo "$DIR: code-server $CODE_SERVER, playwright-core $PLAYWRIGHT, $(chromium --version)"
