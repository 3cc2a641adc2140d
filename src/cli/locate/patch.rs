//! `mechc locate patch`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::ir::Source;
use crate::locate::patch::{self as ap, Metric, PatchSite};
use crate::report::{heatmaps_svg, Heatmap};

/// Activation patching: run a clean and a corrupted prompt of the same token length (e.g. "The
/// Eiffel Tower is in" / "The Colosseum is in"), patch one clean activation at a time into the
/// corrupted run, and measure the normalised effect (m_patched − m_corrupt) / (m_clean −
/// m_corrupt) on the metric at the last position: the logit difference between the answer and
/// the wrong answer, or p(answer). Sites: the residual stream entering each block and each MLP's
/// output per position, and each attention head's output (`attn.hook_z`, all positions).
///
/// Findings: `L{l}` (resid) and `L{l}.mlp` with score = the largest effect over positions;
/// `L{l}.H{h}` with score = the head's effect. The summary holds the full grids.
#[derive(Args, Debug)]
pub struct PatchArgs {
    #[command(flatten)]
    pub pair: PairArgs,
    /// Sites to patch (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = PatchSite::ALL.to_vec())]
    pub sites: Vec<PatchSite>,
    /// Write the findings (JSON) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Plot the normalised effects (SVG): positions × layers for resid and mlp, heads × layers.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Replace --out / --plot if they exist.
    #[arg(long)]
    pub force: bool,
}

/// The prompt pair and metric that `patch` and `attribute` share.
#[derive(Args, Debug)]
pub struct PairArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The clean prompt (its activations are patched in).
    #[arg(long)]
    pub clean: String,
    /// The corrupted prompt (patched; attribution takes its gradient here); must have as many
    /// tokens as --clean.
    #[arg(long)]
    pub corrupted: String,
    /// Wrap the prompts in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// The answer (first token counts; mind the leading space). Default: the greedy next token
    /// on the clean prompt.
    #[arg(long)]
    pub answer: Option<String>,
    /// The wrong answer of the logit difference. Default: the greedy next token on the
    /// corrupted prompt.
    #[arg(long)]
    pub wrong: Option<String>,
    /// The metric at the last position.
    #[arg(long, value_enum, default_value_t = Metric::LogitDiff)]
    pub metric: Metric,
}

/// A loaded [`PairArgs`]: the model and both prompts' token ids (equal lengths).
pub struct Pair {
    pub loaded: crate::io::Loaded,
    pub clean: Vec<u32>,
    pub corrupt: Vec<u32>,
    pub answer: Option<u32>,
    pub wrong: Option<u32>,
}

impl PairArgs {
    /// Load the model and tokenize the pair; `method` names what needs equal lengths.
    pub fn load(&self, method: &str, g: &Global) -> anyhow::Result<Pair> {
        let loaded = crate::io::load(&self.model, g.progress())?;
        let tok = loaded.tok()?;
        let clean = tok.prompt_ids(&self.clean, self.chat)?;
        let corrupt = tok.prompt_ids(&self.corrupted, self.chat)?;
        if clean.len() != corrupt.len() {
            anyhow::bail!(
                "--clean has {} tokens and --corrupted {}: {method} needs prompts of the same token length",
                clean.len(),
                corrupt.len()
            );
        }
        let answer = self.answer.as_deref().map(|t| super::first_token(tok, "--answer", t)).transpose()?;
        let wrong = self.wrong.as_deref().map(|t| super::first_token(tok, "--wrong", t)).transpose()?;
        Ok(Pair { loaded, clean, corrupt, answer, wrong })
    }
}

pub fn run(a: PatchArgs, g: &Global) -> anyhow::Result<()> {
    super::check_out(a.out.as_deref(), a.force)?;
    super::check_out(a.plot.as_deref(), a.force)?;
    let Pair { loaded, clean, corrupt, answer, wrong } = a.pair.load("activation patching", g)?;
    let (model, tok) = (&loaded.model, loaded.tok()?);
    let bar = crate::progress::bar(0, "layers", g.progress());
    let p = ap::patch(model, &clean, &corrupt, answer, wrong, a.pair.metric, &a.sites, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let decode = |id: u32| tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
    let options = json!({
        "clean": a.pair.clean, "corrupted": a.pair.corrupted, "chat": a.pair.chat, "metric": a.pair.metric,
        "answer_id": p.answer, "answer": decode(p.answer),
        "wrong_id": p.wrong, "wrong": p.wrong.map(decode),
        "sites": a.sites.iter().map(|s| s.name()).collect::<Vec<_>>(),
    });
    let data = vec![Source::inline(&a.pair.clean), Source::inline(&a.pair.corrupted)];
    let f = ap::findings(&p, options, Source::model(&a.pair.model)?, data);
    if let Some(path) = &a.plot {
        let rows: Vec<String> = clean
            .iter()
            .zip(&corrupt)
            .map(|(&c, &x)| if c == x { decode(c) } else { format!("{}/{}", decode(c), decode(x)) })
            .collect();
        let panels: Vec<Heatmap> = p
            .grids
            .iter()
            .map(|(site, grid)| Heatmap {
                title: site.name().to_string(),
                rows: if *site == PatchSite::Head { (0..grid.len()).map(|h| format!("H{h}")).collect() } else { rows.clone() },
                values: grid.clone(),
                color: plotters::style::RGBColor(8, 69, 148),
                x_label: "layer".into(),
            })
            .collect();
        let title = format!("Activation patching, normalised {:?} (clean {:.3}, corrupted {:.3})", a.pair.metric, p.m_clean, p.m_corrupt);
        crate::io::atomic::write_file(path, heatmaps_svg(&panels, &title)?.as_bytes())?;
    }
    super::finish(f, a.out.as_ref(), g, &["grids"])
}
