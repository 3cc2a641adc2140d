//! `mechc eval perplexity`.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Global;

/// Sliding-window perplexity of a text, as the transformers docs compute it.
///
/// Perplexity of a text with a sliding window, as the transformers documentation computes it:
/// windows of --seq-len tokens every --stride tokens, each scoring only the tokens the previous
/// window did not. Compare with published numbers only when text, tokenisation, sequence
/// length and stride all match.
#[derive(Args, Debug)]
pub struct PerplexityArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Plain-text file (CRLF line endings are normalised to LF).
    #[arg(long)]
    pub text: PathBuf,
    /// Use only the first N tokens of the text (0 = all).
    #[arg(long, default_value_t = 0)]
    pub tokens: usize,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Distance between window starts (default: --seq-len, i.e. disjoint windows).
    #[arg(long)]
    pub stride: Option<usize>,
    #[command(flatten)]
    pub out: crate::cli::ReportArgs,
}

pub fn run(a: PerplexityArgs, g: &Global) -> anyhow::Result<()> {
    a.out.check(&[a.model.as_path(), a.text.as_path()])?;
    let loaded = crate::io::load(&a.model, g.progress())?;
    let text = std::fs::read_to_string(&a.text).map_err(|e| crate::Error::io(&a.text, e))?.replace("\r\n", "\n");
    let mut ids = loaded.tok()?.encode(&text, false)?;
    if a.tokens > 0 {
        ids.truncate(a.tokens);
    }
    let stride = a.stride.unwrap_or(a.seq_len);
    let bar = crate::progress::bar(0, "windows", g.progress());
    let r = crate::verify::perplexity::perplexity(&loaded.model, &ids, a.seq_len, stride, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    if let Some(path) = &a.out.report {
        let mut rep = crate::report::Report::new(&format!("mechc eval perplexity: {}", a.model.display()));
        crate::verify::report::perplexity(&mut rep, &r);
        rep.write(path)?;
    }
    if a.out.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "perplexity {:.4} (mean NLL {:.5} nats) over {} scored of {} tokens, {} windows of {} (stride {})",
            r.perplexity, r.nll, r.scored_tokens, r.total_tokens, r.windows, r.seq_len, r.stride
        );
    }
    Ok(())
}
