//! `mechc generate`: stream a completion.

use std::io::Write;
use std::path::PathBuf;

use clap::Args;

use super::Global;
use crate::runtime::generate::{generate, GenOpts};
use crate::runtime::Hooks;

/// Generate text from a prompt (streamed; greedy by default).
///
/// Generate text from a prompt, streaming tokens to stdout. Greedy unless --temperature > 0.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    /// HF model directory or .gguf file.
    pub model: PathBuf,
    /// The prompt (empty: start from BOS only).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template (as a user turn, with the assistant prompt).
    #[arg(long)]
    pub chat: bool,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Seed of the sampler.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(a: GenerateArgs, g: &Global) -> anyhow::Result<()> {
    if !(a.temperature >= 0.0 && a.temperature.is_finite()) {
        anyhow::bail!("--temperature must be a finite number ≥ 0");
    }
    let loaded = crate::io::load(&a.model, g.progress())?;
    let tok = loaded.tok()?;
    let ids = tok.prompt_ids(&a.prompt, a.chat)?;
    if ids.is_empty() {
        anyhow::bail!("the prompt is empty and the tokenizer adds no BOS token: give --prompt");
    }
    let mut stop: Vec<u32> = loaded.model.cfg.eos_token_ids.clone();
    if let Some(e) = tok.eos_token.as_deref().and_then(|t| tok.token_id(t)) {
        stop.push(e);
    }
    let opts = GenOpts { max_tokens: a.max_tokens, temperature: a.temperature, seed: a.seed, stop };
    let mut out = std::io::stdout().lock();
    let mut new: Vec<u32> = vec![];
    let mut printed = 0usize;
    let t = std::time::Instant::now();
    generate(&loaded.model, &ids, &opts, &mut Hooks::new(), |id| {
        new.push(id);
        let text = tok.decode(&new, true)?;
        // Hold back an incomplete UTF-8 sequence (byte-fallback tokens) until it completes.
        if !text.ends_with('\u{FFFD}') && text.len() >= printed && text.is_char_boundary(printed) {
            let _ = write!(out, "{}", &text[printed..]);
            let _ = out.flush();
            printed = text.len();
        }
        Ok(())
    })?;
    let _ = writeln!(out);
    if !g.quiet {
        let secs = t.elapsed().as_secs_f64();
        eprintln!("[{} prompt tokens, {} new tokens, {:.1} tok/s]", ids.len(), new.len(), new.len() as f64 / secs);
    }
    Ok(())
}
