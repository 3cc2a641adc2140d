//! `mechc locate logit-lens`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::ir::Source;
use crate::locate::logit_lens as lens;

/// Decode the residual stream after every block through the final norm and the unembedding
/// (the logit lens) and follow one target token: its probability and rank per layer, plus the
/// top tokens. The last layer's row is the model's own prediction.
///
/// Findings: `embed` and `L{l}` with score = the target's probability.
#[derive(Args, Debug)]
pub struct LogitLensArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// The target text; its first token is followed (mind the leading space: " Paris").
    #[arg(long)]
    pub target: String,
    /// Prompt position to decode (negative counts from the end; -1 = last token).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub position: i64,
    /// Top tokens to record per layer.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
    /// Write the findings (JSON) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: LogitLensArgs, g: &Global) -> anyhow::Result<()> {
    super::check_out(a.out.as_deref(), a.force)?;
    let loaded = crate::io::load(&a.model, g.progress())?;
    let model_src = Source::model(&a.model)?;
    let tok = loaded.tok()?;
    let ids = tok.prompt_ids(&a.prompt, a.chat)?;
    if ids.is_empty() {
        anyhow::bail!("--prompt has no tokens");
    }
    let target_ids = tok.encode(&a.target, false)?;
    let Some(&target) = target_ids.first() else {
        anyhow::bail!("--target {:?} has no tokens", a.target)
    };
    let pos = lens::position(a.position, ids.len())?;
    let rows = lens::logit_lens(&loaded.model, &ids, pos, target, a.top_k)?;
    let decode = |id: u32| tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
    let options = json!({
        "prompt": a.prompt, "chat": a.chat, "target": a.target, "target_id": target,
        "target_token": decode(target), "target_tokens": target_ids.len(),
        "position": pos, "top_k": a.top_k,
    });
    let f = lens::findings(&rows, decode, options, model_src, vec![Source::inline(&a.prompt)]);
    if !g.quiet {
        println!(
            "target {:?} = token {target} {:?} at position {pos} of {}",
            a.target,
            decode(target),
            ids.len()
        );
        println!("{:<8} {:>6} {:>10}  top", "layer", "rank", "prob");
        for r in &rows {
            let top: Vec<String> = r.top.iter().map(|&(id, p)| format!("{:?} {:.3}", decode(id), p)).collect();
            println!(
                "{:<8} {:>6} {:>10}  {}",
                r.component.to_string(),
                r.rank,
                crate::ir::findings::fmt_score(r.prob),
                top.join(", ")
            );
        }
    }
    if let Some(p) = &a.out {
        f.write(p)?;
        if !g.quiet {
            eprintln!("wrote {}", p.display());
        }
    }
    Ok(())
}
