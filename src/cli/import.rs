//! `mechc import`: GGUF → HF directory.

use std::path::PathBuf;

use clap::Args;

use super::Global;

/// Import a GGUF file into an HF model directory that transformers loads.
///
/// Writes model.safetensors (dequantised, Q/K un-permuted to HF layout), config.json,
/// generation_config.json, tokenizer.json, tokenizer_config.json (special tokens, chat template)
/// and special_tokens_map.json. The directory appears whole or not at all.
#[derive(Args, Debug)]
pub struct ImportArgs {
    /// The .gguf file.
    pub file: PathBuf,
    /// Output directory (must not exist, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Storage dtype of the written weights.
    #[arg(long, default_value = "f32", value_parser = ["f32", "f16", "bf16"])]
    pub dtype: String,
    /// Replace the output directory if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: ImportArgs, g: &Global) -> anyhow::Result<()> {
    let dtype = crate::io::st::parse_dtype(&a.dtype)?;
    let t = std::time::Instant::now();
    let out = crate::io::gguf::import(&a.file, &a.out, dtype, a.force, g.progress())?;
    if !g.quiet {
        eprintln!("imported {} → {} in {:.1}s", a.file.display(), out.display(), t.elapsed().as_secs_f64());
    }
    Ok(())
}
