#!/usr/bin/env bash
# Create (idempotently) the Python reference environment used by interop tests and
# benchmarks: a venv at $MECHC_CACHE/venv (default <repo>/.cache/venv) with the pinned
# packages of scripts/requirements-ref.txt (torch, transformers, accelerate, gguf, ...).
#
# torch comes from PyPI with its CUDA wheels (~3 GB; no CPU-only index is reachable
# here); it runs on CPU. Re-running is cheap: a stamp file holding the sha256 of the
# requirements file (and of the python version) skips pip when nothing changed.
#
# Usage: scripts/setup_python.sh            # prints the venv python path at the end
#        MECHC_CACHE=/some/dir scripts/setup_python.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$(bash "$REPO/scripts/cache_dir.sh")"   # the cache mechc uses too
VENV="$CACHE/venv"
REQ="${MECHC_PY_REQUIREMENTS:-$REPO/scripts/requirements-ref.txt}"
PY_BASE="${MECHC_PYTHON:-python3.11}"
STAMP="$VENV/.mechc-requirements.sha256"

log() { printf '[setup_python] %s\n' "$*" >&2; }

[ -f "$REQ" ] || { log "missing requirements file: $REQ"; exit 1; }
command -v "$PY_BASE" >/dev/null 2>&1 || { log "no $PY_BASE on PATH (set MECHC_PYTHON)"; exit 1; }

mkdir -p "$CACHE"

# A venv whose interpreter or pip no longer runs (python upgraded/removed, creation
# interrupted) is rebuilt. (venv scripts embed their absolute path, so it is created in
# place rather than in a temp dir + rename.)
if [ -e "$VENV" ] && ! "$VENV/bin/python" -m pip --version >/dev/null 2>&1; then
    log "venv at $VENV is broken or incomplete; recreating"
    rm -rf "$VENV"
fi

if [ ! -e "$VENV" ]; then
    log "creating venv at $VENV ($("$PY_BASE" --version 2>&1))"
    "$PY_BASE" -m venv "$VENV" || { rm -rf "$VENV"; exit 1; }
fi

PY="$VENV/bin/python"
want="$( { sha256sum "$REQ" | cut -d' ' -f1; "$PY" -c 'import sys; print(sys.version)'; } | sha256sum | cut -d' ' -f1)"
have="$(cat "$STAMP" 2>/dev/null || true)"

if [ "$want" = "$have" ]; then
    log "requirements already satisfied (stamp matches); nothing to do"
else
    log "installing $(grep -cvE '^\s*(#|$)' "$REQ") pinned packages from ${REQ#$REPO/} (torch pulls ~3 GB of CUDA wheels; a few minutes)"
    rm -f "$STAMP"
    "$PY" -m pip install --disable-pip-version-check --quiet --upgrade pip
    "$PY" -m pip install --disable-pip-version-check --quiet -r "$REQ"
    "$PY" - <<'PYEOF'
import importlib
for m in ("torch", "transformers", "accelerate", "gguf", "safetensors", "numpy",
          "pytest", "sentencepiece", "google.protobuf"):
    importlib.import_module(m)
PYEOF
    printf '%s\n' "$want" > "$STAMP"
    log "done"
fi

echo "$PY"
