//! Qwen2 / Qwen2.5: the Llama block with biases on q/k/v (never on o_proj or the MLP).
//! HF `Qwen2ForCausalLM` semantics; sliding-window attention is not supported.

use super::config::{Arch, Fields, ModelConfig};
use crate::error::{Error, Result};

pub fn parse_config(f: &Fields) -> Result<ModelConfig> {
    let mut cfg = f.decoder_common(Arch::Qwen2, 1e-6)?;
    cfg.qkv_bias = true;
    cfg.o_bias = false;
    cfg.mlp_bias = false;
    if f.opt_bool("use_sliding_window")?.unwrap_or(false) {
        return Err(Error::config(f.path, "use_sliding_window", "sliding-window attention is not supported"));
    }
    Ok(cfg)
}

pub fn config_json(cfg: &ModelConfig) -> serde_json::Map<String, serde_json::Value> {
    let mut m = super::common_config_json(cfg, "Qwen2ForCausalLM", "qwen2");
    m.insert("use_sliding_window".into(), false.into());
    m
}
