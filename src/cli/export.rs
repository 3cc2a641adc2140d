//! `mechc export`: an HF directory (a compiled model, an import) → a GGUF file llama.cpp runs.

use std::path::PathBuf;

use clap::Args;

use super::Global;
use crate::io::gguf_export::GgufType;

/// Export a model as one GGUF file (llama.cpp, and the tools built on it, load it).
///
/// Llama and Qwen2 architectures; the tokenizer (byte-level BPE or SentencePiece) and the chat
/// template go into the GGUF metadata. --type sets the type of the 2-D weights (norms and biases
/// stay F32; Q8_0/Q4_0 store a row not divisible by 32 as F16). A model that GGUF cannot express as
/// llama.cpp reads it (different head counts or MLP widths per layer, RoPE scaling, biases
/// llama.cpp's qwen2 lacks) is refused with the reason, and nothing is written. The file is
/// written to a temporary sibling and renamed into place; the same model and type give the same
/// bytes. MODEL may also be a .gguf (imported first), e.g. to re-quantise.
#[derive(Args, Debug)]
pub struct ExportArgs {
    /// The model: an HF directory or a .gguf file.
    pub model: PathBuf,
    /// The GGUF file to write (must not exist, unless --force).
    #[arg(long)]
    pub gguf: PathBuf,
    /// Type of the 2-D weights.
    #[arg(long = "type", default_value = "f32", value_parser = GgufType::NAMES.to_vec())]
    pub ty: String,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: ExportArgs, g: &Global) -> anyhow::Result<()> {
    let ty = GgufType::parse(&a.ty)?;
    crate::io::atomic::check_file(&a.gguf, a.force, &[&a.model])?;
    let t = std::time::Instant::now();
    let dir = crate::io::resolve(&a.model, g.progress())?;
    let out = crate::io::gguf_export::export_dir(&dir, &a.gguf, ty, a.force, g.progress())?;
    if !g.quiet {
        let size = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
        eprintln!(
            "exported {} → {} ({}, {:.1} MB) in {:.1}s",
            a.model.display(),
            out.display(),
            a.ty,
            size as f64 / 1e6,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
