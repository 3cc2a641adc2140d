//! GGUF import: metadata → config.json, tensors dequantised (every type candle reads) and
//! renamed to HF names, Q/K rows un-permuted from llama.cpp's interleaved RoPE layout, and a
//! faithful tokenizer.json built from the embedded vocabulary (see `gguf_tokenizer.rs`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};
use serde_json::Map;

use crate::error::{Error, Result, WithPath};
use crate::model::{Arch, ModelConfig, Proj, TensorRole};

/// A parsed GGUF header with typed metadata access.
pub struct Gguf {
    pub path: std::path::PathBuf,
    pub content: Content,
}

impl Gguf {
    pub fn open(path: &Path) -> Result<Gguf> {
        let mut r = BufReader::new(File::open(path).with_path(path)?);
        let content = Content::read(&mut r).map_err(|e| Error::bad_file(path, format!("not a valid GGUF file: {}", crate::error::candle_msg(&e))))?;
        Ok(Gguf { path: path.to_path_buf(), content })
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn err(&self, key: &str, msg: impl Into<String>) -> Error {
        Error::config(&self.path, key, msg)
    }

    pub fn str(&self, key: &str) -> Result<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.err(key, format!("expected a string, found {v:?}"))),
            None => Err(self.err(key, "missing")),
        }
    }

    pub fn opt_str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::String(s)) => Some(s),
            _ => None,
        }
    }

    pub fn opt_u64(&self, key: &str) -> Result<Option<u64>> {
        match self.get(key) {
            None => Ok(None),
            Some(v) => v.to_u64().or_else(|_| v.to_u32().map(u64::from)).or_else(|_| v.to_i32().map(|x| x as u64))
                .map(Some)
                .map_err(|_| self.err(key, format!("expected an integer, found {v:?}"))),
        }
    }

    pub fn u64(&self, key: &str) -> Result<u64> {
        self.opt_u64(key)?.ok_or_else(|| self.err(key, "missing"))
    }

    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::F32(x)) => Ok(Some(*x as f64)),
            Some(Value::F64(x)) => Ok(Some(*x)),
            Some(v) => Err(self.err(key, format!("expected a number, found {v:?}"))),
        }
    }

    pub fn opt_bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    pub fn arr(&self, key: &str) -> Result<&Vec<Value>> {
        match self.get(key) {
            Some(Value::Array(a)) => Ok(a),
            Some(v) => Err(self.err(key, format!("expected an array, found {:?}", v.value_type()))),
            None => Err(self.err(key, "missing")),
        }
    }

    pub fn arch(&self) -> Result<Arch> {
        let a = self.str("general.architecture")?;
        match a {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            other => Err(Error::UnsupportedArch {
                path: self.path.clone(),
                arch: other.into(),
                supported: "llama, qwen2".into(),
            }),
        }
    }

    /// Read and dequantise one tensor to f32 (shape [out, in] as HF stores it).
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let mut r = BufReader::new(File::open(&self.path).with_path(&self.path)?);
        let q = self
            .content
            .tensor(&mut r, name, &Device::Cpu)
            .map_err(|e| Error::bad_file(&self.path, format!("tensor `{name}`: {}", crate::error::candle_msg(&e))))?;
        q.dequantize(&Device::Cpu).map_err(|e| Error::bad_file(&self.path, format!("tensor `{name}`: {}", crate::error::candle_msg(&e))))
    }

    /// The model config implied by the metadata and tensor shapes.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = self.arch()?;
        let a = arch.name();
        let k = |s: &str| format!("{a}.{s}");
        let hidden = self.u64(&k("embedding_length"))? as usize;
        let heads = self.u64(&k("attention.head_count"))? as usize;
        let kv_heads = self.opt_u64(&k("attention.head_count_kv"))?.map(|x| x as usize).unwrap_or(heads);
        if heads == 0 {
            return Err(self.err(&k("attention.head_count"), "must be positive"));
        }
        let head_dim = match self.opt_u64(&k("attention.key_length"))? {
            Some(h) => h as usize,
            None => hidden / heads,
        };
        if let Some(rd) = self.opt_u64(&k("rope.dimension_count"))? {
            if rd as usize != head_dim {
                return Err(self.err(&k("rope.dimension_count"), format!("partial rotary ({rd} of {head_dim}) is not supported")));
            }
        }
        if self.content.tensor_infos.contains_key("rope_freqs.weight") {
            return Err(self.err("rope_freqs.weight", "RoPE frequency factors (llama3 scaling in GGUF) are not supported yet"));
        }
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| Error::bad_file(&self.path, "missing tensor `token_embd.weight`"))?;
        let vocab = embd.shape.dims()[0];
        let tied = !self.content.tensor_infos.contains_key("output.weight");
        let eos: Vec<u32> = self.opt_u64("tokenizer.ggml.eos_token_id")?.map(|x| vec![x as u32]).unwrap_or_default();
        let mut cfg = ModelConfig {
            arch,
            hidden_size: hidden,
            intermediate_size: self.u64(&k("feed_forward_length"))? as usize,
            num_layers: self.u64(&k("block_count"))? as usize,
            num_heads: heads,
            num_kv_heads: kv_heads,
            head_dim,
            vocab_size: vocab,
            rms_norm_eps: self.opt_f64(&k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-6),
            rope_theta: self.opt_f64(&k("rope.freq_base"))?.unwrap_or(10000.0),
            rope_scaling: None,
            max_position_embeddings: self.opt_u64(&k("context_length"))?.unwrap_or(2048) as usize,
            tie_word_embeddings: tied,
            qkv_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            o_bias: self.content.tensor_infos.contains_key("blk.0.attn_output.bias"),
            mlp_bias: self.content.tensor_infos.contains_key("blk.0.ffn_down.bias"),
            bos_token_id: self.opt_u64("tokenizer.ggml.bos_token_id")?.map(|x| x as u32),
            eos_token_ids: eos,
            raw: Map::new(),
        };
        if arch == Arch::Llama && cfg.qkv_bias != cfg.o_bias {
            return Err(self.err("blk.0.attn_output.bias", "Llama attention biases must be on all of q/k/v/o or none"));
        }
        // Round eps the way the original config wrote it (1e-5, not 9.99999974e-06).
        cfg.rms_norm_eps = crate::model::json_f64(cfg.rms_norm_eps).as_f64().unwrap_or(cfg.rms_norm_eps);
        cfg.validate(&self.path)?;
        Ok(cfg)
    }
}

/// GGUF name of a tensor role.
pub fn gguf_name(role: TensorRole) -> String {
    let proj = |p: Proj| match p {
        Proj::Q => "attn_q",
        Proj::K => "attn_k",
        Proj::V => "attn_v",
        Proj::O => "attn_output",
        Proj::Gate => "ffn_gate",
        Proj::Up => "ffn_up",
        Proj::Down => "ffn_down",
    };
    match role {
        TensorRole::Embed => "token_embd.weight".into(),
        TensorRole::FinalNorm => "output_norm.weight".into(),
        TensorRole::LmHead => "output.weight".into(),
        TensorRole::AttnNorm(l) => format!("blk.{l}.attn_norm.weight"),
        TensorRole::MlpNorm(l) => format!("blk.{l}.ffn_norm.weight"),
        TensorRole::Weight(l, p) => format!("blk.{l}.{}.weight", proj(p)),
        TensorRole::Bias(l, p) => format!("blk.{l}.{}.bias", proj(p)),
    }
}

/// llama.cpp stores Q/K rows of llama-arch models in the interleaved RoPE layout; HF uses the
/// rotate-half layout. View rows as (heads, head_dim/2, 2) and swap the last two axes.
fn unpermute_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rows = dims[0];
    let rest: usize = dims[1..].iter().product();
    let hd = rows / n_head;
    Ok(t.reshape((n_head, hd / 2, 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Every HF tensor of the model, dequantised to f32, in HF layout.
pub fn hf_tensors(g: &Gguf, cfg: &ModelConfig, mut progress: impl FnMut(&str)) -> Result<Vec<(TensorRole, Tensor)>> {
    let mut out = vec![];
    let known: std::collections::BTreeSet<String> = TensorRole::all(cfg).into_iter().map(gguf_name).collect();
    for name in g.content.tensor_infos.keys() {
        if !known.contains(name) {
            log::warn!("{}: ignoring tensor `{name}`", g.path.display());
        }
    }
    for role in TensorRole::all(cfg) {
        let name = gguf_name(role);
        progress(&name);
        if !g.content.tensor_infos.contains_key(&name) {
            return Err(Error::bad_file(&g.path, format!("missing tensor `{name}`")));
        }
        let mut t = g.tensor(&name)?;
        let want = role.shape(cfg);
        if t.dims() != want.as_slice() {
            return Err(Error::bad_file(&g.path, format!("tensor `{name}` has shape {:?}, expected {:?}", t.dims(), want)));
        }
        if cfg.arch == Arch::Llama {
            match role {
                TensorRole::Weight(_, Proj::Q) | TensorRole::Bias(_, Proj::Q) => t = unpermute_rows(&t, cfg.num_heads)?,
                TensorRole::Weight(_, Proj::K) | TensorRole::Bias(_, Proj::K) => t = unpermute_rows(&t, cfg.num_kv_heads)?,
                _ => {}
            }
        }
        crate::model::check_finite(&t, &name, &g.path)?;
        out.push((role, t));
    }
    Ok(out)
}

/// Import a GGUF into an HF directory at `out` (written atomically).
pub fn import(path: &Path, out: &Path, dtype: DType, force: bool, show_progress: bool) -> Result<std::path::PathBuf> {
    // The output first: a bad --out must not cost reading the file (nor follow its errors).
    super::atomic::check(out, force, &[path])?;
    let g = Gguf::open(path)?;
    let cfg = g.model_config()?;
    let tok = super::gguf_tokenizer::build(&g)?;
    let dir = super::atomic::OutDir::create(out, force, &[path])?;

    let roles = TensorRole::all(&cfg);
    let bar = crate::progress::bar(roles.len() as u64, "dequantising", show_progress);
    let tensors = hf_tensors(&g, &cfg, |name| {
        bar.set_message(name.to_string());
        bar.inc(1);
    })?;
    bar.finish_and_clear();

    let named: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(r, t)| Ok((r.hf_name(), t.to_dtype(dtype)?)))
        .collect::<Result<_>>()?;
    let mut meta = BTreeMap::new();
    meta.insert("format".to_string(), "pt".to_string());
    meta.insert("mechc.version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    meta.insert("mechc.source".to_string(), path.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default());
    super::st::write(&dir.path().join("model.safetensors"), &named, &meta)?;

    let mut config = crate::model::config_json(&cfg);
    config.insert("torch_dtype".into(), super::st::torch_dtype_name(dtype).into());
    write_json(&dir.path().join("config.json"), &serde_json::Value::Object(config))?;
    let mut gen = Map::new();
    if let Some(b) = cfg.bos_token_id {
        gen.insert("bos_token_id".into(), b.into());
    }
    if let Some(&e) = cfg.eos_token_ids.first() {
        gen.insert("eos_token_id".into(), e.into());
    }
    // llama.cpp writes 0xFFFFFFFF for "no such token": keep only ids inside the vocabulary.
    if let Some(p) = g.opt_u64("tokenizer.ggml.padding_token_id")?.filter(|&p| (p as usize) < cfg.vocab_size) {
        gen.insert("pad_token_id".into(), p.into());
    }
    write_json(&dir.path().join("generation_config.json"), &serde_json::Value::Object(gen))?;
    write_json(&dir.path().join("tokenizer.json"), &tok.tokenizer_json)?;
    write_json(&dir.path().join("tokenizer_config.json"), &tok.tokenizer_config)?;
    write_json(&dir.path().join("special_tokens_map.json"), &tok.special_tokens_map)?;
    dir.commit()
}

pub fn write_json(path: &Path, v: &serde_json::Value) -> Result<()> {
    let mut s = serde_json::to_string_pretty(v).map_err(|e| Error::bad_file(path, e.to_string()))?;
    s.push('\n');
    std::fs::write(path, s).with_path(path)
}
