//! `mechc inspect`: what a checkpoint is, without running it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::model::{Proj, TensorRole};

/// Show what a checkpoint is: architecture, shapes, parameters, dtype, tokenizer.
///
/// Show a model's architecture, shapes, parameter counts per component kind, storage dtype
/// and tokenizer.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// HF model directory or .gguf file.
    pub model: PathBuf,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Print the component IR instead (loads the weights, so pruned per-layer widths show):
    /// one line per block (`L3 heads=9 kv=3 d_ff=1536 attn=... mlp=... norm=...`); its heads
    /// `L3.H0..` and neurons `L3.N0..` are implied, not listed. With --json, the IR as JSON.
    #[arg(long)]
    pub ir: bool,
}

fn kind(role: TensorRole) -> &'static str {
    match role {
        TensorRole::Embed => "embed",
        TensorRole::LmHead => "unembed",
        TensorRole::FinalNorm | TensorRole::AttnNorm(_) | TensorRole::MlpNorm(_) => "norms",
        TensorRole::Weight(_, p) | TensorRole::Bias(_, p) => {
            if p.is_attn() {
                "attention"
            } else {
                "mlp"
            }
        }
    }
}

pub fn run(a: InspectArgs, g: &Global) -> anyhow::Result<()> {
    if a.ir {
        let loaded = crate::io::load(&a.model, g.progress())?;
        let ir = crate::ir::Ir::from_model(&loaded.model);
        if a.json {
            println!("{}", serde_json::to_string_pretty(&ir)?);
        } else {
            print!("{}", ir.to_text());
        }
        return Ok(());
    }
    let dir = crate::io::resolve(&a.model, g.progress())?;
    let cfg = crate::io::hf::read_config(&dir)?;
    let shards = crate::io::hf::Shards::open(&dir)?;
    let tok = if dir.join("tokenizer.json").exists() { Some(crate::tokenizer::Tok::from_dir(&dir)?) } else { None };
    let mut per_kind: BTreeMap<&str, usize> = BTreeMap::new();
    let mut dtypes: BTreeMap<String, usize> = BTreeMap::new();
    let mut total = 0usize;
    let mut bytes = 0u64;
    for f in &shards.files {
        bytes += std::fs::metadata(&f.path).map(|m| m.len()).unwrap_or(0);
        for (_, view) in f.view()?.tensors() {
            *dtypes.entry(format!("{:?}", view.dtype())).or_default() += 1;
        }
    }
    for role in TensorRole::all(&cfg) {
        let n: usize = role.shape(&cfg).iter().product();
        *per_kind.entry(kind(role)).or_default() += n;
        total += n;
    }
    let specials: Vec<String> = tok
        .as_ref()
        .map(|t| t.inner.get_added_tokens_decoder().values().filter(|t| t.special).map(|t| t.content.clone()).collect())
        .unwrap_or_default();
    let layer0 = |p: Proj| TensorRole::Weight(0, p).shape(&cfg);
    let info = json!({
        "path": dir,
        "architecture": cfg.arch.name(),
        "layers": cfg.num_layers,
        "d_model": cfg.hidden_size,
        "d_ff": cfg.intermediate_size,
        "heads": cfg.num_heads,
        "kv_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "vocab": cfg.vocab_size,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tied_embeddings": cfg.tie_word_embeddings,
        "biases": {"qkv": cfg.qkv_bias, "o": cfg.o_bias, "mlp": cfg.mlp_bias},
        "shapes": {
            "embed": TensorRole::Embed.shape(&cfg),
            "q_proj": layer0(Proj::Q), "k_proj": layer0(Proj::K), "v_proj": layer0(Proj::V), "o_proj": layer0(Proj::O),
            "gate_proj": layer0(Proj::Gate), "up_proj": layer0(Proj::Up), "down_proj": layer0(Proj::Down),
        },
        "parameters": {"total": total, "by_kind": per_kind},
        "storage": {"dtypes": dtypes, "files": shards.files.len(), "bytes": bytes},
        "tokenizer": tok.as_ref().map(|tok| json!({
            "vocab": tok.vocab_size(),
            "bos": tok.bos_token, "eos": tok.eos_token,
            "special_tokens": specials.len(),
            "chat_template": tok.chat_template.is_some(),
        })),
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&info)?);
        return Ok(());
    }
    println!("{}  ({})", dir.display(), cfg.arch.name());
    println!(
        "  {} layers, d_model {}, d_ff {}, {} heads / {} kv heads × {}, vocab {}",
        cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size
    );
    println!(
        "  rope θ {}, rms eps {:e}, tied embeddings: {}, biases: qkv {} o {} mlp {}",
        cfg.rope_theta, cfg.rms_norm_eps, cfg.tie_word_embeddings, cfg.qkv_bias, cfg.o_bias, cfg.mlp_bias
    );
    println!("  parameters: {} ({:.1}M)", total, total as f64 / 1e6);
    for (k, n) in &per_kind {
        println!("    {k:<10} {n:>12}  {:5.1}%", 100.0 * *n as f64 / total as f64);
    }
    println!("  shapes (layer 0):");
    for p in Proj::ALL {
        println!("    {:<10} {:?}", format!("{p:?}").to_lowercase(), layer0(p));
    }
    println!("  storage: {:?} in {} file(s), {:.1} MB", dtypes, shards.files.len(), bytes as f64 / 1e6);
    match &tok {
        Some(tok) => println!(
            "  tokenizer: {} tokens, {} special, bos {:?}, eos {:?}, chat template: {}",
            tok.vocab_size(),
            specials.len(),
            tok.bos_token.as_deref().unwrap_or("-"),
            tok.eos_token.as_deref().unwrap_or("-"),
            if tok.chat_template.is_some() { "yes" } else { "no" }
        ),
        None => println!("  tokenizer: none (no tokenizer.json)"),
    }
    Ok(())
}
