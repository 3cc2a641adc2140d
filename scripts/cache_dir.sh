#!/usr/bin/env bash
# Print the cache root, by the same rule mechc itself uses (src/io/mod.rs, cache_root), so the
# scripts and a hand-run mechc share one cache (GGUF imports, findings, covariances) and the
# scripts' downloads (models/, venv/) sit beside it:
#   $MECHC_CACHE if set and non-empty, else <this checkout>/.cache
# (mechc falls back to ~/.cache/mechc only when it was built outside a checkout.)
# Usage: MECHC_CACHE="$(bash scripts/cache_dir.sh)"
set -euo pipefail
if [ -n "${MECHC_CACHE:-}" ]; then
    printf '%s\n' "$MECHC_CACHE"
else
    printf '%s\n' "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/.cache"
fi
