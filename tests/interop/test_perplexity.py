"""`mechc eval perplexity` against transformers computing the same sliding-window perplexity
(same token ids, sequence length and stride) on WikiText-2 with SmolLM2-135M-Instruct."""

import json
import math

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from interop_common import SHARED_DATA

TOKENS, SEQ_LEN, STRIDE = 4096, 512, 256


def reference_perplexity(model, ids: list[int]) -> tuple[float, int]:
    """The transformers docs' sliding window ("Perplexity of fixed-length models"), with each
    scored token's NLL summed exactly (the docs weight each window's mean loss by
    num_valid_tokens - 1, which is off by one token for every window after the first)."""
    nll, count, prev_end, n = 0.0, 0, 0, len(ids)
    for begin in range(0, n, STRIDE):
        end = min(begin + SEQ_LEN, n)
        trg_len = end - prev_end
        window = torch.tensor([ids[begin:end]])
        with torch.no_grad():
            logp = torch.log_softmax(model(window).logits[0].double(), dim=-1)
        first = max(end - begin - trg_len, 1)
        for j in range(first, end - begin):
            nll -= logp[j - 1, ids[begin + j]].item()
            count += 1
        prev_end = end
        if end == n:
            break
    return math.exp(nll / count), count


def test_perplexity_matches_transformers(mechc, imports, workdir):
    model_dir = imports["smollm2"]
    raw = (SHARED_DATA / "text" / "wikitext2-test.raw").read_text(encoding="utf-8")
    text_file = workdir / "wikitext2-lf.txt"
    text_file.write_text(raw.replace("\r\n", "\n"), encoding="utf-8")
    ours = json.loads(mechc.run("eval", "perplexity", "--model", model_dir, "--text", text_file,
                                "--tokens", str(TOKENS), "--seq-len", str(SEQ_LEN), "--stride", str(STRIDE), "--json"))
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(raw.replace("\r\n", "\n"), add_special_tokens=False)["input_ids"][:TOKENS]
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
    ppl, count = reference_perplexity(hf, ids)
    assert ours["scored_tokens"] == count and ours["total_tokens"] == len(ids)
    rel = abs(ours["perplexity"] - ppl) / ppl
    print(f"[perplexity] smollm2 wikitext2 {TOKENS} tokens, seq {SEQ_LEN}, stride {STRIDE}: "
          f"mechc {ours['perplexity']:.4f}, transformers {ppl:.4f}, relative difference {rel:.2e}")
    assert rel <= 1e-3, f"mechc {ours['perplexity']} vs transformers {ppl}"
