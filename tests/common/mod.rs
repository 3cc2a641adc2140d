#![allow(dead_code)]
//! Helpers shared by the integration tests.

use std::path::PathBuf;

use candle_core::Tensor;

/// `../shared/data` beside the project root, or `$MECHC_SHARED_DATA`.
pub fn shared_data() -> PathBuf {
    match std::env::var_os("MECHC_SHARED_DATA") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    }
}

pub fn stories_gguf() -> PathBuf {
    shared_data().join("models/stories260K/stories260K.gguf")
}

/// Max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Max |a − b| / (max |b| + 1e-6): a scale-free closeness measure.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max_abs_diff(a, b) / (scale + 1e-6)
}

pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const QWEN: &str = "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf";

/// `$MECHC_CACHE`, default `<repo>/.cache` (where scripts/fetch_models.sh puts the models).
pub fn cache() -> PathBuf {
    std::env::var_os("MECHC_CACHE").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache"))
}

/// A registry model fetched by scripts/fetch_models.sh, or None (with a SKIPPED line) if absent.
pub fn registry_model(name: &str) -> Option<PathBuf> {
    let p = cache().join("models").join(name);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("SKIPPED: {} is missing (run scripts/fetch_models.sh or set MECHC_CACHE)", p.display());
        None
    }
}

/// The built binary, quiet, with the test cache and shared data.
pub fn mechc() -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("mechc").unwrap();
    c.env("MECHC_CACHE", cache()).env("MECHC_SHARED_DATA", shared_data()).args(["-q", "--no-progress"]);
    c
}

/// Run, expect failure with a one-line error (no panic) that mentions every needle; return it.
pub fn fails(cmd: &mut assert_cmd::Command, needles: &[&str]) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure, got success; stderr: {err}");
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "expected one line, got: {err}");
    for n in needles {
        assert!(err.contains(n), "error {err:?} should mention {n:?}");
    }
    err
}

/// A word-level tokenizer with one word `w{i}` per token id (`w0` doubles as unknown).
pub fn word_tokenizer(vocab: usize) -> mechc::tokenizer::Tok {
    let words: serde_json::Map<String, serde_json::Value> = (0..vocab).map(|i| (format!("w{i}"), i.into())).collect();
    let json = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "Whitespace"}, "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": words, "unk_token": "w0"}
    });
    let inner = json.to_string().parse::<tokenizers::Tokenizer>().expect("word-level tokenizer");
    mechc::tokenizer::Tok { inner, chat_template: None, bos_token: None, eos_token: None, unk_token: None, pad_token: None }
}
