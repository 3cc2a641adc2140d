//! `mechc eval choice`.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::cli::Global;
use crate::verify::choice::{self, ChoiceReport};

/// A/B multiple-choice behaviour score in the CAA format.
///
/// A/B multiple choice in the CAA format (nrimsky/CAA): JSON items with `question` (listing
/// "(A) ..." and "(B) ..."), `answer_matching_behavior` and `answer_not_matching_behavior`.
/// The question is the user turn and the assistant turn starts with "("; the log-probabilities
/// of the next tokens "A" and "B" are compared. Reports per item p(matching) / (p(A) + p(B)),
/// its mean (the behaviour score), and the share of items where the matching answer wins.
#[derive(Args, Debug)]
pub struct ChoiceArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// CAA-format JSON or JSONL file (e.g. caa_refusal_test_ab.json).
    #[arg(long)]
    pub items: PathBuf,
    /// Use only the first N items (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Prompts scored together in one batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Plain text instead of the chat template: "QUESTION\n\nAnswer: (".
    #[arg(long)]
    pub no_chat: bool,
    /// Score "(A" and "(B" as the tokenizer writes them (the tokens after their common prefix)
    /// instead of the letter after a lone "(" token; the same numbers where the tokenizer
    /// splits "(" from the letter, meaningful where it merges them (Qwen2).
    #[arg(long)]
    pub joint: bool,
    #[command(flatten)]
    pub out: crate::cli::ReportArgs,
    /// Items to list in the table.
    #[arg(long, default_value_t = 10)]
    pub show: usize,
}

#[derive(Serialize)]
struct Output {
    model: String,
    items_file: String,
    sha256: String,
    #[serde(flatten)]
    report: ChoiceReport,
}

pub fn run(a: ChoiceArgs, g: &Global) -> anyhow::Result<()> {
    a.out.check(&[a.model.as_path(), a.items.as_path()])?;
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let items = choice::load_items(&a.items, a.limit)?;
    let sha256 = crate::io::sha256_file(&a.items)?;
    let loaded = crate::io::load(&a.model, g.progress())?;
    let opts = choice::ChoiceOpts { chat: !a.no_chat, joint: a.joint, batch: a.batch_size };
    let report = choice::choice_eval(&loaded.model, loaded.tok()?, &items, &opts)?;
    if !a.joint && report.mean_letter_mass < 0.1 && !g.quiet {
        eprintln!(
            "note: the letters take little probability after \"(\" (mean p(A)+p(B) = {:.3}); if this tokenizer writes \"(A\" as one token, try --joint",
            report.mean_letter_mass
        );
    }
    if let Some(path) = &a.out.report {
        let mut rep = crate::report::Report::new(&format!("mechc eval choice: {}", a.model.display()));
        crate::verify::report::choice(&mut rep, &report)?;
        rep.write(path)?;
    }
    if a.out.json {
        let out = Output { model: a.model.display().to_string(), items_file: a.items.display().to_string(), sha256, report };
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", choice::table(&report, a.show));
    }
    Ok(())
}
