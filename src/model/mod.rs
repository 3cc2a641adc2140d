//! Architectures. Each family has one file that parses its config (`llama.rs`, `qwen2.rs`);
//! they share the decoder forward (`decoder.rs`) and the tensor table below, which maps every
//! component to its HF tensor name so that loaders, passes and emitters never hard-code names.

pub mod attention;
pub mod config;
pub mod decoder;
pub mod llama;
pub mod matvec;
pub mod norm;
pub mod qwen2;
pub mod random;
pub mod rope;
pub mod surgery;
pub mod swiglu;
pub mod verifier;

use candle_core::{DType, Tensor};
use serde_json::{Map, Value};

pub use config::{Arch, ModelConfig, RopeScaling};
pub use decoder::{Block, Linear, Model};

use crate::error::{Error, Result};

/// The projections of a decoder block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Proj {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Proj {
    pub const ALL: [Proj; 7] = [Proj::Q, Proj::K, Proj::V, Proj::O, Proj::Gate, Proj::Up, Proj::Down];
    pub fn is_attn(self) -> bool {
        matches!(self, Proj::Q | Proj::K | Proj::V | Proj::O)
    }
    fn hf(self) -> &'static str {
        match self {
            Proj::Q => "self_attn.q_proj",
            Proj::K => "self_attn.k_proj",
            Proj::V => "self_attn.v_proj",
            Proj::O => "self_attn.o_proj",
            Proj::Gate => "mlp.gate_proj",
            Proj::Up => "mlp.up_proj",
            Proj::Down => "mlp.down_proj",
        }
    }
    /// Whether the architecture with this config has a bias on this projection.
    pub fn has_bias(self, cfg: &ModelConfig) -> bool {
        match self {
            Proj::Q | Proj::K | Proj::V => cfg.qkv_bias,
            Proj::O => cfg.o_bias,
            _ => cfg.mlp_bias,
        }
    }
}

/// Every tensor of a decoder checkpoint, by role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TensorRole {
    Embed,
    FinalNorm,
    LmHead,
    AttnNorm(usize),
    MlpNorm(usize),
    Weight(usize, Proj),
    Bias(usize, Proj),
}

impl TensorRole {
    /// The HF safetensors name. Llama and Qwen2 share this naming.
    pub fn hf_name(self) -> String {
        match self {
            TensorRole::Embed => "model.embed_tokens.weight".into(),
            TensorRole::FinalNorm => "model.norm.weight".into(),
            TensorRole::LmHead => "lm_head.weight".into(),
            TensorRole::AttnNorm(l) => format!("model.layers.{l}.input_layernorm.weight"),
            TensorRole::MlpNorm(l) => format!("model.layers.{l}.post_attention_layernorm.weight"),
            TensorRole::Weight(l, p) => format!("model.layers.{l}.{}.weight", p.hf()),
            TensorRole::Bias(l, p) => format!("model.layers.{l}.{}.bias", p.hf()),
        }
    }

    /// All tensors a checkpoint with this config must contain, in a stable order.
    pub fn all(cfg: &ModelConfig) -> Vec<TensorRole> {
        let mut v = vec![TensorRole::Embed];
        for l in 0..cfg.num_layers {
            v.push(TensorRole::AttnNorm(l));
            v.push(TensorRole::MlpNorm(l));
            for p in Proj::ALL {
                v.push(TensorRole::Weight(l, p));
                if p.has_bias(cfg) {
                    v.push(TensorRole::Bias(l, p));
                }
            }
        }
        v.push(TensorRole::FinalNorm);
        if !cfg.tie_word_embeddings {
            v.push(TensorRole::LmHead);
        }
        v
    }

    /// Expected shape under a config (per-layer widths from its per-layer extension, if any).
    pub fn shape(self, cfg: &ModelConfig) -> Vec<usize> {
        let d = cfg.hidden_size;
        let (nq, nkv, f) = match self {
            TensorRole::Weight(l, _) | TensorRole::Bias(l, _) => cfg.layer_shape(l),
            _ => (cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size),
        };
        let (q, kv) = (nq * cfg.head_dim, nkv * cfg.head_dim);
        let out_in = |p: Proj| match p {
            Proj::Q => (q, d),
            Proj::K | Proj::V => (kv, d),
            Proj::O => (d, q),
            Proj::Gate | Proj::Up => (f, d),
            Proj::Down => (d, f),
        };
        match self {
            TensorRole::Embed | TensorRole::LmHead => vec![cfg.vocab_size, d],
            TensorRole::FinalNorm | TensorRole::AttnNorm(_) | TensorRole::MlpNorm(_) => vec![d],
            TensorRole::Weight(_, p) => {
                let (o, i) = out_in(p);
                vec![o, i]
            }
            TensorRole::Bias(_, p) => vec![out_in(p).0],
        }
    }
}

/// Make the config describe the blocks' actual widths (after a pass changed them): a width the
/// same in every layer goes into the stock field (`num_attention_heads`, `num_key_value_heads`,
/// `intermediate_size`) and its per-layer key is dropped; a width that differs between layers is
/// written as a per-layer list ([`config::LAYER_SHAPE_KEYS`]) that only our loader reads, and the
/// stock field holds layer 0's value.
pub fn sync_layer_config(m: &mut Model) {
    let hd = m.cfg.head_dim;
    let shapes: Vec<[usize; 3]> =
        m.blocks.iter().map(|b| [b.q.out_features() / hd, b.k.out_features() / hd, b.gate.out_features()]).collect();
    m.cfg.num_layers = m.blocks.len();
    let Some(first) = shapes.first().copied() else { return };
    m.cfg.num_heads = first[0];
    m.cfg.num_kv_heads = first[1];
    m.cfg.intermediate_size = first[2];
    for (i, key) in config::LAYER_SHAPE_KEYS.iter().enumerate() {
        if shapes.iter().all(|s| s[i] == first[i]) {
            m.cfg.raw.remove(*key);
        } else {
            m.cfg.raw.insert(key.to_string(), Value::from(shapes.iter().map(|s| s[i]).collect::<Vec<_>>()));
        }
    }
}

/// config.json fields common to the Llama-like families, on top of the fields of `cfg.raw`
/// that we do not interpret (so they survive a round trip).
pub fn common_config_json(cfg: &ModelConfig, class: &str, model_type: &str) -> Map<String, Value> {
    let mut m = cfg.raw.clone();
    // Fields we write ourselves; drop stale spellings so the result is never contradictory.
    for k in ["rope_parameters", "rope_scaling"] {
        m.remove(k);
    }
    let mut put = |k: &str, v: Value| {
        m.insert(k.to_string(), v);
    };
    put("architectures", Value::from(vec![class]));
    put("model_type", model_type.into());
    put("hidden_size", cfg.hidden_size.into());
    put("intermediate_size", cfg.intermediate_size.into());
    put("num_hidden_layers", cfg.num_layers.into());
    put("num_attention_heads", cfg.num_heads.into());
    put("num_key_value_heads", cfg.num_kv_heads.into());
    put("head_dim", cfg.head_dim.into());
    put("vocab_size", cfg.vocab_size.into());
    put("rms_norm_eps", json_f64(cfg.rms_norm_eps));
    put("rope_theta", json_f64(cfg.rope_theta));
    put("max_position_embeddings", cfg.max_position_embeddings.into());
    put("tie_word_embeddings", cfg.tie_word_embeddings.into());
    put("hidden_act", "silu".into());
    put("torch_dtype", m_dtype(&cfg.raw));
    if let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) =
        &cfg.rope_scaling
    {
        put(
            "rope_scaling",
            serde_json::json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": *original_max_position_embeddings as u64,
            }),
        );
    }
    if let Some(b) = cfg.bos_token_id {
        put("bos_token_id", b.into());
    }
    match cfg.eos_token_ids.as_slice() {
        [] => {}
        [e] => put("eos_token_id", (*e).into()),
        many => put("eos_token_id", Value::from(many.to_vec())),
    }
    m
}

fn m_dtype(raw: &Map<String, Value>) -> Value {
    raw.get("torch_dtype").cloned().unwrap_or_else(|| "float32".into())
}

/// Serialise an f64 the way a person wrote it: 1e-5 stays 1e-05, not 9.99999974e-06.
pub fn json_f64(x: f64) -> Value {
    // Values that came from f32 metadata (GGUF) carry float noise: round to 7 significant digits.
    let r: f64 = format!("{:.6e}", x).parse().unwrap_or(x);
    serde_json::Number::from_f64(r).map(Value::Number).unwrap_or(Value::Null)
}

/// The config.json for a model config, dispatching on the architecture.
pub fn config_json(cfg: &ModelConfig) -> Map<String, Value> {
    match cfg.arch {
        Arch::Llama => llama::config_json(cfg),
        Arch::Qwen2 => qwen2::config_json(cfg),
    }
}

/// Check that a tensor is finite; name it in the error.
pub fn check_finite(t: &Tensor, name: &str, file: &std::path::Path) -> Result<()> {
    // x − x is 0 for finite x and NaN for NaN/±inf; one NaN makes the sum NaN.
    let t = t.to_dtype(DType::F32)?;
    let s = (&t - &t)?.sum_all()?.to_scalar::<f32>()?;
    if s.is_nan() {
        return Err(Error::bad_file(file, format!("tensor `{name}` contains NaN or infinite values")));
    }
    Ok(())
}

/// The contiguous f32 data of input `what` of the forward's custom op `op` (the kernels in
/// `attention.rs`, `norm.rs`, `swiglu.rs`, `matvec.rs`).
pub(crate) fn op_input<'a>(
    s: &'a candle_core::CpuStorage,
    l: &candle_core::Layout,
    op: &str,
    what: &str,
) -> candle_core::Result<&'a [f32]> {
    let (a, z) = l
        .contiguous_offsets()
        .ok_or_else(|| candle_core::Error::Msg(format!("{op}: {what} must be contiguous")))?;
    Ok(&s.as_slice::<f32>()?[a..z])
}

#[cfg(test)]
mod tests {
    #[test]
    fn f32_metadata_is_written_as_people_write_it() {
        assert_eq!(super::json_f64(9.999999747378752e-06).to_string(), "0.00001");
        assert_eq!(super::json_f64(9.999999974752427e-07).to_string(), "1e-6");
        assert_eq!(super::json_f64(100000.0).to_string(), "100000.0");
    }
}
