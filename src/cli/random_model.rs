//! `mechc random-model` (hidden): write a tiny random model, for interop tests of architecture
//! options no real checkpoint here has (attention/MLP biases, llama3 RoPE scaling).

use std::path::PathBuf;

use clap::Args;

use super::Global;
use crate::model::random::{random_model, RandomSpec};
use crate::model::{Arch, RopeScaling};

/// Write a tiny random model (config.json + model.safetensors) drawn from a seed.
#[derive(Args, Debug)]
pub struct RandomModelArgs {
    /// Output directory (must not exist, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// llama or qwen2.
    #[arg(long, default_value = "llama")]
    pub arch: String,
    /// q/k/v/o biases (llama only).
    #[arg(long)]
    pub attention_bias: bool,
    /// gate/up/down biases (llama only).
    #[arg(long)]
    pub mlp_bias: bool,
    /// Use llama3 RoPE scaling (factor 8, low 1, high 4, original context 64, so every band occurs).
    #[arg(long)]
    pub llama3_rope: bool,
    /// Tie the unembedding to the embedding.
    #[arg(long)]
    pub tied: bool,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: RandomModelArgs, _g: &Global) -> anyhow::Result<()> {
    crate::io::atomic::check(&a.out, a.force, &[])?;
    let mut spec = RandomSpec::from_seed(a.seed);
    spec.arch = match a.arch.as_str() {
        "llama" => Arch::Llama,
        "qwen2" => Arch::Qwen2,
        other => anyhow::bail!("unknown --arch {other} (llama, qwen2)"),
    };
    spec.attention_bias = a.attention_bias;
    spec.mlp_bias = a.mlp_bias;
    spec.tied = a.tied;
    if a.llama3_rope {
        spec.head_dim = 16; // enough frequencies to span all three llama3 bands
    }
    if spec.arch == Arch::Qwen2 && (a.attention_bias || a.mlp_bias) {
        anyhow::bail!("--attention-bias/--mlp-bias apply to llama only (qwen2 always has q/k/v biases)");
    }
    let mut cfg = spec.config();
    if a.llama3_rope {
        // Small wavelengths so that all three bands (kept, interpolated, scaled) occur.
        cfg.rope_scaling = Some(RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 64.0,
        });
        cfg.rope_theta = 500000.0;
    }
    let model = random_model(cfg, a.seed)?;
    let dir = crate::io::atomic::OutDir::create(&a.out, a.force, &[])?;
    crate::io::hf::save_model(&model, dir.path(), candle_core::DType::F32, &Default::default())?;
    dir.commit()?;
    Ok(())
}
