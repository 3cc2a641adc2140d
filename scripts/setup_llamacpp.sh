#!/usr/bin/env bash
# llama.cpp for the GGUF interop tests (tests/interop/test_gguf_llamacpp.py): llama-cpp-python,
# built from its PyPI source (the registry ships no Linux wheel; it vendors llama.cpp) into a
# wheel cached at $MECHC_CACHE/wheels, then installed into the reference venv
# (scripts/setup_python.sh first). The build is CPU-only and portable (no -march=native, no
# OpenMP); it takes ~6.5 min on 2 cores, once. Re-running with the wheel cached is seconds.
# Usage: scripts/setup_llamacpp.sh
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$(bash "$REPO/scripts/cache_dir.sh")"
PY="$CACHE/venv/bin/python"
VERSION=0.3.36
WHEELS="$CACHE/wheels"

log() { printf '[setup_llamacpp] %s\n' "$*" >&2; }
[ -x "$PY" ] || { log "no venv at $CACHE/venv (run scripts/setup_python.sh first)"; exit 1; }

if "$PY" -c "import llama_cpp, sys; sys.exit(llama_cpp.__version__ != '$VERSION')" 2>/dev/null; then
    log "llama-cpp-python $VERSION already installed"
    exit 0
fi
mkdir -p "$WHEELS"
wheel="$(ls "$WHEELS"/llama_cpp_python-$VERSION-*.whl 2>/dev/null | head -1 || true)"
if [ -z "$wheel" ]; then
    log "building llama-cpp-python $VERSION from source (~6.5 min on 2 cores, cached in ${WHEELS#$REPO/})"
    start=$(date +%s)
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        "$PY" -m pip wheel --disable-pip-version-check --quiet --no-deps --no-binary llama-cpp-python \
        "llama-cpp-python==$VERSION" -w "$WHEELS"
    log "built in $(( $(date +%s) - start )) s"
    wheel="$(ls "$WHEELS"/llama_cpp_python-$VERSION-*.whl | head -1)"
fi
# diskcache: the one pure-Python dependency llama_cpp imports at load time.
"$PY" -m pip install --disable-pip-version-check --quiet --no-deps "$wheel" diskcache==5.6.3
"$PY" -c "import llama_cpp; print('[setup_llamacpp] llama-cpp-python', llama_cpp.__version__)" >&2
