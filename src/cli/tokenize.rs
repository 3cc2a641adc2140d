//! `mechc tokenize`: token ids as JSON (used by the interop tests against transformers).

use std::path::PathBuf;

use clap::Args;

use super::Global;

/// Print the token ids of texts as a JSON list of lists.
#[derive(Args, Debug)]
pub struct TokenizeArgs {
    /// HF model directory or .gguf file.
    pub model: PathBuf,
    /// A text to tokenize (repeatable).
    #[arg(long)]
    pub text: Vec<String>,
    /// A JSON file holding a list of strings.
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Do not add the tokenizer's special tokens (BOS/EOS).
    #[arg(long)]
    pub no_special: bool,
    /// Apply the chat template to each text (as one user turn).
    #[arg(long)]
    pub chat: bool,
}

pub fn run(a: TokenizeArgs, g: &Global) -> anyhow::Result<()> {
    let dir = crate::io::resolve(&a.model, g.progress())?;
    let tok = crate::tokenizer::Tok::from_dir(&dir)?;
    let mut texts = a.text.clone();
    if let Some(f) = &a.file {
        let s = std::fs::read_to_string(f).map_err(|e| crate::Error::io(f, e))?;
        let list: Vec<String> = serde_json::from_str(&s)
            .map_err(|e| crate::Error::bad_file(f, format!("expected a JSON list of strings: {e}")))?;
        texts.extend(list);
    }
    let mut all = vec![];
    for t in &texts {
        all.push(if a.chat { tok.prompt_ids(t, true)? } else { tok.encode(t, !a.no_special)? });
    }
    println!("{}", serde_json::to_string(&all)?);
    Ok(())
}
