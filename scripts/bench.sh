#!/usr/bin/env bash
# mechc vs HF transformers on SmolLM2-135M-Instruct, same machine, same run, 2 threads each:
# 64- and 512-token prefill (median of 5), greedy decode tok/s (64 tokens, KV cache), peak RSS.
# Prints both JSON lines and a table of ratios (>1 = mechc better).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export MECHC_CACHE="$(bash "$REPO/scripts/cache_dir.sh")"   # the one cache mechc also finds by hand
SHARED="${MECHC_SHARED_DATA:-$REPO/../shared/data}"
bash scripts/fetch_models.sh smollm2 >&2
bash scripts/setup_python.sh >&2
cargo build --release -q
MECHC=./target/release/mechc
DIR="$MECHC_CACHE/bench/SmolLM2-135M-Instruct"
[ -f "$DIR/config.json" ] || $MECHC -q import "$MECHC_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf" --out "$DIR"
IDS="$MECHC_CACHE/bench/ids.json"
head -c 20000 "$SHARED/text/wikitext2-test.raw" > "$MECHC_CACHE/bench/text.txt"
$MECHC tokenize "$DIR" --file <(python3 -c 'import json,sys; print(json.dumps([open(sys.argv[1]).read()]))' "$MECHC_CACHE/bench/text.txt") --no-special \
    | python3 -c 'import json,sys; print(json.dumps(json.load(sys.stdin)[0][:600]))' > "$IDS"
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2
ours=$($MECHC -q bench "$DIR" --ids-file "$IDS")
theirs=$("$MECHC_CACHE/venv/bin/python" scripts/bench_reference.py "$DIR" --ids-file "$IDS")
echo "$ours"
echo "$theirs"
python3 - "$ours" "$theirs" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
rows = [("prefill 64 tokens (ms)", "prefill_64_ms", False), ("prefill 512 tokens (ms)", "prefill_512_ms", False),
        ("decode (tokens/s)", "decode_tok_s", True), ("peak RSS (MB)", "peak_rss_mb", False)]
print(f"| {'SmolLM2-135M, f32, 2 threads':<30} | {'mechc':>8} | {'transformers':>12} | {'mechc advantage':>15} |")
print(f"|{'-'*32}|{'-'*10}|{'-'*14}|{'-'*17}|")
for name, k, higher_better in rows:
    x, y = a.get(k), b.get(k)
    if x is None or y is None:
        continue
    r = x / y if higher_better else y / x
    print(f"| {name:<30} | {x:>8.1f} | {y:>12.1f} | {r:>14.2f}x |")
PY

# mechc diff throughput: 500 chat-templated prompts, the model against itself (both forwards and
# the KL/top-1 arithmetic), next to the plain forward's tokens/s measured inside the same run.
diff=$($MECHC -q diff "$DIR" "$DIR" --prompts "$SHARED/prompts/refusal/harmless_val.json:instruction" --limit 500 --chat --top 0 --json)
python3 - "$diff" <<'PY'
import json, sys
d = json.loads(sys.argv[1])["prompts"]["result"]
t = d["timing"]
print(f"\ndiff, {d['prompts']} prompts ({d['tokens']} tokens): {t['total_s']:.1f} s = {100 * t['total_s'] / d['prompts']:.1f} s per 100 prompts; "
      f"{t['tokens_per_s']:.0f} tokens/s through both models + comparison; plain forward (model A alone) {t['forward_a_tokens_per_s']:.0f} tokens/s")
PY

# GGUF export throughput and memory: `mechc export --type f32` of the Qwen2.5-0.5B import (2.5 GB
# of f32 safetensors) against `cp` of the same bytes, each after dropping nothing but run twice
# alternately (the page cache holds the source for both); peak RSS of the export.
if [ -f "$MECHC_CACHE/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf" ]; then
    QDIR="$(./target/release/mechc -q inspect "$MECHC_CACHE/models/Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf" --json \
        | python3 -c 'import json,sys; print(json.load(sys.stdin)["path"])')"
    OUT="$(mktemp -d)"
    trap 'rm -rf "$OUT"' EXIT
    for i in 1 2; do
        /usr/bin/time -f "%e %M" -o "$OUT/export.t" $MECHC -q export "$QDIR" --gguf "$OUT/q.gguf" --force
        /usr/bin/time -f "%e %M" -o "$OUT/cp.t" cp "$QDIR/model.safetensors" "$OUT/copy.safetensors"
        rm -f "$OUT/q.gguf" "$OUT/copy.safetensors"
    done
    python3 - "$OUT/export.t" "$OUT/cp.t" "$QDIR/model.safetensors" <<'PY'
import os, sys
(te, rss), (tc, _) = [map(float, open(p).read().split()) for p in sys.argv[1:3]]
gb = os.path.getsize(sys.argv[3]) / 1e9
print(f"\nGGUF export (Qwen2.5-0.5B, f32, {gb:.2f} GB): {te:.1f} s = {gb / te:.2f} GB/s; cp of the same bytes {tc:.1f} s = "
      f"{gb / tc:.2f} GB/s; export/cp throughput {tc / te:.2f}x; export peak RSS {rss / 1024:.0f} MB")
PY
fi
