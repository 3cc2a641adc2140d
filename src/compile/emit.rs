//! The emitter: a model → an HF directory any runtime loads. Safetensors (one file, or shards of
//! at most `shard_size` with `model.safetensors.index.json`), config.json for what the passes
//! changed, the source's tokenizer files copied, provenance in every shard's `__metadata__`, and
//! `mechc-manifest.json` (the caller's record + the SHA-256 of every other file written).
//!
//! Atomic (a temporary directory renamed into place), never over the source, an existing output
//! only with `force`, and byte-deterministic: tensors sorted by name, no timestamps.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::atomic::OutDir;
use crate::model::Model;

pub use crate::io::hf::TOKENIZER_FILES;

pub const MANIFEST: &str = "mechc-manifest.json";

/// The model file of a `format = "gguf"` output directory.
pub const GGUF_FILE: &str = "model.gguf";

#[derive(Debug, Clone)]
pub struct EmitOpts {
    pub dtype: DType,
    /// Largest shard in bytes (None: one file).
    pub shard_size: Option<u64>,
    pub force: bool,
    /// Write `model.gguf` (of this type) instead of safetensors + config + tokenizer files.
    pub gguf: Option<crate::io::gguf_export::GgufType>,
}

/// Split name-sorted tensors into shards of at most `max` bytes (a larger tensor gets its own).
fn shard(tensors: Vec<(String, Tensor)>, max: Option<u64>) -> Vec<Vec<(String, Tensor)>> {
    let Some(max) = max else { return vec![tensors] };
    let mut shards: Vec<Vec<(String, Tensor)>> = vec![];
    let mut size = 0u64;
    for (n, t) in tensors {
        let bytes = (t.elem_count() * t.dtype().size_in_bytes()) as u64;
        if shards.is_empty() || (size + bytes > max && size > 0) {
            shards.push(vec![]);
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("a shard was just pushed").push((n, t));
    }
    shards
}

/// Write `model` to `out`. `inputs` are paths the output must not be, contain, or lie inside.
pub fn emit(
    model: &Model,
    source_dir: &Path,
    out: &Path,
    inputs: &[&Path],
    opts: &EmitOpts,
    metadata: &BTreeMap<String, String>,
    manifest: Value,
) -> Result<PathBuf> {
    let dir = OutDir::create(out, opts.force, inputs)?;
    if let Some(ty) = opts.gguf {
        // The provenance as GGUF keys: mechc_version → mechc.version, ...
        let mut extra: BTreeMap<String, String> =
            metadata.iter().map(|(k, v)| (k.replacen("mechc_", "mechc.", 1), v.clone())).collect();
        let name = out.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
        extra.insert("general.name".into(), name);
        crate::io::gguf_export::write_model(model, source_dir, &dir.path().join(GGUF_FILE), ty, &extra)?;
        return finish(dir, vec![GGUF_FILE.to_string()], manifest);
    }
    let mut tensors: Vec<(String, Tensor)> =
        model.tensors().into_iter().map(|(r, t)| Ok((r.hf_name(), t.to_dtype(opts.dtype)?))).collect::<Result<_>>()?;
    tensors.sort_by(|a, b| a.0.cmp(&b.0));
    let total: u64 = tensors.iter().map(|(_, t)| (t.elem_count() * t.dtype().size_in_bytes()) as u64).sum();
    let shards = shard(tensors, opts.shard_size);
    let mut meta = metadata.clone();
    meta.insert("format".into(), "pt".into());
    let mut written = vec![];
    if shards.len() == 1 {
        crate::io::st::write(&dir.path().join("model.safetensors"), &shards[0], &meta)?;
        written.push("model.safetensors".to_string());
    } else {
        let mut weight_map = serde_json::Map::new();
        for (i, s) in shards.iter().enumerate() {
            let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, shards.len());
            crate::io::st::write(&dir.path().join(&name), s, &meta)?;
            for (t, _) in s {
                weight_map.insert(t.clone(), Value::String(name.clone()));
            }
            written.push(name);
        }
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        crate::io::gguf::write_json(&dir.path().join("model.safetensors.index.json"), &index)?;
        written.push("model.safetensors.index.json".into());
    }
    let mut cfg = crate::model::config_json(&model.cfg);
    cfg.insert("torch_dtype".into(), crate::io::st::torch_dtype_name(opts.dtype).into());
    crate::io::gguf::write_json(&dir.path().join("config.json"), &Value::Object(cfg))?;
    written.push("config.json".into());
    for f in TOKENIZER_FILES {
        let src = source_dir.join(f);
        if src.exists() {
            std::fs::copy(&src, dir.path().join(f)).map_err(|e| Error::io(&src, e))?;
            written.push(f.to_string());
        }
    }
    finish(dir, written, manifest)
}

/// The manifest (the caller's record + the SHA-256 of every file written), then the rename.
fn finish(dir: OutDir, mut written: Vec<String>, manifest: Value) -> Result<PathBuf> {
    written.sort();
    let mut files = serde_json::Map::new();
    for f in &written {
        files.insert(f.clone(), Value::String(crate::io::sha256_file(&dir.path().join(f))?));
    }
    let mut manifest = manifest;
    if let Value::Object(m) = &mut manifest {
        m.insert("files".into(), Value::Object(files));
    }
    crate::io::gguf::write_json(&dir.path().join(MANIFEST), &manifest)?;
    dir.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_respect_the_limit_and_keep_order() {
        let t = |n: usize| Tensor::zeros(n, DType::F32, &candle_core::Device::Cpu).unwrap();
        let ts: Vec<(String, Tensor)> = [10, 10, 30, 5, 5].iter().enumerate().map(|(i, &n)| (format!("t{i}"), t(n))).collect();
        let s = shard(ts, Some(80));
        let names: Vec<Vec<&str>> = s.iter().map(|s| s.iter().map(|(n, _)| n.as_str()).collect()).collect();
        // 40 + 40 bytes fit; the 120-byte tensor gets its own shard; then 20 + 20.
        assert_eq!(names, [vec!["t0", "t1"], vec!["t2"], vec!["t3", "t4"]]);
        assert_eq!(shard(vec![("a".into(), t(3))], None).len(), 1);
    }
}
