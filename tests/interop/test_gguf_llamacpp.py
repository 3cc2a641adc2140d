"""mechc's GGUF exports run in llama.cpp itself (llama-cpp-python 0.3.36, built from the PyPI
source by scripts/setup_llamacpp.sh; its vendored llama.cpp is an independent GGUF reader,
tokenizer and forward).

- Every model (stories260K / SentencePiece, SmolLM2 / byte-level BPE "smollm", Qwen2.5 / "qwen2"):
  `mechc export` at F32 loads in llama.cpp; llama.cpp's tokenizer gives mechc's ids (plain text,
  code, WikiText, and text with the chat special tokens); llama.cpp's next-token logits at every
  position agree with mechc's on mechc's ids within LLAMACPP_ATOL, the tolerance measured for
  llama.cpp's own F32 path against transformers on the same file (both are printed).
- Q8_0 and Q4_0: every quantised tensor is byte for byte llama.cpp's own quantiser's (gguf-py)
  output; top-1 agreement with the F32 export (both in llama.cpp) is reported (Q8_0 >= 97% here).
- Compiles with `[output] format = "gguf"` on SmolLM2: skip-layers, FLAP neuron pruning with
  mean compensation (ffn biases), one query head per kv group removed with mean compensation
  (6 heads × 64 ≠ n_embd 576: `key_length` written; attention biases), a ROME edit and a
  directional-ablation bake load and match
  mechc's logits on the same file; greedy generation of the edited model says the new fact.
- The control vector of a bake-steering add, applied by llama.cpp to the source, gives the baked
  model's logits (the pass's twin in llama.cpp).

Run: MECHC_BIN=target/release/mechc .cache/venv/bin/python -m pytest tests/interop/test_gguf_llamacpp.py -q
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from interop_common import MODELS, SHARED_DATA
from test_hf_interop import CODE, SHORT, wiki_paragraph

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python missing: run scripts/setup_llamacpp.sh")

# Max |logit| difference llama.cpp's F32 forward shows against transformers' f32 forward of the
# same weights, with an F32 KV cache (measured 3.7e-4 at most on these prompts and models; the
# report lines [llama.cpp vs transformers] print it), with margin; mechc must be as close.
LLAMACPP_ATOL = float(os.environ.get("MECHC_LLAMACPP_ATOL", "1e-3"))
SPECIAL = {"smollm2": "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
           "qwen2.5-coder": "<|im_start|>user\nWrite a loop<|im_end|>\n<|im_start|>assistant\n"}
FACTS = SHARED_DATA / "prompts" / "counterfact" / "counterfact-edit.json"


def texts(model: str) -> dict[str, str]:
    t = {"short": SHORT, "code": CODE, "wiki": wiki_paragraph()}
    if model in SPECIAL:
        t["special"] = SPECIAL[model]
    return t


def load(path: Path):
    # An F32 KV cache (llama.cpp's default is F16, which alone moves Qwen's logits by ~1).
    return llama_cpp.Llama(model_path=str(path), n_ctx=1024, n_batch=1024, logits_all=True, verbose=False, n_threads=2,
                           type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32, flash_attn=False)


def run_logits(llm, ids: list[int]) -> np.ndarray:
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def mechc_traces(mechc, gguf: Path, prompts: dict[str, str], work: Path) -> dict[str, tuple[list[int], np.ndarray]]:
    """mechc's ids and logits for each prompt, reading the GGUF through mechc's own import (into
    `work`, removed after: not into the cache, which would keep a copy of every compile)."""
    from safetensors.numpy import load_file

    d = work / f"{gguf.parent.name}-import"
    mechc.run("import", gguf, "--out", d, "--force")
    res = {}
    try:
        for tid, text in prompts.items():
            out = work / f"trace-{gguf.parent.name}-{tid}.safetensors"
            mechc.run("trace", d, "--prompt", text, "--out", out, "--force", "--precise")
            t = load_file(str(out))
            res[tid] = (t["input_ids"].tolist(), t["logits"])
            out.unlink()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return res


@pytest.fixture(scope="module")
def exports(mechc, imports, tmp_path_factory):
    """`exports(model, type)` -> GGUF written by `mechc export` from the imported source."""
    d = tmp_path_factory.mktemp("gguf-export")
    done = {}

    def get(model: str, ty: str) -> Path:
        if (model, ty) not in done:
            out = d / f"{model}-{ty}.gguf"
            mechc.run("export", imports[model], "--gguf", out, "--type", ty, "--force")
            done[(model, ty)] = out
        return done[(model, ty)]

    yield get
    for p in done.values():
        p.unlink(missing_ok=True)


@pytest.mark.parametrize("model", list(MODELS))
def test_f32_export_runs_in_llama_cpp_like_mechc(model, exports, traces, hf_dir, report):
    llm = load(exports(model, "f32"))
    _, hf = hf_dir.get(model)
    worst_mechc, worst_hf = 0.0, 0.0
    for tid, text in texts(model).items():
        t = traces.get(model, text, precise=True)
        # llama.cpp's own tokenizer: BOS as the GGUF says, special tokens parsed as mechc does.
        ids = llm.tokenize(text.encode(), add_bos=True, special=True)
        assert ids == t.input_ids, f"{model}/{tid}: llama.cpp ids {ids[:12]}... != mechc {t.input_ids[:12]}..."
        ours = run_logits(llm, t.input_ids)
        with torch.no_grad():
            theirs = hf(torch.tensor([t.input_ids])).logits[0].float().numpy()
        d_mechc = float(np.abs(ours - t.logits).max())
        d_hf = float(np.abs(ours - theirs).max())
        top1 = float((ours.argmax(-1) == t.logits.argmax(-1)).mean())
        report.append(f"[llama.cpp f32] {model}/{tid}: {len(ids)} tokens equal; max|llama.cpp - mechc| {d_mechc:.2e}, "
                      f"[llama.cpp vs transformers] {d_hf:.2e}, top-1 {top1:.3f}")
        worst_mechc, worst_hf = max(worst_mechc, d_mechc), max(worst_hf, d_hf)
    assert worst_hf <= LLAMACPP_ATOL, f"{model}: llama.cpp vs transformers {worst_hf:.3e} (the tolerance's premise)"
    assert worst_mechc <= LLAMACPP_ATOL, f"{model}: llama.cpp vs mechc {worst_mechc:.3e} > {LLAMACPP_ATOL}"


@pytest.mark.parametrize("ty", ["q8_0", "q4_0"])
@pytest.mark.parametrize("model", ["smollm2", "qwen2.5-coder"])
def test_quantised_export_is_llama_cpps_own_quantisation(model, ty, exports, traces, report):
    """Every quantised tensor is byte for byte what llama.cpp's own quantiser (gguf-py, the
    converter's) makes of the F32 export's tensor; top-1 agreement with F32, both run by llama.cpp,
    is reported. For Q8_0, measured over 4096 WikiText-2 tokens, it is 95.4% (SmolLM2) and 97.9%
    (Qwen2.5-0.5B): below the 99% goal, and a property of Q8_0 for these small models, not of the
    writer (the bytes are the converter's): weights-only Q8_0 (mechc's f32 forward of the
    dequantised weights) already agrees on only 97.75% on SmolLM2, F16 on 99.93%, and llama.cpp's
    Q8 activations cost the rest. The prompts here are held to 97%."""
    import gguf

    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[ty]
    f32_path, q_path = exports(model, "f32"), exports(model, ty)
    f32_t = {t.name: t for t in gguf.GGUFReader(f32_path).tensors}
    n_q = 0
    for t in gguf.GGUFReader(q_path).tensors:
        if t.tensor_type == qtype:
            want = gguf.quants.quantize(np.asarray(f32_t[t.name].data, dtype=np.float32), qtype)
            assert want.tobytes() == np.asarray(t.data).tobytes(), t.name
            n_q += 1
    assert n_q >= 7, n_q
    f32, q = load(f32_path), load(q_path)
    agree = total = 0
    for text in texts(model).values():
        ids = traces.get(model, text, precise=True).input_ids
        a, b = run_logits(f32, ids), run_logits(q, ids)
        agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        total += len(ids)
    size = q_path.stat().st_size / f32_path.stat().st_size
    report.append(f"[llama.cpp {ty}] {model}: {n_q} {ty} tensors = gguf-py's bytes; top-1 agreement with f32 "
                  f"{agree}/{total} = {agree / total:.4f}; size {size:.2f}x f32")
    if ty == "q8_0":
        assert agree / total >= 0.97


@pytest.fixture(scope="module")
def direction(tmp_path_factory):
    from safetensors.numpy import save_file

    d = tmp_path_factory.mktemp("gguf-dir")
    v = np.random.default_rng(1234).standard_normal(576).astype(np.float32)
    save_file({"dir": v / np.linalg.norm(v)}, str(d / "dir.safetensors"))
    return d / "dir.safetensors"


WIKI = SHARED_DATA / "text" / "wikitext2-test.raw"
COMPILES = {
    "skip-2": 'name = "skip-layers"\nlayers = [14, 21]',
    "flap-mean": (f'[[locate]]\nid = "flap"\nmethod = "neuron-importance"\nby = "flap"\ntext = "{WIKI}"\ntokens = 512\n'
                  f'[[pass]]\nname = "prune-neurons"\nselect = {{ by = "flap", fraction = 0.25, per_layer = true }}\n'
                  f'uniform = true\ncompensate = "mean"\nmean_over_text = "{WIKI}"\ntokens = 512'),
    "heads-mean": (f'name = "prune-heads"\nper_group = 1\nuniform = true\ncompensate = "mean"\n'
                   f'mean_over_text = "{WIKI}"\ntokens = 512'),
    "rome-1": f'name = "rank-one-edit"\nfacts = "{FACTS}"\nids = [0]\nlayer = 4\ncovariance = "identity"',
    "ablate": 'name = "bake-steering"\nmode = "ablate"\ndirection = "DIR:dir"',
}


@pytest.mark.parametrize("name", list(COMPILES))
def test_compiled_gguf_runs_in_llama_cpp_like_mechc(name, mechc, workdir, direction, report):
    spec = MODELS["smollm2"]
    if not spec.gguf.is_file():
        pytest.skip(f"{spec.gguf} is missing")
    body = COMPILES[name].replace("DIR", str(direction))
    if not body.startswith("[[locate]]"):
        body = "[[pass]]\n" + body
    out = workdir / f"gguf-{name}"
    pipe = workdir / f"gguf-{name}.toml"
    pipe.write_text(f'version = 1\n[model]\npath = "{spec.gguf}"\n{body}\n[output]\npath = "{out}"\nformat = "gguf"\n')
    mechc.run("compile", pipe, "--force", timeout=1800)
    try:
        check_compiled(name, mechc, out / "model.gguf", workdir, report)
    finally:
        shutil.rmtree(out, ignore_errors=True)  # 0.5 GB each; CI disks are small


def check_compiled(name: str, mechc, gguf: Path, workdir: Path, report) -> None:
    llm = load(gguf)
    worst = 0.0
    prompts = {"short": SHORT, "code": CODE}
    for tid, (ids, theirs) in mechc_traces(mechc, gguf, prompts, workdir).items():
        text = prompts[tid]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        ours = run_logits(llm, ids)
        worst = max(worst, float(np.abs(ours - theirs).max()))
        assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.99, f"{name}/{tid}"
    report.append(f"[llama.cpp compiled {name}] max|llama.cpp - mechc| {worst:.2e}")
    assert worst <= LLAMACPP_ATOL, f"{name}: {worst:.3e}"
    if name == "rome-1":
        llm_gen = llama_cpp.Llama(model_path=str(gguf), n_ctx=256, verbose=False, n_threads=2)
        said = llm_gen("The mother tongue of Danielle Darrieux is", max_tokens=4, temperature=0.0)["choices"][0]["text"]
        report.append(f"[llama.cpp compiled rome-1] greedy: {said!r}")
        assert said.strip().startswith("English"), said


def test_control_vector_moves_llama_cpp_as_mechcs_bake(mechc, exports, workdir, direction, report):
    """The control vector a `bake-steering` add writes (`control_vector = ...`), applied by llama.cpp
    to the source's F32 export (the binding's `--control-vector`: `llama_set_adapter_cvec`, the
    vector of block N at offset (N - 1) * n_embd, as llama.cpp's loader places `direction.N`), gives
    the logits of mechc's baked model: the pass's runtime twin, run by llama.cpp."""
    import ctypes

    import gguf

    spec = MODELS["smollm2"]
    if not spec.gguf.is_file():
        pytest.skip(f"{spec.gguf} is missing")
    layer, coeff = 12, 4.0
    cv = workdir / "gguf-cv.gguf"
    out = workdir / "gguf-steer-add"
    pipe = workdir / "gguf-steer-add.toml"
    pipe.write_text(f'version = 1\n[model]\npath = "{spec.gguf}"\n[[pass]]\nname = "bake-steering"\nmode = "add"\n'
                    f'direction = "{direction}:dir"\nlayer = {layer}\ncoeff = {coeff}\ncontrol_vector = "{cv}"\n'
                    f'[output]\npath = "{out}"\nformat = "gguf"\n')
    mechc.run("compile", pipe, "--force", timeout=1800)
    src = exports("smollm2", "f32")
    meta = gguf.GGUFReader(src).fields
    n_layer, n_embd = int(meta["llama.block_count"].contents()), int(meta["llama.embedding_length"].contents())
    data = np.zeros((n_layer - 1) * n_embd, dtype=np.float32)
    for t in gguf.GGUFReader(cv).tensors:
        block = int(t.name.split(".")[1])
        data[(block - 1) * n_embd: block * n_embd] = np.asarray(t.data, dtype=np.float32)
    prompts = {"short": SHORT, "code": CODE}
    baked = mechc_traces(mechc, out / "model.gguf", prompts, workdir)
    llm = load(src)
    plain = {tid: run_logits(llm, ids) for tid, (ids, _) in baked.items()}
    rc = llama_cpp.llama_set_adapter_cvec(llm._ctx.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), len(data),
                                          n_embd, 1, n_layer - 1)
    assert rc == 0, rc
    shutil.rmtree(out, ignore_errors=True)
    for tid, (ids, theirs) in baked.items():
        ours = run_logits(llm, ids)
        diff, moved = float(np.abs(ours - theirs).max()), float(np.abs(ours - plain[tid]).max())
        report.append(f"[llama.cpp control vector] smollm2/{tid}: max|llama.cpp + cvec - mechc baked| {diff:.2e}; "
                      f"moved {moved:.2f} from the unsteered source")
        assert diff <= LLAMACPP_ATOL, f"{tid}: {diff:.3e}"
        assert moved > 0.1, f"{tid}: the control vector did not move llama.cpp's logits ({moved})"
