//! The Llama family: Llama 2/3, SmolLM2, Mistral-style configs, with optional `attention_bias`
//! (q/k/v/o biases) and `mlp_bias` (gate/up/down biases). HF `LlamaForCausalLM` semantics.

use super::config::{Arch, Fields, ModelConfig};
use crate::error::Result;

pub fn parse_config(f: &Fields) -> Result<ModelConfig> {
    let mut cfg = f.decoder_common(Arch::Llama, 1e-6)?;
    let attention_bias = f.opt_bool("attention_bias")?.unwrap_or(false);
    cfg.qkv_bias = attention_bias;
    cfg.o_bias = attention_bias;
    cfg.mlp_bias = f.opt_bool("mlp_bias")?.unwrap_or(false);
    if let Some(w) = f.opt_usize("sliding_window")? {
        if w < cfg.max_position_embeddings {
            log::warn!("{}: sliding_window = {w} is ignored (full attention is used)", f.path.display());
        }
    }
    Ok(cfg)
}

/// Write the fields of `cfg` into a Llama config.json object (keeps unknown fields of `cfg.raw`).
pub fn config_json(cfg: &ModelConfig) -> serde_json::Map<String, serde_json::Value> {
    let mut m = super::common_config_json(cfg, "LlamaForCausalLM", "llama");
    m.insert("attention_bias".into(), cfg.qkv_bias.into());
    m.insert("mlp_bias".into(), cfg.mlp_bias.into());
    m
}
