"""Paths and model table shared by conftest.py and the interop tests."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MECHC_BIN = Path(os.environ.get("MECHC_BIN", REPO / "target" / "release" / "mechc"))
MECHC_CACHE = Path(os.environ.get("MECHC_CACHE", REPO / ".cache"))
SHARED_DATA = Path(os.environ.get("MECHC_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass(frozen=True)
class ModelSpec:
    key: str  # short id used in test ids
    gguf: Path
    instruct: bool  # has a chat template
    tokenizer: str  # "smollm" (byte-level BPE + Digits), "qwen2" (byte-level BPE), "spm" (SentencePiece)


MODELS: dict[str, ModelSpec] = {
    "smollm2": ModelSpec("smollm2", MECHC_CACHE / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf", True, "smollm"),
    "qwen2.5-coder": ModelSpec(
        "qwen2.5-coder", MECHC_CACHE / "models" / "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf", True, "qwen2"
    ),
    "stories260k": ModelSpec("stories260k", SHARED_DATA / "models" / "stories260K" / "stories260K.gguf", False, "spm"),
}
MODEL_ORDER = list(MODELS)

# stories260K.gguf stores llama.cpp's "none" (0xFFFFFFFF) as its padding and separator ids; transformers
# 5.24 cannot load the file with them (IndexError in the tokenizer, AssertionError on padding_idx).
SENTINEL_KEYS = ("tokenizer.ggml.padding_token_id", "tokenizer.ggml.seperator_token_id")
