#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run calls this):
#   1. fetch the registry models (SmolLM2-135M-Instruct, Qwen2.5-Coder-0.5B-Instruct) into .cache/
#   2. create the Python reference venv (torch + transformers) in .cache/venv
#   3. cargo test --release: unit, property, gradient, model-card and bad-input tests
#   4. pytest tests/interop: our logits and token ids against HF transformers, for real
# Everything downloaded lives in the git-ignored .cache/ and is reused on the next run.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export MECHC_CACHE="${MECHC_CACHE:-$REPO/.cache}"
export MECHC_SHARED_DATA="${MECHC_SHARED_DATA:-$REPO/../shared/data}"

step() { printf '\n==> %s\n' "$*"; }

step "fetching models"
bash scripts/fetch_models.sh
step "python reference environment"
bash scripts/setup_python.sh
step "cargo test --release"
cargo test --release
step "interop tests against HF transformers"
MECHC_BIN="$REPO/target/release/mechc" "$MECHC_CACHE/venv/bin/python" -m pytest tests/interop -q -p no:cacheprovider
