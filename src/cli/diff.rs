//! `mechc diff MODEL_A MODEL_B`: what changed between two models' behaviour.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::data::{SetSpec, TextSet};
use crate::report::one_line;
use crate::verify::diff::{diff_prompts, diff_text, DiffOpts, PromptsDiff, Side, TextDiff};

/// Compare two models' behaviour: KL, top-1 agreement, perplexity, most-moved prompts.
///
/// Compare two models' next-token distributions over prompts and/or text: KL(A‖B) at every
/// position and at the first generated token, top-1 agreement, perplexity of each on the text,
/// and the prompts that moved most with both greedy continuations. Works across shape changes
/// (pruned heads, neurons or layers) since only outputs are compared; both models must share
/// the tokenizer (A's is used).
#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The reference model (HF directory or .gguf).
    pub model_a: PathBuf,
    /// The model compared with it.
    pub model_b: PathBuf,
    /// Prompts as FILE[:FIELD] (JSON list of strings or objects, JSONL, CSV column, or text lines).
    #[arg(long)]
    pub prompts: Option<SetSpec>,
    /// Use only the first N prompts (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// Wrap each prompt in the chat template (user turn + generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// Plain-text file for perplexity and KL over running text (CRLF normalised to LF).
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Tokens of --text to use (0 = all).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Window length over --text (disjoint windows; stride = seq-len).
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Prompts per forward.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// How many most-moved prompts to show with greedy continuations (0 = none).
    #[arg(long, default_value_t = 5)]
    pub top: usize,
    /// Length of those continuations, in tokens.
    #[arg(long, default_value_t = 24)]
    pub gen_tokens: usize,
    #[command(flatten)]
    pub out: crate::cli::ReportArgs,
}

pub fn run(a: DiffArgs, g: &Global) -> anyhow::Result<()> {
    a.out.check(&[a.model_a.as_path(), a.model_b.as_path()])?;
    if a.prompts.is_none() && a.text.is_none() {
        anyhow::bail!("give --prompts FILE[:FIELD] and/or --text FILE to compare on");
    }
    // Read the data first: a typo should not cost two model loads.
    let prompts = a.prompts.as_ref().map(|s| TextSet::load(s, a.limit)).transpose()?;
    let text = a.text.as_ref().map(|p| std::fs::read_to_string(p).map_err(|e| crate::Error::io(p, e))).transpose()?;
    let la = crate::io::load(&a.model_a, g.progress())?;
    let lb = crate::io::load(&a.model_b, g.progress())?;
    let tok = la.tok()?;
    let sides = [Side::of(&a.model_a, &la.model)?, Side::of(&a.model_b, &lb.model)?];

    let prompts_diff = match &prompts {
        Some(set) => {
            let ids = tok.prompts_ids(&set.texts, a.chat)?;
            let opts = DiffOpts {
                batch: a.batch_size,
                top_moved: a.top,
                gen_tokens: a.gen_tokens,
                stop: la.model.cfg.eos_token_ids.clone(),
            };
            let bar = crate::progress::bar(set.texts.len() as u64, "prompts", g.progress());
            let d = diff_prompts(&la.model, &lb.model, &ids, &set.texts, &opts, |c| tok.decode(c, true), |i, _| {
                bar.set_position(i as u64)
            })?;
            bar.finish_and_clear();
            Some(d)
        }
        None => None,
    };
    let text_diff = match &text {
        Some(t) => {
            let mut ids = tok.encode(&t.replace("\r\n", "\n"), false)?;
            if a.tokens > 0 {
                ids.truncate(a.tokens);
            }
            let bar = crate::progress::bar(0, "windows", g.progress());
            let d = diff_text(&la.model, &lb.model, &ids, a.seq_len, |i, n| {
                bar.set_length(n as u64);
                bar.set_position(i as u64);
            })?;
            bar.finish_and_clear();
            Some(d)
        }
        None => None,
    };

    let out = json!({
        "a": sides[0], "b": sides[1],
        "prompts": prompts_diff.as_ref().map(|d| json!({"set": prompts.as_ref().map(|s| s.spec.to_string()),
            "sha256": prompts.as_ref().map(|s| s.sha256.clone()), "chat": a.chat, "result": d})),
        "text": text_diff.as_ref().map(|d| json!({"file": a.text, "result": d})),
    });
    if let Some(path) = &a.out.report {
        crate::verify::report::diff(path, &sides, prompts_diff.as_ref(), text_diff.as_ref())?;
    }
    if a.out.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", human(&sides, prompts_diff.as_ref(), text_diff.as_ref(), a.chat));
    }
    Ok(())
}

pub fn human(sides: &[Side; 2], p: Option<&PromptsDiff>, t: Option<&TextDiff>, chat: bool) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    for (name, d) in ["A", "B"].iter().zip(sides) {
        let _ = writeln!(
            s,
            "{name}  {}  ({}, {} layers, {:.2}M parameters, {:.1} MB of weights)",
            d.path.display(),
            d.architecture,
            d.layers,
            d.parameters as f64 / 1e6,
            d.file_bytes as f64 / 1e6
        );
    }
    if let Some(p) = p {
        let _ = writeln!(s, "\nprompts: {} ({} tokens{})", p.prompts, p.tokens, if chat { ", chat template" } else { "" });
        let _ = writeln!(s, "  {:<26}{:>12}{:>12}{:>12}", "", "KL mean", "KL max", "top-1 agree");
        for (name, st) in [("every position", &p.all), ("first generated token", &p.first)] {
            let _ = writeln!(s, "  {:<26}{:>12.6}{:>12.6}{:>11.2}%", name, st.kl_mean, st.kl_max, 100.0 * st.top1_agreement);
        }
        let _ = writeln!(
            s,
            "  {:.1} s, {:.0} tokens/s through both models (model A's forward alone: {:.0} tokens/s)",
            p.timing.total_s, p.timing.tokens_per_s, p.timing.forward_a_tokens_per_s
        );
    }
    if let Some(t) = t {
        let _ = writeln!(s, "\ntext: {} tokens in {} windows of {}", t.tokens, t.windows, t.seq_len);
        let _ = writeln!(s, "  perplexity  A {:.4}   B {:.4}   (B/A {:.4})", t.perplexity_a, t.perplexity_b, t.perplexity_ratio);
        let _ = writeln!(
            s,
            "  KL mean {:.6}   KL max {:.6}   top-1 agreement {:.2}%",
            t.all.kl_mean,
            t.all.kl_max,
            100.0 * t.all.top1_agreement
        );
    }
    if let Some(p) = p.filter(|p| !p.moved.is_empty()) {
        let _ = writeln!(s, "\nmoved most (first-token KL):");
        for m in &p.moved {
            let _ = writeln!(s, "  #{:<5} KL {:.4}  {}", m.index, m.kl_first, one_line(&m.prompt, 90));
            let _ = writeln!(s, "         A: {}", one_line(&m.continuation_a, 100));
            let _ = writeln!(s, "         B: {}", one_line(&m.continuation_b, 100));
        }
    }
    s
}
