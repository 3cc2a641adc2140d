"""bake-steering checkpoints load in HF transformers (5.24) and give mechc's logits.

SmolLM2-135M-Instruct (tied embeddings, no biases) compiled by `mechc compile` with
  - mode add: c·v̂ at block 12 (coeff 4) -> mlp_bias = true, zero gate/up/down biases elsewhere,
    plus the llama.cpp control vector, read back with gguf-py's GGUFReader;
  - mode ablate: embedding (untied), every o_proj and down_proj orthogonalised against r.
The direction is a fixed seeded random unit vector saved as safetensors (interop only; the
behavioural use of a happiness - sadness direction is tested elsewhere). For each output dir:
`mechc trace --precise` logits vs transformers (f32, eager) on the same input_ids, max abs diff
<= 1e-4 on two prompts. Also checks that the steering actually changed the logits.
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from interop_common import MODELS

LOGIT_ATOL = float(os.environ.get("MECHC_INTEROP_LOGIT_ATOL", "1e-4"))
PROMPTS = ["The capital of France is", "I feel so happy today because"]
LAYER, COEFF = 12, 4.0


@pytest.fixture(scope="module")
def steer_setup(mechc, tmp_path_factory):
    spec = MODELS["smollm2"]
    if not spec.gguf.is_file():
        pytest.skip(f"{spec.gguf} is missing")
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("steer")
    v = np.random.default_rng(1234).standard_normal(576).astype(np.float32)
    v /= np.linalg.norm(v)
    save_file({"dir": v}, str(d / "dir.safetensors"))
    return d, v


def compile_mode(mechc, d, mode: str) -> "Path":
    body = f'version = 1\n[model]\npath = "{MODELS["smollm2"].gguf}"\n[[pass]]\nname = "bake-steering"\nmode = "{mode}"\n'
    body += 'direction = "dir.safetensors:dir"\n'  # relative: resolved against the pipeline file
    if mode == "add":
        body += f'layer = {LAYER}\ncoeff = {COEFF}\ncontrol_vector = "cv.gguf"\n'
    body += f'[output]\npath = "out-{mode}"\n'
    p = d / f"{mode}.toml"
    p.write_text(body)
    mechc.run("compile", p, "--force", timeout=1800)
    return d / f"out-{mode}"


def our_logits(mechc, model_dir, text, d, tag):
    from safetensors.numpy import load_file

    out = d / f"trace-{tag}.safetensors"
    mechc.run("trace", model_dir, "--prompt", text, "--out", out, "--force", "--precise")
    t = load_file(str(out))
    return t["input_ids"], t["logits"]


@pytest.mark.parametrize("mode", ["add", "ablate"])
def test_baked_checkpoint_matches_transformers(mechc, steer_setup, imports, report, mode):
    from transformers import AutoModelForCausalLM

    d, v = steer_setup
    out = compile_mode(mechc, d, mode)
    cfg = json.loads((out / "config.json").read_text())
    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    sd = m.state_dict()
    if mode == "add":
        assert cfg["mlp_bias"] is True
        bias = sd[f"model.layers.{LAYER}.mlp.down_proj.bias"].numpy()
        np.testing.assert_allclose(bias, COEFF * v, atol=1e-6)
        assert all(float(sd[f"model.layers.{l}.mlp.down_proj.bias"].abs().max()) == 0 for l in range(30) if l != LAYER)
        assert float(sd["model.layers.0.mlp.gate_proj.bias"].abs().max()) == 0
        import gguf

        r = gguf.GGUFReader(d / "cv.gguf")
        assert r.fields["general.architecture"].contents() == "controlvector"
        assert r.fields["controlvector.model_hint"].contents() == "llama"
        assert int(r.fields["controlvector.layer_count"].contents()) == 1
        assert [t.name for t in r.tensors] == [f"direction.{LAYER}"]
        t = r.tensors[0]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and list(t.shape) == [576]
        np.testing.assert_allclose(np.asarray(t.data), COEFF * v, atol=1e-6)
    else:
        assert cfg["tie_word_embeddings"] is False
        rt = torch.from_numpy(v)
        assert float((rt @ sd["model.embed_tokens.weight"].T).abs().max()) < 1e-4
        for l in range(30):
            for name in ("self_attn.o_proj", "mlp.down_proj"):
                assert float((rt @ sd[f"model.layers.{l}.{name}.weight"]).abs().max()) < 1e-4
    src = imports["smollm2"]
    for i, text in enumerate(PROMPTS):
        ids, ours = our_logits(mechc, out, text, d, f"{mode}-{i}")
        _, base = our_logits(mechc, src, text, d, f"src-{i}")
        with torch.no_grad():
            theirs = m(torch.tensor([ids.tolist()])).logits[0].numpy()
        diff = float(np.abs(ours - theirs).max())
        moved = float(np.abs(ours - base).max())
        report.append(f"steer {mode} prompt {i}: max |mechc - transformers| = {diff:.3g}; max |steered - source| = {moved:.3g}")
        assert diff <= LOGIT_ATOL, f"{mode} prompt {i}: max abs logit diff {diff}"
        assert moved > 1e-2, f"{mode} prompt {i}: the pass did not change the logits ({moved})"
