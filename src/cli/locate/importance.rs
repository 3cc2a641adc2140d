//! What `locate head-importance` and `locate neuron-importance` share: the calibration flags
//! and the run.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::ir::Source;
use crate::locate::importance::{self as imp, By, Options, Unit};

#[derive(Args, Debug)]
pub struct CommonArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Calibration text (plain text, e.g. WikiText-2's wiki.test.raw).
    #[arg(long)]
    pub text: PathBuf,
    /// Calibration tokens taken from the start of --text, after --skip (0 = all).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Skip this many tokens at the start of --text first (hold them out, e.g. for the
    /// perplexity a compile's [verify] measures on the same file).
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Window length: the text is cut into disjoint windows of this many tokens.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Score only these layers (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Write the findings (JSON) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: CommonArgs, by: By, unit: Unit, g: &Global) -> anyhow::Result<()> {
    super::check_out(a.out.as_deref(), a.force)?;
    if !a.text.is_file() {
        return Err(crate::Error::bad_file(&a.text, "no such file").into());
    }
    let loaded = crate::io::load(&a.model, g.progress())?;
    let n = loaded.model.blocks.len();
    if let Some(&bad) = a.layers.iter().find(|&&l| l >= n) {
        anyhow::bail!("--layers: layer {bad} does not exist (the model has layers 0..{})", n - 1);
    }
    let model_src = Source::model(&a.model)?;
    let data_src = Source::file(&a.text)?;
    let mut ids = crate::locate::text_ids(loaded.tok()?, &a.text, if a.tokens == 0 { 0 } else { a.skip + a.tokens })?;
    if a.skip >= ids.len() {
        anyhow::bail!("--skip {}: the text has only {} tokens", a.skip, ids.len());
    }
    ids.drain(..a.skip);
    let opt = Options { by, seq_len: a.seq_len, layers: a.layers.clone() };
    let bar = crate::progress::bar(0, by.name(), g.progress());
    let r = imp::importance(&loaded.model, &ids, unit, &opt, |stage, i, n| {
        bar.set_message(stage.to_string());
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let options = json!({
        "by": by.name(),
        "tokens": r.tokens,
        "skip": a.skip,
        "seq_len": a.seq_len,
        "windows": r.windows,
        "layers": r.layers,
    });
    let f = imp::findings(&r, options, model_src, vec![data_src]);
    super::finish(f, a.out.as_ref(), g, &[])
}
