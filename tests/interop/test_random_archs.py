"""Architecture options no real checkpoint here exercises -- Llama attention/MLP biases,
llama3 RoPE scaling, tied embeddings, Qwen2 -- on tiny random models written by
`mechc random-model`: transformers must load them and give the logits mechc gives."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[2]
MECHC = os.environ.get("MECHC_BIN", str(REPO / "target/release/mechc"))

VARIANTS = {
    "llama-plain": ["--arch", "llama"],
    "llama-attention-bias": ["--arch", "llama", "--attention-bias"],
    "llama-mlp-bias-tied": ["--arch", "llama", "--mlp-bias", "--tied"],
    "llama3-rope-scaling": ["--arch", "llama", "--llama3-rope", "--attention-bias", "--mlp-bias"],
    "qwen2": ["--arch", "qwen2"],
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
@pytest.mark.parametrize("seed", [1, 2])
def test_random_model_logits_match_transformers(tmp_path, name, seed):
    torch.manual_seed(0)
    model_dir = tmp_path / "model"
    subprocess.run([MECHC, "-q", "random-model", "--seed", str(seed), "--out", str(model_dir), *VARIANTS[name]], check=True)
    cfg = json.loads((model_dir / "config.json").read_text())
    vocab = cfg["vocab_size"]
    # Longer than the llama3 variant's original context (64), so scaled frequencies matter.
    ids = [(i * 7 + seed) % vocab for i in range(80)]
    out = tmp_path / "trace.safetensors"
    subprocess.run([MECHC, "-q", "trace", str(model_dir), "--ids", ",".join(map(str, ids)), "--out", str(out)], check=True)
    ours = load_file(str(out))["logits"]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    diff = (ours - theirs).abs().max().item()
    assert diff <= 1e-4, f"{name} seed {seed}: max abs logit diff {diff:.2e}"
