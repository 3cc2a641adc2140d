//! Hugging Face model directories: config.json + model.safetensors, or shards listed in
//! model.safetensors.index.json. Tensors are memory-mapped, converted to f32 and checked.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use candle_core::DType;

use crate::error::{Error, Result, WithPath};
use crate::model::{Model, ModelConfig, TensorRole};

use super::st::StFile;

/// Files a tokenizer may need; copied when the source has them.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
];

/// The safetensors files of a directory and which file holds which tensor.
pub struct Shards {
    pub files: Vec<StFile>,
    pub by_name: BTreeMap<String, usize>,
}

impl Shards {
    pub fn open(dir: &Path) -> Result<Shards> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut files = vec![];
        let mut by_name = BTreeMap::new();
        if index.exists() {
            let text = std::fs::read_to_string(&index).with_path(&index)?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::bad_file(&index, format!("invalid JSON: {e}")))?;
            let map = json
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::config(&index, "weight_map", "missing or not an object"))?;
            let mut shard_names: BTreeSet<String> = BTreeSet::new();
            for v in map.values() {
                let s = v.as_str().ok_or_else(|| Error::config(&index, "weight_map", format!("{v} is not a file name")))?;
                if s.contains('/') || s.contains("..") {
                    return Err(Error::config(&index, "weight_map", format!("shard `{s}` is not a plain file name")));
                }
                shard_names.insert(s.to_string());
            }
            let shard_idx: BTreeMap<String, usize> = shard_names.iter().cloned().enumerate().map(|(i, s)| (s, i)).collect();
            let mut names: Vec<BTreeSet<String>> = vec![];
            for s in &shard_names {
                let f = StFile::open(&dir.join(s))?;
                names.push(f.names()?.into_iter().collect());
                files.push(f);
            }
            for (name, v) in map {
                let i = shard_idx[v.as_str().unwrap_or_default()];
                if !names[i].contains(name) {
                    return Err(Error::bad_file(&files[i].path, format!("the index lists `{name}` here but the file lacks it")));
                }
                by_name.insert(name.clone(), i);
            }
        } else if single.exists() {
            let f = StFile::open(&single)?;
            for n in f.names()? {
                by_name.insert(n, 0);
            }
            files.push(f);
        } else {
            return Err(Error::bad_file(dir, "no model.safetensors or model.safetensors.index.json"));
        }
        Ok(Shards { files, by_name })
    }

    pub fn get(&self, name: &str) -> Result<Option<candle_core::Tensor>> {
        match self.by_name.get(name) {
            Some(&i) => self.files[i].get(name),
            None => Ok(None),
        }
    }

    /// [`StFile::release`] every file.
    pub fn release(&self) {
        self.files.iter().for_each(StFile::release);
    }

    /// The file a tensor is in (for error messages).
    pub fn file_of(&self, name: &str) -> PathBuf {
        self.by_name.get(name).map(|&i| self.files[i].path.clone()).unwrap_or_else(|| self.files[0].path.clone())
    }

    /// The storage dtype of the embedding (read from the header, no data touched).
    pub fn dtype(&self) -> Result<DType> {
        let name = TensorRole::Embed.hf_name();
        let Some(&i) = self.by_name.get(&name) else { return Ok(DType::F32) };
        let f = &self.files[i];
        let view = f.view()?;
        let dt = view.tensor(&name).map_err(|e| Error::bad_file(&f.path, e.to_string()))?.dtype();
        Ok(match dt {
            safetensors::Dtype::F16 => DType::F16,
            safetensors::Dtype::BF16 => DType::BF16,
            _ => DType::F32,
        })
    }
}

pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).with_path(&path)?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, format!("invalid JSON: {e}")))?;
    ModelConfig::from_json(&json, &path)
}

/// Load config and weights of an HF directory.
pub fn load_model(dir: &Path) -> Result<Model> {
    load_model_with_progress(dir, false)
}

/// [`load_model`] with a progress bar over the tensors.
pub fn load_model_with_progress(dir: &Path, show: bool) -> Result<Model> {
    load_from_shards(dir, &Shards::open(dir)?, show)
}

/// Build the model of `dir` from its already opened safetensors files.
pub fn load_from_shards(dir: &Path, shards: &Shards, show: bool) -> Result<Model> {
    let cfg = read_config(dir)?;
    let main_file = shards.files[0].path.clone();
    let bar = crate::progress::bar(TensorRole::all(&cfg).len() as u64, "loading", show);
    // Tied checkpoints sometimes still carry lm_head.weight; untied ones must.
    let model = Model::from_tensors(cfg, &main_file, |role| {
        bar.inc(1);
        let name = role.hf_name();
        shards.get(&name).map_err(|e| match e {
            Error::BadFile { .. } => e,
            other => Error::bad_file(shards.file_of(&name), other.to_string()),
        })
    })?;
    bar.finish_and_clear();
    let known: BTreeSet<String> = TensorRole::all(&model.cfg).into_iter().map(|r| r.hf_name()).collect();
    for name in shards.by_name.keys() {
        if !known.contains(name) && !(name == "lm_head.weight" && model.cfg.tie_word_embeddings) && !name.ends_with("rotary_emb.inv_freq") {
            log::warn!("{}: ignoring unexpected tensor `{name}`", shards.file_of(name).display());
        }
    }
    Ok(model)
}

/// Write a model as an HF directory's files (config.json + one model.safetensors) into `dir`,
/// which must exist. Callers wanting atomicity pass an [`super::atomic::OutDir`] path.
pub fn save_model(
    model: &Model,
    dir: &Path,
    dtype: DType,
    metadata: &BTreeMap<String, String>,
) -> Result<()> {
    let tensors: Vec<(String, candle_core::Tensor)> = model
        .tensors()
        .into_iter()
        .map(|(r, t)| Ok((r.hf_name(), t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let mut meta = metadata.clone();
    meta.entry("format".into()).or_insert_with(|| "pt".into());
    super::st::write(&dir.join("model.safetensors"), &tensors, &meta)?;
    let mut cfg = crate::model::config_json(&model.cfg);
    cfg.insert("torch_dtype".into(), super::st::torch_dtype_name(dtype).into());
    super::gguf::write_json(&dir.join("config.json"), &serde_json::Value::Object(cfg))
}

