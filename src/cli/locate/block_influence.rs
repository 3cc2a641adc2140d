//! `mechc locate block-influence`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::ir::Source;
use crate::locate::block_influence::{self as bi, Options};
use crate::runtime::Hooks;

/// Score every layer by how little it changes the residual stream (ShortGPT's block influence):
/// BI_l = 1 − mean over tokens of cos(resid_pre_l, resid_post_l). The lowest-BI layers are the
/// most redundant: candidates for `skip-layers`. With --n K > 1, score blocks of K consecutive
/// layers by Gromov et al.'s angular distance arccos(cos(x_l, x_l+K)) / π at the last token of each
/// window (score on L{l} = the block starting at l) and report the best block.
///
/// Findings: `L{l}` with score = BI (n = 1) or angular distance (n > 1).
#[derive(Args, Debug)]
pub struct BlockInfluenceArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration text (plain text, e.g. WikiText-2's wiki.test.raw).
    #[arg(long)]
    pub text: PathBuf,
    /// Calibration tokens taken from the start of --text (0 = all).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Window length: the text is cut into disjoint windows of this many tokens.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Layers per block for the angular distance (1 = per-layer BI).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
    /// Write the findings (JSON) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also plot the scores per layer (SVG).
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Replace --out / --plot if they exist.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: BlockInfluenceArgs, g: &Global) -> anyhow::Result<()> {
    super::check_out(a.out.as_deref(), a.force)?;
    super::check_out(a.plot.as_deref(), a.force)?;
    if !a.text.is_file() {
        return Err(crate::Error::bad_file(&a.text, "no such file").into());
    }
    let loaded = crate::io::load(&a.model, g.progress())?;
    let model_src = Source::model(&a.model)?;
    let data_src = Source::file(&a.text)?;
    let ids = crate::locate::text_ids(loaded.tok()?, &a.text, a.tokens)?;
    let opt = Options {
        seq_len: a.seq_len,
        n: a.n,
    };
    let bar = crate::progress::bar(0, "windows", g.progress());
    let r = bi::block_influence(&loaded.model, &ids, opt, &Hooks::new(), |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let options = json!({"tokens": r.tokens, "seq_len": a.seq_len, "n": a.n, "windows": r.windows});
    let f = bi::findings(&r, options, model_src, vec![data_src]);
    if let Some(p) = &a.plot {
        let pts = |v: &[f64]| v.iter().enumerate().map(|(l, &y)| (l as f64, y)).collect::<Vec<_>>();
        let mut series = vec![("block influence".to_string(), pts(&r.bi))];
        series.push((format!("angular distance (n = {})", r.n), pts(&r.angular)));
        let svg = crate::report::lines_svg(
            &series,
            "Block influence per layer (low = redundant)",
            "layer (block start)",
            "score",
        )?;
        crate::io::atomic::write_file(p, svg.as_bytes())?;
    }
    super::finish(f, a.out.as_ref(), g, &[])
}
