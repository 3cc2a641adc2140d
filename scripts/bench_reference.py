#!/usr/bin/env python3
"""Reference timings of HF transformers on a causal LM (for comparison with mechc's forward).

Run with the reference venv (scripts/setup_python.sh), on an HF dir, e.g. one made by
`mechc import SmolLM2-135M-Instruct.Q4_1.gguf --out DIR`:

    .cache/venv/bin/python scripts/bench_reference.py DIR [--ids-file ids.json] [--write-ids ids.json]

Measures, f32 on CPU with torch.set_num_threads(THREADS) (default 2):
  * prefill_64_ms / prefill_512_ms: one forward over the first 64 / 512 ids (batch 1, no KV cache,
    logits at every position), median of --runs (default 5) after 1 warm-up;
  * decode_tok_s: model.generate greedy, exactly 64 new tokens (min_new_tokens=64, so EOS does not
    stop it) from the first 16 ids, median of --decode-runs (default 3) after 1 warm-up;
    tok/s = 64 / wall time of the whole generate call (which includes the 16-token prefill);
  * peak_rss_mb: each measurement runs in its own fresh subprocess (the parent imports neither
    torch nor transformers); ru_maxrss of that subprocess, which includes loading the model.
    `peak_rss_mb` is the maximum over the measurements, `rss_mb` has each one.

Input ids: --ids-file F.json (a JSON list of >= 512 ints; its prefixes are used), so the Rust
side can time exactly the same ids. Without it, the first non-empty lines of WikiText-2 test
($MECHC_SHARED_DATA/text/wikitext2-test.raw, default <repo>/../shared/data) are tokenized with the
model dir's tokenizer (no special tokens) until >= 512 ids; --write-ids F.json saves those ids.

Prints one JSON object on stdout; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MECHC_SHARED_DATA", REPO.parent / "shared" / "data"))
N_PREFILL = (64, 512)
DECODE_PROMPT, DECODE_NEW = 16, 64
MIN_IDS = max(N_PREFILL)


def log(*a):
    print("[bench_reference]", *a, file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ------------------------------------------------------------------------------------------
# child: one measurement in a fresh process


def _load(model_dir: str, threads: int, attn: str):
    import torch

    torch.set_num_threads(threads)
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn).eval()
    return torch, model, time.perf_counter() - t0


def child(args) -> dict:
    ids = json.loads(Path(args.ids_file).read_text())
    torch, model, load_s = _load(args.model_dir, args.threads, args.attn)
    out = {"load_s": load_s, "threads": torch.get_num_threads(), "attn": model.config._attn_implementation}
    with torch.inference_mode():
        if args.measure == "prefill":
            x = torch.tensor([ids[: args.n]], dtype=torch.long)
            times = []
            for i in range(args.runs + 1):
                t0 = time.perf_counter()
                logits = model(input_ids=x, use_cache=False).logits
                dt = time.perf_counter() - t0
                assert logits.shape[1] == args.n
                if i > 0:  # the first run is the warm-up
                    times.append(dt * 1e3)
            out.update(times_ms=times, median_ms=statistics.median(times))
        elif args.measure == "decode":
            x = torch.tensor([ids[:DECODE_PROMPT]], dtype=torch.long)
            mask = torch.ones_like(x)
            pad = model.generation_config.pad_token_id
            if pad is None or not (0 <= int(pad) < model.config.vocab_size):
                pad = model.generation_config.eos_token_id
                pad = pad[0] if isinstance(pad, list) else pad
            kw = dict(attention_mask=mask, do_sample=False, max_new_tokens=DECODE_NEW, min_new_tokens=DECODE_NEW,
                      pad_token_id=pad, temperature=None, top_p=None, top_k=None)
            rates, times = [], []
            for i in range(args.runs + 1):
                t0 = time.perf_counter()
                y = model.generate(x, **kw)
                dt = time.perf_counter() - t0
                n_new = y.shape[1] - x.shape[1]
                assert n_new == DECODE_NEW, n_new
                if i > 0:
                    times.append(dt * 1e3)
                    rates.append(n_new / dt)
            out.update(times_ms=times, tok_s=rates, median_tok_s=statistics.median(rates),
                       generated_ids=y[0, DECODE_PROMPT:].tolist())
        else:
            raise SystemExit(f"unknown measurement {args.measure}")
    out["peak_rss_mb"] = peak_rss_mb()
    return out


# ------------------------------------------------------------------------------------------
# parent


def default_ids(model_dir: str) -> list[int]:
    """First non-empty WikiText-2 test lines, tokenized without special tokens, until >= 512 ids.
    (Runs in a child process, see --_measure ids.)"""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    text, ids = "", []
    with open(SHARED_DATA / "text" / "wikitext2-test.raw", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            text += line.replace("\r\n", "\n")
            ids = tok(text, add_special_tokens=False)["input_ids"]
            if len(ids) >= MIN_IDS:
                return list(ids)
    raise SystemExit(f"could not get {MIN_IDS} ids from wikitext2-test.raw")


def run_child(base: list[str], extra: list[str]) -> dict:
    p = subprocess.run(base + extra, capture_output=True, text=True)
    if p.returncode != 0:
        sys.stderr.write(p.stderr)
        raise SystemExit(f"measurement failed: {' '.join(extra)}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def versions() -> dict:
    from importlib.metadata import version

    v = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "tokenizers", "safetensors", "numpy"):
        try:
            v[pkg] = version(pkg)
        except Exception:  # pragma: no cover
            v[pkg] = None
    return v


def cpu_name() -> str | None:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def loadavg() -> list[float] | None:
    try:
        return [float(x) for x in open("/proc/loadavg").read().split()[:3]]
    except OSError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", help="HF model dir (e.g. from `mechc import`)")
    ap.add_argument("--ids-file", help="JSON list of >= 512 token ids (prefixes are used)")
    ap.add_argument("--write-ids", help="write the ids used to this JSON file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"], help="attention implementation (default sdpa)")
    ap.add_argument("--runs", type=int, default=5, help="timed prefill runs per length (after 1 warm-up)")
    ap.add_argument("--decode-runs", type=int, default=3, help="timed generate runs (after 1 warm-up)")
    ap.add_argument("--_measure", dest="measure", help=argparse.SUPPRESS)
    ap.add_argument("--_n", dest="n", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.measure == "ids":  # child mode: default ids
        print(json.dumps(default_ids(args.model_dir)))
        return
    if args.measure:  # child mode: one measurement
        print(json.dumps(child(args)))
        return

    # The parent imports neither torch nor transformers: a child's ru_maxrss would otherwise
    # include the parent's resident set (Linux carries the pre-exec hiwater mark over exec).

    model_dir = str(Path(args.model_dir).resolve())
    if args.ids_file:
        ids = json.loads(Path(args.ids_file).read_text())
        src = str(Path(args.ids_file).resolve())
    else:
        ids = run_child([sys.executable, str(Path(__file__).resolve()), model_dir], ["--_measure", "ids"])
        src = "wikitext2-test.raw (first lines, no special tokens)"
    if not (isinstance(ids, list) and all(isinstance(i, int) for i in ids) and len(ids) >= MIN_IDS):
        raise SystemExit(f"--ids-file must hold a JSON list of >= {MIN_IDS} ints")
    if args.write_ids:
        Path(args.write_ids).write_text(json.dumps(ids))
    ids_path = Path(args.write_ids) if args.write_ids else None
    import tempfile

    tmp = None
    if ids_path is None:
        tmp = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        tmp.write(json.dumps(ids))
        tmp.close()
        ids_path = Path(tmp.name)

    base = [sys.executable, str(Path(__file__).resolve()), model_dir, "--ids-file", str(ids_path),
            "--threads", str(args.threads), "--attn", args.attn]
    res = {}
    load_before = loadavg()
    try:
        for n in N_PREFILL:
            log(f"prefill {n} tokens ({args.runs} runs + warm-up, fresh process)")
            res[f"prefill_{n}"] = run_child(base, ["--_measure", "prefill", "--_n", str(n), "--runs", str(args.runs)])
            log(f"  median {res[f'prefill_{n}']['median_ms']:.1f} ms")
        log(f"decode {DECODE_NEW} new tokens from {DECODE_PROMPT} ({args.decode_runs} runs + warm-up, fresh process)")
        res["decode"] = run_child(base, ["--_measure", "decode", "--runs", str(args.decode_runs)])
        log(f"  median {res['decode']['median_tok_s']:.2f} tok/s")
    finally:
        if tmp is not None:
            os.unlink(tmp.name)

    rss = {k: round(v["peak_rss_mb"], 1) for k, v in res.items()}
    out = {
        "impl": "transformers",
        "model_dir": model_dir,
        "dtype": "float32",
        "attn_implementation": res["decode"]["attn"],
        "prefill_64_ms": round(res["prefill_64"]["median_ms"], 2),
        "prefill_512_ms": round(res["prefill_512"]["median_ms"], 2),
        "decode_tok_s": round(res["decode"]["median_tok_s"], 3),
        "peak_rss_mb": max(rss.values()),
        "threads": res["decode"]["threads"],
        "rss_mb": rss,
        "runs": {"prefill": args.runs, "decode": args.decode_runs, "warmup": 1},
        "raw": {
            "prefill_64_ms": [round(t, 2) for t in res["prefill_64"]["times_ms"]],
            "prefill_512_ms": [round(t, 2) for t in res["prefill_512"]["times_ms"]],
            "decode_tok_s": [round(r, 3) for r in res["decode"]["tok_s"]],
            "load_s": {k: round(v["load_s"], 2) for k, v in res.items()},
        },
        "method": {
            "prefill": "model(input_ids[:n], use_cache=False) under torch.inference_mode(), batch 1, logits at all positions",
            "decode": f"model.generate(first {DECODE_PROMPT} ids, do_sample=False, max_new_tokens={DECODE_NEW}, "
                      f"min_new_tokens={DECODE_NEW}); tok/s = {DECODE_NEW} / wall time incl. the prompt prefill",
            "rss": "ru_maxrss of a fresh subprocess per measurement (includes model load)",
        },
        "inputs": {"ids_source": src, "n_ids": len(ids),
                   "ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
                   "decode_generated_ids": res["decode"]["generated_ids"]},
        "versions": versions(),
        "cpu": cpu_name(),
        "os_cpu_count": os.cpu_count(),
        # the timings are only meaningful on an otherwise idle machine: a 1-min load average well above
        # 0 before/after means something else (e.g. a cargo build) was competing for the cores
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
