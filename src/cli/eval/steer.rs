//! `mechc eval steer`.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Global;
use crate::data::{SetSpec, TextSet};
use crate::verify::steer::{self, SteerMetric, SteerOpts};

/// Steering sweep: behaviour score and KL cost per coefficient of an added direction.
///
/// Additive steering sweep: add c·v to the residual stream after block --layer
/// (blocks.L.hook_resid_post, every position: the exact twin of adding c·v to that layer's
/// down_proj bias) for each coefficient c, and report the behaviour score (mean last-token
/// projection on v̂, or the targets' first-token log-probs) and the cost (first-token
/// KL(unsteered ‖ steered)).
#[derive(Args, Debug)]
pub struct SteerArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The direction v: FILE.safetensors[:TENSOR], a 1-D float tensor of d_model values
    /// (TENSOR may be omitted when the file holds one tensor).
    #[arg(long)]
    pub direction: SetSpec,
    /// The block after which c·v is added (0-based).
    #[arg(long)]
    pub layer: usize,
    /// Coefficients, comma-separated (e.g. -8,-4,0,4,8).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true, default_value = "-8,-4,0,4,8")]
    pub coeffs: Vec<f64>,
    /// Prompts: FILE[:FIELD] (JSON/JSONL list of strings or objects, CSV column, text lines).
    #[arg(long)]
    pub prompts: SetSpec,
    /// Use only the first N prompts (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// The score reported per coefficient.
    #[arg(long, value_enum, default_value_t = SteerMetric::Projection)]
    pub metric: SteerMetric,
    /// Target strings whose first token's log-prob is reported, comma-separated (e.g. " happy").
    #[arg(long, value_delimiter = ',')]
    pub target: Vec<String>,
    /// Layer whose last-token resid_post is projected on v̂ (default: the last layer).
    #[arg(long)]
    pub measure_layer: Option<usize>,
    /// Scale v to unit norm before multiplying by the coefficients.
    #[arg(long)]
    pub normalize: bool,
    /// Wrap each prompt in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[command(flatten)]
    pub out: crate::cli::ReportArgs,
}

pub fn run(a: SteerArgs, g: &Global) -> anyhow::Result<()> {
    a.out.check(&[a.model.as_path()])?;
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if a.metric == SteerMetric::Target && a.target.is_empty() {
        anyhow::bail!("--metric target needs --target (e.g. --target \" happy\")");
    }
    let set = TextSet::load(&a.prompts, a.limit)?;
    let loaded = crate::io::load(&a.model, g.progress())?;
    let model = &loaded.model;
    let direction = steer::load_direction(&a.direction, model.cfg.hidden_size)?;
    let tok = loaded.tok()?;
    let prompts = tok.prompts_ids(&set.texts, a.chat)?;
    let opts = SteerOpts {
        layer: a.layer,
        measure_layer: a.measure_layer,
        coeffs: a.coeffs.clone(),
        metric: a.metric,
        targets: steer::target_tokens(tok, &a.target)?,
        normalize: a.normalize,
        batch: a.batch_size,
    };
    let bar = crate::progress::bar(0, "passes", g.progress());
    let r = steer::steer_sweep(model, &prompts, &direction, &opts, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    if let Some(path) = &a.out.report {
        let mut rep = crate::report::Report::new(&format!("mechc eval steer: {}", a.model.display()));
        crate::verify::report::steer(&mut rep, &r)?;
        rep.write(path)?;
    }
    if a.out.json {
        let out = serde_json::json!({
            "model": a.model.display().to_string(),
            "direction": a.direction.to_string(),
            "prompts": set.spec.to_string(),
            "prompts_sha256": set.sha256,
            "chat": a.chat,
            "report": r,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", steer::table(&r));
    }
    Ok(())
}
