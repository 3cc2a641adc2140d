//! The architecture-neutral view of a decoder config, parsed once from `config.json` by the
//! architecture's own file (`llama.rs`, `qwen2.rs`). Everything downstream reads this struct.

use std::path::Path;

use serde_json::{Map, Value};

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    Llama,
    Qwen2,
}

impl Arch {
    pub const ALL: [Arch; 2] = [Arch::Llama, Arch::Qwen2];
    pub fn name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }
}

/// RoPE frequency scaling, as HF's `rope_scaling` / `rope_parameters`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub enum RopeScaling {
    /// Llama 3.x: smooth interpolation between low and high frequency bands.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ModelConfig {
    pub arch: Arch,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v projections.
    pub qkv_bias: bool,
    /// Bias on the attention output projection.
    pub o_bias: bool,
    /// Biases on gate/up/down projections.
    pub mlp_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_ids: Vec<u32>,
    /// The config.json as read, so an emitter can keep fields we do not interpret.
    #[serde(skip)]
    pub raw: Map<String, Value>,
}

/// Per-layer shapes of a model whose layers differ (non-uniform pruning): arrays with one entry
/// per layer in config.json, read by our loader. Stock transformers cannot load such a model (it
/// builds every layer from `num_attention_heads` / `num_key_value_heads` / `intermediate_size`).
pub const LAYER_HEADS_KEY: &str = "mechc_layer_num_attention_heads";
pub const LAYER_KV_HEADS_KEY: &str = "mechc_layer_num_key_value_heads";
pub const LAYER_D_FF_KEY: &str = "mechc_layer_intermediate_size";
pub const LAYER_SHAPE_KEYS: [&str; 3] = [LAYER_HEADS_KEY, LAYER_KV_HEADS_KEY, LAYER_D_FF_KEY];

impl ModelConfig {
    /// (query heads, kv heads, d_ff) of layer `l`: the per-layer extension where present, else
    /// the config's uniform values.
    pub fn layer_shape(&self, l: usize) -> (usize, usize, usize) {
        let get = |k: &str, uniform: usize| {
            self.raw.get(k).and_then(|v| v.get(l)).and_then(Value::as_u64).map(|x| x as usize).unwrap_or(uniform)
        };
        let d_ff = get(LAYER_D_FF_KEY, self.intermediate_size);
        (get(LAYER_HEADS_KEY, self.num_heads), get(LAYER_KV_HEADS_KEY, self.num_kv_heads), d_ff)
    }

    pub fn n_rep(&self) -> usize {
        self.num_heads / self.num_kv_heads
    }

    /// Parse a config.json object, dispatching on `model_type` (or `architectures`).
    pub fn from_json(raw: &Value, path: &Path) -> Result<Self> {
        let obj = raw
            .as_object()
            .ok_or_else(|| Error::config(path, "<root>", "config.json must be a JSON object"))?;
        let fields = Fields { obj, path };
        let model_type = match obj.get("model_type").and_then(Value::as_str) {
            Some(t) => t.to_string(),
            None => match obj.get("architectures").and_then(|a| a.get(0)).and_then(Value::as_str) {
                Some("LlamaForCausalLM") | Some("MistralForCausalLM") => "llama".into(),
                Some("Qwen2ForCausalLM") => "qwen2".into(),
                Some(other) => other.to_string(),
                None => return Err(Error::config(path, "model_type", "missing (and no `architectures` to infer it from)")),
            },
        };
        let cfg = match model_type.as_str() {
            "llama" | "mistral" => super::llama::parse_config(&fields)?,
            "qwen2" => super::qwen2::parse_config(&fields)?,
            other => {
                return Err(Error::UnsupportedArch {
                    path: path.to_path_buf(),
                    arch: other.to_string(),
                    supported: "llama, mistral, qwen2".into(),
                })
            }
        };
        cfg.validate(path)?;
        Ok(cfg)
    }

    /// Contradictions between fields: each names the field.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let err = |f: &str, m: String| Err(Error::config(path, f, m));
        for (name, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return err(name, "must be positive".into());
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return err(
                "num_key_value_heads",
                format!("{} does not divide num_attention_heads = {}", self.num_kv_heads, self.num_heads),
            );
        }
        for key in LAYER_SHAPE_KEYS {
            let Some(v) = self.raw.get(key) else { continue };
            let ok = v.as_array().is_some_and(|a| {
                a.len() == self.num_layers && a.iter().all(|x| x.as_u64().is_some_and(|n| n > 0))
            });
            if !ok {
                return err(key, format!("must be a list of {} positive integers (one per layer)", self.num_layers));
            }
        }
        for l in 0..self.num_layers {
            let (q, kv, _) = self.layer_shape(l);
            if q % kv != 0 {
                return err(LAYER_KV_HEADS_KEY, format!("layer {l}: {kv} kv heads do not divide {q} query heads"));
            }
        }
        if self.head_dim % 2 != 0 {
            return err("head_dim", format!("{} is odd; RoPE needs an even head dimension", self.head_dim));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return err("rms_norm_eps", format!("{} must be a positive finite number", self.rms_norm_eps));
        }
        if !(self.rope_theta > 0.0 && self.rope_theta.is_finite()) {
            return err("rope_theta", format!("{} must be a positive finite number", self.rope_theta));
        }
        for &id in self.bos_token_id.iter().chain(self.eos_token_ids.iter()) {
            if id as usize >= self.vocab_size {
                return err("eos_token_id", format!("token id {id} is outside the vocabulary ({})", self.vocab_size));
            }
        }
        Ok(())
    }

    /// Parameter count of the weights this config implies (embedding counted once when tied).
    pub fn param_count(&self) -> usize {
        let d = self.hidden_size;
        let q = self.num_heads * self.head_dim;
        let kv = self.num_kv_heads * self.head_dim;
        let attn = d * q + 2 * d * kv + q * d
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { d } else { 0 };
        let mlp = 3 * d * self.intermediate_size + if self.mlp_bias { 2 * self.intermediate_size + d } else { 0 };
        let layer = attn + mlp + 2 * d;
        let embed = self.vocab_size * d;
        embed + self.num_layers * layer + d + if self.tie_word_embeddings { 0 } else { embed }
    }
}

/// Typed access to config.json fields with errors that name the field.
pub struct Fields<'a> {
    pub obj: &'a Map<String, Value>,
    pub path: &'a Path,
}

impl Fields<'_> {
    fn err(&self, field: &str, msg: impl Into<String>) -> Error {
        Error::config(self.path, field, msg)
    }
    pub fn usize(&self, field: &str) -> Result<usize> {
        self.opt_usize(field)?.ok_or_else(|| self.err(field, "missing"))
    }
    pub fn opt_usize(&self, field: &str) -> Result<Option<usize>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_u64()
                .map(|x| Some(x as usize))
                .ok_or_else(|| self.err(field, format!("expected a non-negative integer, found {v}"))),
        }
    }
    pub fn opt_f64(&self, field: &str) -> Result<Option<f64>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.err(field, format!("expected a number, found {v}"))),
        }
    }
    pub fn opt_bool(&self, field: &str) -> Result<Option<bool>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_bool().map(Some).ok_or_else(|| self.err(field, format!("expected true or false, found {v}"))),
        }
    }
    pub fn opt_str(&self, field: &str) -> Result<Option<&str>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_str().map(Some).ok_or_else(|| self.err(field, format!("expected a string, found {v}"))),
        }
    }
    /// `eos_token_id` may be an int or a list of ints.
    pub fn token_ids(&self, field: &str) -> Result<Vec<u32>> {
        match self.obj.get(field) {
            None | Some(Value::Null) => Ok(vec![]),
            Some(Value::Array(a)) => a
                .iter()
                .map(|v| v.as_u64().map(|x| x as u32).ok_or_else(|| self.err(field, format!("expected token ids, found {v}"))))
                .collect(),
            Some(v) => v
                .as_u64()
                .map(|x| vec![x as u32])
                .ok_or_else(|| self.err(field, format!("expected a token id, found {v}"))),
        }
    }

    /// Fields shared by the Llama-like families. The caller sets the bias flags.
    pub fn decoder_common(&self, arch: Arch, default_eps: f64) -> Result<ModelConfig> {
        let hidden_size = self.usize("hidden_size")?;
        let num_heads = self.usize("num_attention_heads")?;
        let num_kv_heads = self.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match self.opt_usize("head_dim")? {
            Some(h) => h,
            None => {
                if num_heads == 0 || hidden_size % num_heads != 0 {
                    return Err(self.err(
                        "num_attention_heads",
                        format!("{num_heads} does not divide hidden_size = {hidden_size} (and no head_dim is given)"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        if let Some(act) = self.opt_str("hidden_act")? {
            if act != "silu" {
                return Err(self.err("hidden_act", format!("`{act}` is not supported (only silu)")));
            }
        }
        let (rope_theta, rope_scaling) = self.rope()?;
        Ok(ModelConfig {
            arch,
            hidden_size,
            intermediate_size: self.usize("intermediate_size")?,
            num_layers: self.usize("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: self.usize("vocab_size")?,
            rms_norm_eps: self.opt_f64("rms_norm_eps")?.unwrap_or(default_eps),
            rope_theta,
            rope_scaling,
            max_position_embeddings: self.opt_usize("max_position_embeddings")?.unwrap_or(2048),
            tie_word_embeddings: self.opt_bool("tie_word_embeddings")?.unwrap_or(false),
            qkv_bias: false,
            o_bias: false,
            mlp_bias: false,
            bos_token_id: self.token_ids("bos_token_id")?.first().copied(),
            eos_token_ids: self.token_ids("eos_token_id")?,
            raw: self.obj.clone(),
        })
    }

    /// `rope_theta` + `rope_scaling` (transformers 4.x) or `rope_parameters` (5.x).
    fn rope(&self) -> Result<(f64, Option<RopeScaling>)> {
        let params = self.obj.get("rope_parameters").filter(|v| !v.is_null());
        let scaling = self.obj.get("rope_scaling").filter(|v| !v.is_null()).or(params);
        let mut theta = self.opt_f64("rope_theta")?;
        if theta.is_none() {
            if let Some(p) = params {
                theta = p.get("rope_theta").and_then(Value::as_f64);
            }
        }
        let theta = theta.unwrap_or(10000.0);
        let Some(s) = scaling else { return Ok((theta, None)) };
        let field = if self.obj.contains_key("rope_scaling") { "rope_scaling" } else { "rope_parameters" };
        let ty = s
            .get("rope_type")
            .or_else(|| s.get("type"))
            .and_then(Value::as_str)
            .unwrap_or("default");
        let num = |k: &str| -> Result<f64> {
            s.get(k).and_then(Value::as_f64).ok_or_else(|| self.err(&format!("{field}.{k}"), "missing or not a number"))
        };
        match ty {
            "default" => Ok((theta, None)),
            "llama3" => Ok((
                theta,
                Some(RopeScaling::Llama3 {
                    factor: num("factor")?,
                    low_freq_factor: num("low_freq_factor")?,
                    high_freq_factor: num("high_freq_factor")?,
                    original_max_position_embeddings: num("original_max_position_embeddings")?,
                }),
            )),
            other => Err(self.err(&format!("{field}.rope_type"), format!("`{other}` is not supported (default, llama3)"))),
        }
    }
}
