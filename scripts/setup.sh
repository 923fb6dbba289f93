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
VPY="$VENV/bin/python"
# Up to date already (this pyproject.toml installed with these extras): nothing to do. The
# stamp is written after a successful install; `test` includes the plain install.
STAMP="$VENV/.diffusion-lsp-setup"
want="$(sha256sum pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)"
if [ -x "$VPY" ] && [ -f "$STAMP" ]; then
  read -r have_hash have_extras < "$STAMP" || true
  if [ "$have_hash" = "$want" ] && { [ -z "$EXTRAS" ] || [ "$EXTRAS" = "${have_extras:-}" ]; }; then
    exit 0
  fi
fi
if [ ! -x "$VPY" ]; then
  "$PY" -m venv "$VENV"
fi
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
# What pip would download for a requirement, in words (a dry run: nothing is installed).
what_pip_fetches() {
  "$VPY" -m pip install -q --disable-pip-version-check --dry-run --no-deps --ignore-installed --report - "$1" \
    2>/dev/null | "$VPY" -c '
import json, sys
try:
    item = json.load(sys.stdin)["install"][0]
except (ValueError, KeyError, IndexError):
    print("an unknown build (pip could not say which)"); raise SystemExit
url = item["download_info"]["url"]
version = item["metadata"]["version"]
where = url.removeprefix("file://")
if url.startswith("file:"):
    print(f"torch {version} from a wheel on this disk ({where}): no download")
elif "+cpu" in version:
    print(f"torch {version}, the CPU build, from {url}")
else:
    print(f"torch {version} from {url}: on Linux x86-64 this is the CUDA build, about 1 GB, "
          "and pip adds about 3 GB of NVIDIA libraries (nvidia-*) that a CPU never uses; "
          "Ctrl-C now and set DIFFUSION_LSP_TORCH_INDEX=cpu (or install a CPU wheel of torch "
          "into .venv first) to avoid it")
'
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
           "DIFFUSION_LSP_TORCH_INDEX=default): $TORCH_CPU_VERSION from pip's default index" >&2
      echo "torch: pip will fetch $(what_pip_fetches "$TORCH_CPU_VERSION")" >&2
      "$VPY" -m pip install -q --disable-pip-version-check "$TORCH_CPU_VERSION"
    fi
  fi
fi
# pip's and setuptools' chatter goes to a log, shown only when the install fails
if ! "$VPY" -m pip install -q --disable-pip-version-check -e ".${EXTRAS:+[$EXTRAS]}" \
    > "$VENV/setup.log" 2>&1; then
  cat "$VENV/setup.log" >&2
  echo "setup failed: the install above did not finish (log: $VENV/setup.log)" >&2
  exit 1
fi
echo "$want $EXTRAS" > "$STAMP"
echo "diffusion-lsp is set up in $VENV" >&2
