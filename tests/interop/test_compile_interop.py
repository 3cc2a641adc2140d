"""`mechc compile` output vs HF transformers (5.24): skip-layers, prune-neurons, prune-heads and
rank-one-edit (ROME, MEMIT), conditional-steer on SmolLM2-135M (30 layers, 9 query / 3 kv heads of 64, d_ff 1536);
bake-steering is in test_steer_interop.py.

For each uniform variant the emitted directory loads with stock `AutoModelForCausalLM` (f32, eager)
and its logits equal `mechc trace --precise` on the same directory within 1e-4 (or, where
transformers' own f32 forward is further than that from its f64 one, by test_hf_interop's f64
comparison) on two prompts. The mean-compensated variants add zero biases elsewhere (`mlp_bias` /
`attention_bias`) so that transformers builds the same modules. A non-uniform head pruning is
checked to be refused by stock transformers, as its doc says.

Run: MECHC_BIN=target/release/mechc .cache/venv/bin/python -m pytest tests/interop/test_compile_interop.py -q
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from interop_common import MODELS, SHARED_DATA
from test_hf_interop import CODE, SHORT, compare_logits, wiki_paragraph

PROMPTS = {"short": SHORT, "code": CODE}
FACTS = SHARED_DATA / "prompts" / "counterfact" / "counterfact-edit.json"
REFUSAL = SHARED_DATA / "prompts" / "refusal"
# A fixed, arbitrary direction of SmolLM2's width for conditional-steer (normalised by the pass).
DIRECTION = "[" + ", ".join(f"{((i * 37) % 17 - 8) / 8:.3f}" for i in range(576)) + "]"

# (id, [[pass]] body, expected config fields)
VARIANTS = [
    pytest.param("neurons-256", 'name = "prune-neurons"\ncount = 256\nuniform = true',
                 {"intermediate_size": 1280, "mlp_bias": False}, id="neurons-256"),
    pytest.param("neurons-256-mean", 'name = "prune-neurons"\ncount = 256\nuniform = true\ncompensate = "mean"\nmean_over = "CALIB"',
                 {"intermediate_size": 1280, "mlp_bias": True}, id="neurons-256-mean"),
    pytest.param("heads-1-per-group", 'name = "prune-heads"\nper_group = 1\nuniform = true',
                 {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 64}, id="heads-1-per-group"),
    pytest.param("heads-1-per-group-mean", 'name = "prune-heads"\nper_group = 1\nuniform = true\ncompensate = "mean"\nmean_over = "CALIB"',
                 {"num_attention_heads": 6, "num_key_value_heads": 3, "head_dim": 64, "attention_bias": True},
                 id="heads-1-per-group-mean"),
    pytest.param("skip-2", 'name = "skip-layers"\nlayers = [14, 21]', {"num_hidden_layers": 28}, id="skip-2"),
    # One ROME edit, and one MEMIT edit over two layers (C = I, few steps: the point here is the
    # emitted down_proj weights, not the edit).
    pytest.param("rome-1", 'name = "rank-one-edit"\nfacts = "FACTS"\nids = [0]\nlayer = 4\ncovariance = "identity"\nsteps = 5',
                 {"intermediate_size": 1536, "mlp_bias": False}, id="rome-1"),
    pytest.param("memit-1", 'name = "rank-one-edit"\nmethod = "memit"\nfacts = "FACTS"\nids = [0]\nlayers = [3, 4]\n'
                 'covariance = "identity"\nsteps = 5', {"intermediate_size": 1536, "mlp_bias": False}, id="memit-1"),
    # A steering vector behind a concept key (8 harmful vs 8 harmless prompts): a rank-one
    # down_proj change, no bias.
    pytest.param("conditional-1", f'name = "conditional-steer"\nlayer = 11\ndirection = {DIRECTION}\ncoeff = 8.0\n'
                 f'positive = "{REFUSAL}/harmful_val.json:instruction"\nnegative = "{REFUSAL}/harmless_val.json:instruction"\n'
                 'limit = 8\ncovariance = "identity"', {"intermediate_size": 1536, "mlp_bias": False}, id="conditional-1"),
]


@pytest.fixture(scope="module")
def calib(mechc, workdir) -> Path:
    """Calibration token ids (three WikiText-2 paragraphs, as `mechc tokenize` writes them)."""
    spec = MODELS["smollm2"]
    if not spec.gguf.is_file():
        pytest.skip(f"{spec.gguf} is missing")
    texts = [wiki_paragraph(), SHORT, CODE]
    ids = mechc.tokenize(spec.gguf, texts, workdir=workdir)
    p = workdir / "calib-smollm2.json"
    p.write_text(json.dumps(ids))
    return p


def compile_smollm2(mechc, workdir: Path, name: str, body: str, calib: Path) -> Path:
    spec = MODELS["smollm2"]
    out = workdir / f"compiled-{name}"
    pipe = workdir / f"{name}.toml"
    pipe.write_text(
        f'version = 1\n[model]\npath = "{spec.gguf}"\n[[pass]]\n{body.replace("CALIB", str(calib)).replace("FACTS", str(FACTS))}\n'
        f'[output]\npath = "{out}"\ndtype = "f32"\n'
    )
    mechc.run("compile", pipe, "--force")
    return out


@pytest.mark.parametrize("name,body,expect", VARIANTS)
def test_compiled_checkpoint_loads_in_transformers_with_equal_logits(name, body, expect, mechc, workdir, calib, report):
    from safetensors.numpy import load_file
    from transformers import AutoModelForCausalLM

    out = compile_smollm2(mechc, workdir, name, body, calib)
    cfg = json.loads((out / "config.json").read_text())
    for k, v in expect.items():
        assert cfg.get(k) == v, f"{name}: config.json {k} = {cfg.get(k)!r}, expected {v!r}"
    assert not any(k.startswith("mechc_layer_") for k in cfg), f"{name}: uniform pruning wrote a per-layer extension"
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    n_params = sum(p.numel() for p in hf.parameters())
    report.append(f"[compiled {name}] transformers loaded {n_params / 1e6:.2f}M parameters")
    try:
        for pid, text in PROMPTS.items():
            tr = workdir / f"trace-{name}-{pid}.safetensors"
            mechc.run("trace", out, "--prompt", text, "--out", tr, "--force", "--precise")
            t = load_file(str(tr))
            compare_logits(f"[compiled {name}] smollm2/{pid}", t["input_ids"].tolist(), t["logits"], hf, report)
    finally:
        del hf


def test_non_uniform_head_pruning_is_refused_by_stock_transformers(mechc, workdir, calib):
    """Per-layer head counts need mechc's config extension: our loader reads it, transformers cannot."""
    from transformers import AutoModelForCausalLM

    out = compile_smollm2(mechc, workdir, "heads-non-uniform", 'name = "prune-heads"\nheads = ["L0.H0", "L0.H1", "L0.H2"]',
                          calib)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mechc_layer_num_attention_heads"][:2] == [6, 9], cfg
    assert cfg["mechc_layer_num_key_value_heads"][:2] == [2, 3], cfg
    mechc.run("trace", out, "--prompt", SHORT, "--out", workdir / "trace-non-uniform.safetensors", "--force")
    with pytest.raises(Exception):
        AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager")
