"""`mechc eval edit` against transformers computing ROME's CounterFact numbers on the same
imported SmolLM2 directory (f32, eager attention): for each record, the mean per-token
log-prob of " " + target after a prompt, ids from transformers' own tokenizer of the dir
(prompt with add_special_tokens=True, " " + target without, as ROME scores the separately
tokenised target after the prompt), and the success flags derived from them."""

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from interop_common import SHARED_DATA

N_RECORDS = 10
ATOL = 1e-4


def mean_logprob(model, tok, prompt: str, target: str) -> float:
    p = tok(prompt, add_special_tokens=True)["input_ids"]
    t = tok(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + t])).logits[0].double()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(logp[len(p) - 1 + j, t[j]].item() for j in range(len(t))) / len(t)


@pytest.mark.parametrize("precise", [True, False], ids=["precise", "fast"])
def test_edit_eval_matches_transformers(mechc, imports, precise, report):
    model_dir = imports["smollm2"]
    records_file = SHARED_DATA / "prompts" / "counterfact" / "counterfact-edit.json"
    records = json.loads(records_file.read_text(encoding="utf-8"))[:N_RECORDS]
    args = ["eval", "edit", "--model", model_dir, "--records", records_file, "--limit", str(N_RECORDS),
            "--batch-size", "4", "--json"]
    if precise:
        args.append("--precise")
    ours = json.loads(mechc.run(*args))["model"]
    assert ours["n"] == N_RECORDS and len(ours["records"]) == N_RECORDS

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager").eval()
    worst = 0.0
    successes = {"efficacy": 0, "paraphrase": 0, "neighbourhood": 0}
    for rec, got in zip(records, ours["records"]):
        assert got["id"] == rec["case_id"]
        want = {
            "efficacy": (mean_logprob(hf, tok, rec["prompt"], rec["target_new"]),
                         mean_logprob(hf, tok, rec["prompt"], rec["ground_truth"])),
            "paraphrase": (mean_logprob(hf, tok, rec["rephrase_prompt"], rec["target_new"]),
                           mean_logprob(hf, tok, rec["rephrase_prompt"], rec["ground_truth"])),
            "neighbourhood": (mean_logprob(hf, tok, rec["locality_prompt"], rec["target_new"]),
                              mean_logprob(hf, tok, rec["locality_prompt"], rec["locality_ground_truth"])),
        }
        for kind, (lp_new, lp_true) in want.items():
            g = got[kind]
            for ours_lp, ref_lp, which in ((g["new_logprob"], lp_new, "new"), (g["true_logprob"], lp_true, "true")):
                diff = abs(ours_lp - ref_lp)
                worst = max(worst, diff)
                assert diff <= ATOL, f"case {rec['case_id']} {kind} {which}: mechc {ours_lp} vs transformers {ref_lp}"
            ahead = lp_new > lp_true if kind != "neighbourhood" else lp_true > lp_new
            if abs(lp_new - lp_true) > 10 * ATOL:  # a near-tie may legitimately flip
                assert g["success"] == ahead, f"case {rec['case_id']} {kind}: success flag"
            mag = math.exp(lp_new) - math.exp(lp_true)
            mag = mag if kind != "neighbourhood" else -mag
            assert abs(g["magnitude"] - mag) <= 1e-4
            successes[kind] += g["success"]
    for kind, metric in (("efficacy", "efficacy"), ("paraphrase", "paraphrase"), ("neighbourhood", "neighbourhood")):
        assert abs(ours[metric]["rate"] - 100.0 * successes[kind] / N_RECORDS) < 1e-9
    report.append(f"[edit eval] smollm2, {N_RECORDS} CounterFact records, {'precise' if precise else 'fast'}: "
                  f"max |mean log-prob diff| vs transformers {worst:.2e}")
    print(report[-1])
