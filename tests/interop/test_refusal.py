"""`mechc eval refusal` against transformers: the greedy completions mechc judges must be the ones
transformers produces from the same imported directory (chat template, f32, eager attention).

Greedy decoding is run by hand here (KV cache, argmax over the log-softmax in f64) so that no
generation_config setting (repetition penalty, sampling defaults) can slip in, and so that the
top-2 margin is known at every step. The completions must be equal token for token; the only
tolerated difference is a divergence at step >= EXACT_PREFIX where transformers' own top-2 margin
is below NEAR_TIE (an argmax near-tie that float summation order may flip; mechc generates the five
prompts as one left-padded batch). The first token's log-prob, which mechc reports per completion,
must agree within FIRST_LP_ATOL.
"""

import json
import os

import torch

from interop_common import SHARED_DATA

MODEL = "qwen2.5-coder"
N_PROMPTS, MAX_NEW = 5, 32
EXACT_PREFIX = 8
NEAR_TIE = 1e-2  # nats between the top two log-probs
FIRST_LP_ATOL = float(os.environ.get("MECHC_INTEROP_LOGIT_ATOL", "1e-4"))


def hf_greedy(model, ids: list[int], stop: set[int]) -> tuple[list[int], list[float], float]:
    """Greedy tokens, the top-2 margin at each step, and the first token's log-prob."""
    tokens, margins, first_lp = [], [], None
    with torch.no_grad():
        out = model(torch.tensor([ids]), use_cache=True)
        for _ in range(MAX_NEW):
            lp = torch.log_softmax(out.logits[0, -1].double(), dim=-1)
            top = torch.topk(lp, 2)
            nxt = int(top.indices[0])
            if first_lp is None:
                first_lp = float(lp[nxt])
            tokens.append(nxt)
            margins.append(float(top.values[0] - top.values[1]))
            if nxt in stop:
                break
            out = model(torch.tensor([[nxt]]), cache=out.cache, use_cache=True)
    return tokens, margins, first_lp


def test_refusal_completions_match_transformers(mechc, imports, hf_dir, report):
    model_dir = imports[MODEL]
    harmful = SHARED_DATA / "prompts" / "refusal" / "harmful_val.json"
    prompts = [r["instruction"] for r in json.loads(harmful.read_text(encoding="utf-8"))[:N_PROMPTS]]
    ours = json.loads(mechc.run("eval", "refusal", "--model", model_dir, "--prompts", f"{harmful}:instruction",
                                "--limit", str(N_PROMPTS), "--max-tokens", str(MAX_NEW),
                                "--batch-size", str(N_PROMPTS), "--json"))["prompts"]
    assert [c["prompt"] for c in ours["completions"]] == prompts
    stop = set(ours["stop_tokens"])
    tok, model = hf_dir.get(MODEL)

    worst_lp, notes = 0.0, []
    for i, (p, c) in enumerate(zip(prompts, ours["completions"])):
        text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        theirs, margins, first_lp = hf_greedy(model, ids, stop)
        mine = c["tokens"]
        d = next((j for j, (a, b) in enumerate(zip(mine, theirs)) if a != b), None)
        if d is None:
            assert len(mine) == len(theirs), f"prompt {i}: same tokens but lengths {len(mine)} vs {len(theirs)}"
        else:
            assert d >= EXACT_PREFIX and margins[d] < NEAR_TIE, (
                f"prompt {i}: mechc and transformers diverge at token {d} (transformers' top-2 margin "
                f"{margins[d]:.3g} nats)\nmechc:        {tok.decode(mine)!r}\ntransformers: {tok.decode(theirs)!r}")
            notes.append(f"prompt {i} diverges at token {d} (near-tie, margin {margins[d]:.2g})")
        # The decoded completion and its judgement are the ones transformers' tokens give.
        if d is None:
            assert c["completion"] == tok.decode(theirs, skip_special_tokens=True), f"prompt {i}"
        err = abs(c["first_token_logprob"] - first_lp)
        worst_lp = max(worst_lp, err)
        assert err <= FIRST_LP_ATOL, f"prompt {i}: first-token log-prob {c['first_token_logprob']} vs {first_lp}"
    refused = sum(c["refused"] for c in ours["completions"])
    report.append(f"[refusal] {MODEL}: {N_PROMPTS} harmful_val greedy {MAX_NEW}-token completions equal transformers' "
                  f"({'; '.join(notes) or 'all token for token'}); first-token log-prob max diff {worst_lp:.2e}; "
                  f"{refused}/{N_PROMPTS} refused")
