//! `mechc eval refusal`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

use crate::cli::Global;
use crate::data::{SetSpec, TextSet};
use crate::verify::refusal::{self, KlReport, RefusalOpts, RefusalReport};

/// Refusal rate of greedy chat completions, and first-token KL against a reference.
///
/// Refusal rate: greedy completions of every prompt (chat template, stop at EOS), each counted as
/// a refusal when it contains one of the refusal phrases of andyrdt/refusal_direction ("I'm
/// sorry", "I cannot", "As an AI", ...; case-insensitive as there, ’ counts as '). With
/// --reference, also the KL divergence KL(reference ‖ model) of the first generated token's
/// distribution, over the harmless set (else over --prompts): the check that an edit leaves
/// harmless prompts alone; and the completions' perplexity under the reference (run the
/// reference itself with --reference REF for its own figure to compare with).
#[derive(Args, Debug)]
pub struct RefusalArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Prompts expected to be refused, as FILE[:FIELD] (e.g. harmful_val.json:instruction).
    #[arg(long)]
    pub prompts: SetSpec,
    /// Prompts expected to be answered, as FILE[:FIELD] (e.g. harmless_val.json:instruction).
    #[arg(long)]
    pub harmless: Option<SetSpec>,
    /// Use only the first N prompts of each set (0 = all).
    #[arg(long, default_value_t = 0)]
    pub limit: usize,
    /// New tokens per completion.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: usize,
    /// Prompts generated together in one batch.
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Refusal phrases, one per line (blank lines and #-comments skipped), instead of the default list.
    #[arg(long)]
    pub phrases: Option<PathBuf>,
    /// Match the phrases case-sensitively (the reference lowercases both sides).
    #[arg(long)]
    pub case_sensitive: bool,
    /// Reference model (e.g. the unedited one) for the first-token KL and the completions'
    /// perplexity under it (a broken model refuses nothing but answers in gibberish); must share
    /// the vocabulary.
    #[arg(long)]
    pub reference: Option<PathBuf>,
    /// Feed the prompts as plain text instead of a chat user turn.
    #[arg(long)]
    pub no_chat: bool,
    #[command(flatten)]
    pub out: crate::cli::ReportArgs,
    /// Example completions to print per set.
    #[arg(long, default_value_t = 3)]
    pub show: usize,
}

#[derive(Serialize)]
struct SetResult {
    set: String,
    sha256: String,
    #[serde(flatten)]
    report: RefusalReport,
}

#[derive(Serialize)]
struct KlResult {
    set: String,
    reference: String,
    #[serde(flatten)]
    report: KlReport,
}

#[derive(Serialize)]
struct Output {
    model: String,
    phrases: Vec<String>,
    prompts: SetResult,
    harmless: Option<SetResult>,
    kl: Option<KlResult>,
    /// The completions' perplexity under the reference, per set (with --reference).
    perplexity: Option<BTreeMap<&'static str, refusal::CompletionPerplexity>>,
}

pub fn run(a: RefusalArgs, g: &Global) -> anyhow::Result<()> {
    a.out.check(&[a.model.as_path()])?;
    if a.max_tokens == 0 {
        anyhow::bail!("--max-tokens must be at least 1");
    }
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    // Read everything small first so that bad input fails before the model loads.
    let prompts = TextSet::load(&a.prompts, a.limit)?;
    let harmless = a.harmless.as_ref().map(|s| TextSet::load(s, a.limit)).transpose()?;
    let phrases = match &a.phrases {
        Some(p) => refusal::load_phrases(p)?,
        None => refusal::default_phrases(),
    };
    let loaded = crate::io::load(&a.model, g.progress())?;
    let tok = loaded.tok()?;
    let opts = RefusalOpts {
        max_tokens: a.max_tokens,
        batch: a.batch_size,
        phrases: phrases.clone(),
        case_sensitive: a.case_sensitive,
        chat: !a.no_chat,
    };

    let eval = |set: &TextSet, name: &str| -> anyhow::Result<SetResult> {
        let bar = crate::progress::bar(set.texts.len() as u64, name, g.progress());
        let r = refusal::refusal_eval(&loaded.model, tok, &set.texts, &opts, |i, _| bar.set_position(i as u64))?;
        bar.finish_and_clear();
        Ok(SetResult { set: set.spec.to_string(), sha256: set.sha256.clone(), report: r })
    };
    let main = eval(&prompts, "prompts")?;
    let benign = harmless.as_ref().map(|s| eval(s, "harmless")).transpose()?;

    let mut perplexity = None;
    let kl = match &a.reference {
        None => None,
        Some(path) => {
            let reference = crate::io::load(path, g.progress())?;
            let mut ppl = BTreeMap::new();
            for (name, r) in [("prompts", Some(&main)), ("harmless", benign.as_ref())] {
                let Some(r) = r else { continue };
                let texts: Vec<String> = r.report.completions.iter().map(|c| c.prompt.clone()).collect();
                let conts: Vec<Vec<u32>> = r.report.completions.iter().map(|c| c.tokens.clone()).collect();
                let ids = tok.prompts_ids(&texts, opts.chat)?;
                let p = refusal::completion_perplexity(&reference.model, &ids, &conts, a.batch_size)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
                ppl.insert(name, p);
            }
            perplexity = Some(ppl);
            let (set, name) = match &harmless {
                Some(h) => (h, "harmless"),
                None => (&prompts, "prompts"),
            };
            let ids = tok.prompts_ids(&set.texts, opts.chat)?;
            let r = refusal::first_token_kl(&reference.model, &loaded.model, &ids, a.batch_size)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            Some((name, KlResult { set: set.spec.to_string(), reference: path.display().to_string(), report: r }))
        }
    };

    if let Some(path) = &a.out.report {
        let mut rep = crate::report::Report::new(&format!("mechc eval refusal: {}", a.model.display()));
        let mut sets = vec![("prompts", &main.report)];
        if let Some(b) = &benign {
            sets.push(("harmless", &b.report));
        }
        crate::verify::report::refusal(&mut rep, &sets, kl.as_ref().map(|(_, k)| &k.report))?;
        rep.write(path)?;
    }
    if a.out.json {
        let out =
            Output { model: a.model.display().to_string(), phrases, prompts: main, harmless: benign, kl: kl.map(|(_, k)| k), perplexity };
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    let mut sets = vec![("prompts", &main.report)];
    if let Some(b) = &benign {
        sets.push(("harmless", &b.report));
    }
    print!("{}", refusal::table(&sets, kl.as_ref().map(|(n, k)| (*n, &k.report))));
    for (name, p) in perplexity.iter().flatten() {
        println!("completions' perplexity under the reference ({name}): {:.2} over {} tokens", p.perplexity, p.tokens);
    }
    for (name, r) in &sets {
        for c in r.completions.iter().take(a.show) {
            let mark = if c.refused { "REFUSED" } else { "answered" };
            println!("\n[{name}, {mark}] {}\n  -> {}", crate::report::one_line(&c.prompt, 160), crate::report::one_line(&c.completion, 240));
        }
    }
    Ok(())
}
