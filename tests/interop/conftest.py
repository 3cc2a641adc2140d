"""Fixtures for the mechc <-> HF transformers interop tests.

Run from the repository root with the reference venv (scripts/setup_python.sh):

    .cache/venv/bin/python -m pytest tests/interop -q

Environment:
    MECHC_BIN          mechc binary        (default <repo>/target/release/mechc)
    MECHC_CACHE        mechc cache root    (default <repo>/.cache; the GGUFs of
                       scripts/fetch_models.sh live in $MECHC_CACHE/models)
    MECHC_SHARED_DATA  shared data folder  (default <repo>/../shared/data)
    MECHC_INTEROP_LOGIT_ATOL   max abs logit difference allowed (default 1e-4)

Models: $MECHC_CACHE/models/{SmolLM2-135M-Instruct.Q4_1,Qwen2.5-Coder-0.5B-Instruct.Q4_K_M}.gguf and
$MECHC_SHARED_DATA/models/stories260K/stories260K.gguf; tests of a missing model are skipped.

Everything expensive is loaded once per session and lazily: each GGUF is imported once with
`mechc import` into a pytest temp dir, each transformers model is loaded once (the items are
reordered so that all tests of one model run together, and only one model of each kind is kept
in memory at a time), and each `mechc trace` is run once per (model, prompt).

A summary of the measured numbers (max logit diffs, tokenizer match counts) is printed at the
end of the run, also with -q.
"""
from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # interop_common, also under --import-mode=importlib
from interop_common import MECHC_BIN, MECHC_CACHE, MODEL_ORDER, MODELS, SENTINEL_KEYS, ModelSpec

torch.set_num_threads(2)


def _require_model(spec: ModelSpec) -> None:
    if not spec.gguf.is_file():
        pytest.skip(f"{spec.gguf} is missing (run scripts/fetch_models.sh, or set MECHC_CACHE / MECHC_SHARED_DATA)")


# ---------------------------------------------------------------------------------------------
# test ordering: group by model so that one reference model of each kind is resident at a time


def pytest_collection_modifyitems(config, items):
    """Run this directory's tests grouped by model (stable within a model), leaving other items in place."""
    here = Path(__file__).parent

    def model_rank(item):
        model = getattr(getattr(item, "callspec", None), "params", {}).get("model")
        return MODEL_ORDER.index(model) if model in MODEL_ORDER else len(MODEL_ORDER)

    slots = [i for i, item in enumerate(items) if Path(str(item.fspath)).parent == here]
    ours = sorted((items[i] for i in slots), key=model_rank)
    for i, item in zip(slots, ours):
        items[i] = item


# ---------------------------------------------------------------------------------------------
# summary printed at the end of the session

_REPORT: list[str] = []


@pytest.fixture(scope="session")
def report():
    """Append human-readable result lines; printed in the terminal summary."""
    return _REPORT


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if _REPORT:
        terminalreporter.section("mechc interop numbers")
        for line in _REPORT:
            terminalreporter.write_line(line)


# ---------------------------------------------------------------------------------------------
# mechc


class Mechc:
    def __init__(self, binary: Path):
        self.binary = binary
        self.env = dict(os.environ, MECHC_CACHE=str(MECHC_CACHE))

    def run(self, *args: str, timeout: float = 600) -> str:
        cmd = [str(self.binary), "-q", "--no-progress", *map(str, args)]
        p = subprocess.run(cmd, capture_output=True, text=True, env=self.env, timeout=timeout)
        if p.returncode != 0:
            raise AssertionError(
                f"mechc failed (exit {p.returncode}): {' '.join(cmd)}\n--- stderr ---\n{p.stderr[-4000:]}"
            )
        return p.stdout

    def tokenize(self, model: Path, texts: list[str], *, special: bool = True, chat: bool = False,
                 workdir: Path) -> list[list[int]]:
        f = workdir / f"texts-{time.monotonic_ns()}.json"
        f.write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        args = ["tokenize", model, "--file", f]
        if not special:
            args.append("--no-special")
        if chat:
            args.append("--chat")
        out = json.loads(self.run(*args))
        assert isinstance(out, list) and len(out) == len(texts), f"mechc tokenize returned {len(out)} lists for {len(texts)} texts"
        return out


@pytest.fixture(scope="session")
def mechc() -> Mechc:
    if not MECHC_BIN.is_file():
        pytest.exit(f"mechc binary not found at {MECHC_BIN} (cargo build --release, or set MECHC_BIN)", returncode=4)
    return Mechc(MECHC_BIN)


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("work")


class Imports:
    """`imports[model]` -> HF dir written by mechc's GGUF importer (once per session).

    Small models are imported with `mechc import --out` into a pytest temp dir. A GGUF bigger
    than IMPORT_COPY_LIMIT (Qwen: a 2.5 GB f32 import) is not written a second time: its
    directory is the one the same importer wrote into $MECHC_CACHE/gguf/<hash>/ when the cargo
    tests first used the .gguf path (`mechc inspect --json` names it, importing if needed).
    CI disks are small; a second copy once filled one."""

    IMPORT_COPY_LIMIT = 200 * 2**20

    def __init__(self, mechc: Mechc, root: Path):
        self.mechc, self.root, self.dirs = mechc, root, {}

    def __getitem__(self, model: str) -> Path:
        if model not in self.dirs:
            spec = MODELS[model]
            _require_model(spec)
            if spec.gguf.stat().st_size > self.IMPORT_COPY_LIMIT:
                out = Path(json.loads(self.mechc.run("inspect", spec.gguf, "--json"))["path"])
            else:
                out = self.root / model
                self.mechc.run("import", spec.gguf, "--out", out, "--force")
            self.dirs[model] = out
        return self.dirs[model]

    def cleanup(self):
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def imports(mechc, tmp_path_factory):
    imp = Imports(mechc, tmp_path_factory.mktemp("imports"))
    yield imp
    imp.cleanup()


@dataclass
class Trace:
    input_ids: list[int]
    logits: np.ndarray  # f32 [seq, vocab]
    source: str  # what MODEL argument mechc traced


class Traces:
    """`traces.get(model, text, chat, on_gguf)` -> Trace, each run once per session."""

    def __init__(self, mechc: Mechc, imports: Imports, root: Path):
        self.mechc, self.imports, self.root, self.files = mechc, imports, root, {}

    def get(self, model: str, text: str, chat: bool = False, on_gguf: bool = False, precise: bool = True) -> Trace:
        """`precise`: mechc's blocked matmul summation (as accurate as transformers' f32 forward,
        which the 1e-4 comparison needs); without it, the fast default summation order."""
        key = (model, text, chat, on_gguf, precise)
        if key not in self.files:
            if on_gguf:
                _require_model(MODELS[model])
                src = MODELS[model].gguf  # mechc imports it into $MECHC_CACHE/gguf/<hash>/ on first use
            else:
                src = self.imports[model]
            out = self.root / f"trace-{len(self.files)}.safetensors"
            args = ["trace", src, "--prompt", text, "--out", out, "--force"]
            if chat:
                args.append("--chat")
            if precise:
                args.append("--precise")
            self.mechc.run(*args)
            self.files[key] = (out, str(src))
        from safetensors.numpy import load_file

        path, src = self.files[key]
        t = load_file(str(path))
        assert t["input_ids"].dtype == np.int64 and t["input_ids"].ndim == 1, t["input_ids"].dtype
        assert t["logits"].dtype == np.float32 and t["logits"].shape[0] == t["input_ids"].shape[0], t["logits"].shape
        return Trace(t["input_ids"].tolist(), t["logits"], src)


@pytest.fixture(scope="session")
def traces(mechc, imports, tmp_path_factory):
    root = tmp_path_factory.mktemp("traces")
    yield Traces(mechc, imports, root)
    shutil.rmtree(root, ignore_errors=True)  # [seq, vocab] f32 logits: ~90 MB per Qwen trace


# ---------------------------------------------------------------------------------------------
# transformers references


class _KeepOne:
    """Load-once cache that keeps only the most recently used entry (the models are big)."""

    def __init__(self, loader):
        self.loader, self.key, self.value = loader, None, None

    def get(self, key):
        if key != self.key:
            self.key = self.value = None
            gc.collect()
            self.value = self.loader(key)
            self.key = key
        return self.value


@pytest.fixture(scope="session")
def hf_dir(imports):
    """`hf_dir.get(model)` -> (tokenizer, model) loaded by transformers from mechc's imported dir."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(model):
        d = imports[model]
        tok = AutoTokenizer.from_pretrained(d)
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager").eval()
        return tok, m

    return _KeepOne(load)


def strip_sentinel_ids(src: Path, dst: Path) -> list[str]:
    """Copy a GGUF without the out-of-vocab sentinel special-token ids (SENTINEL_KEYS with value
    >= n_vocab), using gguf-py's own metadata copier. The tensors are copied byte for byte."""
    import gguf
    from gguf.scripts.gguf_new_metadata import copy_with_new_metadata

    reader = gguf.GGUFReader(src, "r")
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    drop = [k for k in SENTINEL_KEYS if k in reader.fields and int(reader.fields[k].contents()) >= n_vocab]
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch=arch, endianess=reader.endianess)
    if "general.alignment" in reader.fields:
        writer.data_alignment = int(reader.fields["general.alignment"].contents())
    copy_with_new_metadata(reader, writer, {}, drop)
    return drop


@pytest.fixture(scope="session")
def gguf_for_transformers(tmp_path_factory):
    """`gguf_for_transformers(model)` -> (dir, filename) that transformers' `gguf_file=` can load.

    SmolLM2 and Qwen load as they are. stories260K.gguf is copied (the shared file is read-only
    and must not change) with its two 0xFFFFFFFF sentinel ids removed; nothing else differs."""
    cache = {}

    def get(model):
        if model not in cache:
            spec = MODELS[model]
            _require_model(spec)
            if model == "stories260k":
                d = tmp_path_factory.mktemp("gguf-patched")
                dropped = strip_sentinel_ids(spec.gguf, d / spec.gguf.name)
                assert sorted(dropped) == sorted(SENTINEL_KEYS), dropped
                cache[model] = (d, spec.gguf.name)
            else:
                cache[model] = (spec.gguf.parent, spec.gguf.name)
        return cache[model]

    return get


@pytest.fixture(scope="session")
def hf_gguf_model(gguf_for_transformers):
    """`hf_gguf_model.get(model)` -> transformers' own model loaded from the GGUF (f32, eager)."""
    from transformers import AutoModelForCausalLM

    def load(model):
        d, f = gguf_for_transformers(model)
        return AutoModelForCausalLM.from_pretrained(
            d, gguf_file=f, dtype=torch.float32, attn_implementation="eager"
        ).eval()

    return _KeepOne(load)


@pytest.fixture(scope="session")
def hf_gguf_tokenizer(gguf_for_transformers):
    """`hf_gguf_tokenizer.get(model)` -> transformers' own tokenizer built from the GGUF."""
    from transformers import AutoTokenizer

    def load(model):
        d, f = gguf_for_transformers(model)
        return AutoTokenizer.from_pretrained(d, gguf_file=f)

    return _KeepOne(load)


@pytest.fixture(scope="session")
def stories_sentencepiece():
    """A real sentencepiece model rebuilt from stories260K.gguf's vocab, scores and token types.

    llama2.c's tok512 was trained with sentencepiece BPE, byte_fallback, the identity normaliser,
    add_dummy_prefix=True and remove_extra_whitespaces=False; the GGUF keeps pieces, scores and
    types, which is all a BPE ModelProto needs."""
    import gguf
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    spec = MODELS["stories260k"]
    _require_model(spec)
    r = gguf.GGUFReader(spec.gguf, "r")
    toks = r.fields["tokenizer.ggml.tokens"].contents()
    scores = r.fields["tokenizer.ggml.scores"].contents()
    types = r.fields["tokenizer.ggml.token_type"].contents()
    assert len(toks) == len(scores) == len(types) == 512
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = len(toks)
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    m.normalizer_spec.remove_extra_whitespaces = False
    m.normalizer_spec.escape_whitespaces = True
    for t, s, ty in zip(toks, scores, types):
        p = m.pieces.add()
        p.piece, p.score, p.type = t, float(s), int(ty)
    sp = spm.SentencePieceProcessor(model_proto=m.SerializeToString())
    # the tokens transformers and mechc match as whole special tokens in text (UNKNOWN + CONTROL)
    specials = {t: i for i, (t, ty) in enumerate(zip(toks, types)) if int(ty) in (2, 3)}
    return sp, specials
