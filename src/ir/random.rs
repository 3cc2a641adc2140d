//! Models from an IR: the config whose component IR is a given one, and a random model of those
//! shapes (the golden IR tests build their inputs this way).

use crate::error::Result;
use crate::model::ModelConfig;
use crate::model::random::{random_model, RandomSpec};
use crate::model::{Arch, Model};

/// The config of a model whose component IR is `ir` (as [`super::Ir::from_model`] gives
/// it): widths per layer (different widths go into the per-layer config keys, as a pruned
/// model has them), tying, and the biases, which the IR shows only through its parameter
/// counts: `attn` is q/k/v/o weights, plus q/k/v biases, plus an o bias; `mlp` is gate/up/down
/// weights, plus their biases. Errors name the line whose counts fit no such layout.
pub fn config_for_ir(ir: &super::Ir) -> Result<ModelConfig> {
    use crate::error::Error;
    let bad = |what: String| Error::invalid(format!("IR does not describe a model: {what}"));
    let arch = Arch::ALL.into_iter().find(|a| a.name() == ir.arch).ok_or_else(|| bad(format!("unknown architecture `{}`", ir.arch)))?;
    let (d, hd, vocab) = (ir.d_model, ir.d_head, ir.vocab);
    let first = ir.layers.first().ok_or_else(|| bad("no blocks".into()))?;
    if !ir.directions.is_empty() {
        return Err(bad("directions are not weights (drop the d lines)".into()));
    }
    if ir.embed_params != vocab * d || ir.final_norm_params != d || ir.unembed_params != if ir.tied { 0 } else { vocab * d } {
        return Err(bad(format!(
            "embed/final_norm/unembed must be vocab·d_model = {}, d_model = {d}, and {} (tied={})",
            vocab * d,
            if ir.tied { 0 } else { vocab * d },
            ir.tied
        )));
    }
    let mut biases: Option<(bool, bool, bool)> = None;
    for (l, li) in ir.layers.iter().enumerate() {
        let qkv = (li.heads + 2 * li.kv_heads) * hd;
        let attn_w = 2 * (li.heads + li.kv_heads) * hd * d;
        let (qkv_bias, o_bias) = match li.attn_params.checked_sub(attn_w) {
            Some(0) => (false, false),
            Some(x) if x == qkv => (true, false),
            Some(x) if x == qkv + d => (true, true),
            _ => {
                return Err(bad(format!(
                    "L{l} attn={}: expected {attn_w} weights, + {qkv} q/k/v bias, + {d} o bias",
                    li.attn_params
                )))
            }
        };
        let mlp_w = 3 * li.d_ff * d;
        let mlp_bias = match li.mlp_params.checked_sub(mlp_w) {
            Some(0) => false,
            Some(x) if x == 2 * li.d_ff + d => true,
            _ => return Err(bad(format!("L{l} mlp={}: expected {mlp_w} weights, + {} gate/up/down bias", li.mlp_params, 2 * li.d_ff + d))),
        };
        if li.norm_params != 2 * d {
            return Err(bad(format!("L{l} norm={}: expected 2·d_model = {}", li.norm_params, 2 * d)));
        }
        match biases {
            None => biases = Some((qkv_bias, o_bias, mlp_bias)),
            Some(b) if b != (qkv_bias, o_bias, mlp_bias) => {
                return Err(bad(format!("L{l} has other biases than L0 (biases are config-wide)")))
            }
            Some(_) => {}
        }
    }
    let (qkv_bias, o_bias, mlp_bias) = biases.unwrap_or_default();
    let mut cfg = RandomSpec {
        arch,
        layers: ir.layers.len(),
        kv_heads: first.kv_heads,
        group: first.heads / first.kv_heads.max(1),
        head_dim: hd,
        d_model: d,
        d_ff: first.d_ff,
        vocab,
        tied: ir.tied,
        attention_bias: o_bias,
        mlp_bias,
    }
    .config();
    cfg.qkv_bias = qkv_bias;
    cfg.o_bias = o_bias;
    let widths: [Vec<usize>; 3] = [
        ir.layers.iter().map(|li| li.heads).collect(),
        ir.layers.iter().map(|li| li.kv_heads).collect(),
        ir.layers.iter().map(|li| li.d_ff).collect(),
    ];
    for (key, w) in crate::model::config::LAYER_SHAPE_KEYS.iter().zip(widths) {
        if w.iter().any(|&x| x != w[0]) {
            cfg.raw.insert(key.to_string(), serde_json::Value::from(w));
        }
    }
    Ok(cfg)
}

/// A random model (weights from `seed`, as [`random_model`]) whose IR is `ir`.
pub fn random_model_for_ir(ir: &super::Ir, seed: u64) -> Result<Model> {
    random_model(config_for_ir(ir)?, seed)
}
