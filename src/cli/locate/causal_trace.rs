//! `mechc locate causal-trace`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::ir::Source;
use crate::locate::causal_trace::{self as ct, Options, Trace, TraceKind};
use crate::model::Model;
use crate::report::{heatmaps_svg, Heatmap};
use crate::tokenizer::Tok;

/// Causal tracing (ROME, Meng et al. 2022): corrupt the subject's token embeddings with Gaussian
/// noise, then restore one clean state at a time and measure how much of p(answer) comes back.
/// Each (token position, layer) is restored for three kinds: the residual stream after the block
/// (`resid`), and the MLP / attention outputs over a window of layers centred on the layer
/// (`mlp`, `attn`). The answer is the model's greedy next token on the clean prompt unless
/// --target names one.
///
/// Input: --prompt with --subject, or --facts (known_1000 format: `prompt`, `subject`,
/// `attribute`, `known_id`), of which only the facts the model gets right are traced (greedy
/// first token = the attribute's first token) unless --include-wrong.
///
/// Findings: `L{l}` (resid), `L{l}.mlp`, `L{l}.attn` with score = the indirect effect
/// p(restored) − p(corrupted) at the last subject token, mean over facts; extra = the same at
/// each token class (first / middle / last subject token, first subsequent, further, last
/// token). The summary holds every fact's full tokens × layers grids of p(restored).
#[derive(Args, Debug)]
pub struct CausalTraceArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// The prompt (with --subject).
    #[arg(long, requires = "subject", conflicts_with = "facts")]
    pub prompt: Option<String>,
    /// The subject: text in --prompt whose tokens are corrupted (its last occurrence).
    #[arg(long, requires = "prompt")]
    pub subject: Option<String>,
    /// Facts file (JSON list of objects with `prompt`, `subject`, `attribute`, `known_id`),
    /// e.g. ../shared/data/prompts/facts/known_1000.json.
    #[arg(long)]
    pub facts: Option<PathBuf>,
    /// Trace only the facts with these `known_id`s (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "facts")]
    pub ids: Vec<u64>,
    /// Trace at most this many facts (after filtering; 0 = all).
    #[arg(long, default_value_t = 0, requires = "facts")]
    pub limit: usize,
    /// Also trace facts whose greedy answer is not the attribute (the answer traced is still the
    /// model's own greedy token).
    #[arg(long, requires = "facts")]
    pub include_wrong: bool,
    /// Wrap the prompts in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// The answer whose probability is traced; its first token counts (mind the leading space:
    /// " Paris"). Default: the model's greedy next token on the clean prompt.
    #[arg(long, conflicts_with = "facts")]
    pub target: Option<String>,
    /// Kinds of state restored (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = TraceKind::ALL.to_vec())]
    pub kinds: Vec<TraceKind>,
    /// Corrupted runs (noise samples), run as one batch.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Standard deviation of the noise added to the subject's embeddings. Default: 3× the
    /// standard deviation of the embedding matrix's entries.
    #[arg(long)]
    pub noise: Option<f64>,
    /// Layers restored together for the mlp and attn kinds (centred on the layer, as ROME).
    #[arg(long, default_value_t = 10)]
    pub window: usize,
    /// Seed of the noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Write the findings (JSON) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Plot (SVG): one fact: tokens × layers heatmaps of p(answer) per kind (subject tokens
    /// marked `*`); several facts: token classes × layers heatmaps of the mean indirect effect.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Replace --out / --plot if they exist.
    #[arg(long)]
    pub force: bool,
}

/// One prompt to trace.
struct Fact {
    label: String,
    ids: Vec<u32>,
    subject: std::ops::Range<usize>,
}

pub fn run(a: CausalTraceArgs, g: &Global) -> anyhow::Result<()> {
    super::check_out(a.out.as_deref(), a.force)?;
    super::check_out(a.plot.as_deref(), a.force)?;
    if a.prompt.is_none() && a.facts.is_none() {
        anyhow::bail!("give --prompt with --subject, or --facts");
    }
    if let Some(f) = a.facts.as_deref().filter(|f| !f.is_file()) {
        return Err(crate::Error::bad_file(f, "no such file").into());
    }
    let loaded = crate::io::load(&a.model, g.progress())?;
    let (model, tok) = (&loaded.model, loaded.tok()?);
    let noise = match a.noise {
        Some(n) => n,
        None => ct::default_noise(model)?,
    };
    let opt = Options { samples: a.samples, noise, window: a.window, seed: a.seed, kinds: a.kinds.clone() };
    let (facts, target, data, skipped) = match (&a.prompt, &a.subject, &a.facts) {
        (Some(p), Some(s), _) => {
            let ids = tok.prompt_ids(p, a.chat)?;
            let subject = ct::subject_range(tok, &ids, s)?;
            let target = match &a.target {
                Some(t) => Some(super::first_token(tok, "--target", t)?),
                None => None,
            };
            (vec![Fact { label: p.clone(), ids, subject }], target, vec![Source::inline(p)], json!({}))
        }
        (_, _, Some(path)) => {
            let (facts, skipped) = select_facts(model, tok, path, &a, g)?;
            (facts, None, vec![Source::file(path)?], skipped)
        }
        _ => anyhow::bail!("--prompt needs --subject"),
    };
    if facts.is_empty() {
        anyhow::bail!("no facts to trace (skipped: {skipped})");
    }
    let traces = trace_all(model, &facts, target, &opt, g)?;
    let decode = |id: u32| tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
    let options = json!({
        "samples": a.samples, "noise": noise, "noise_default": a.noise.is_none(), "window": a.window,
        "seed": a.seed, "kinds": a.kinds.iter().map(|k| k.name()).collect::<Vec<_>>(), "chat": a.chat,
        "prompt": a.prompt, "subject": a.subject, "target": a.target, "ids": a.ids, "limit": a.limit,
        "include_wrong": a.include_wrong, "skipped": skipped,
    });
    let mut f = ct::findings(&traces, decode, options, Source::model(&a.model)?, data);
    if let Some(serde_json::Value::Array(list)) = f.summary.get_mut("facts") {
        for (entry, fact) in list.iter_mut().zip(&facts) {
            if let Some(o) = entry.as_object_mut() {
                o.insert("fact".into(), fact.label.clone().into());
            }
        }
    }
    if let Some(p) = &a.plot {
        let svg = if traces.len() == 1 { fact_plot(&traces[0], tok, a.window)? } else { aggregate_plot(&traces, a.window)? };
        crate::io::atomic::write_file(p, svg.as_bytes())?;
    }
    // The per-fact grids are in the file; the terminal gets the scores.
    super::finish(f, a.out.as_ref(), g, &["facts"])
}

/// The facts of --facts to trace: those asked for by --ids, that the model gets right (unless
/// --include-wrong), up to --limit. Returns them and the counts of facts passed over, by reason.
fn select_facts(
    model: &Model,
    tok: &Tok,
    path: &std::path::Path,
    a: &CausalTraceArgs,
    g: &Global,
) -> anyhow::Result<(Vec<Fact>, serde_json::Value)> {
    let set = crate::data::RecordSet::load(path, 0)?;
    let (mut wrong, mut no_subject) = (0usize, 0usize);
    let mut facts = vec![];
    let bar = crate::progress::bar(set.records.len() as u64, "facts", g.progress());
    for i in 0..set.records.len() {
        bar.set_position(i as u64);
        if a.limit > 0 && facts.len() == a.limit {
            break;
        }
        let id = set.records[i].get("known_id").and_then(|v| v.as_u64());
        if !a.ids.is_empty() && !id.is_some_and(|id| a.ids.contains(&id)) {
            continue;
        }
        let (prompt, subject) = (set.str_field(i, "prompt")?, set.str_field(i, "subject")?);
        let ids = tok.prompt_ids(prompt, a.chat)?;
        let Ok(range) = ct::subject_range(tok, &ids, subject) else {
            no_subject += 1;
            continue;
        };
        if !a.include_wrong {
            let answer = super::first_token(tok, "attribute", &format!(" {}", set.str_field(i, "attribute")?))?;
            if ct::greedy(model, &ids)? != answer {
                wrong += 1;
                continue;
            }
        }
        let label = id.map_or(format!("record {i}"), |id| format!("known_id {id}"));
        facts.push(Fact { label, ids, subject: range });
    }
    bar.finish_and_clear();
    if !a.ids.is_empty() && facts.is_empty() && wrong + no_subject == 0 {
        anyhow::bail!("{}: no fact has a known_id in --ids {:?}", path.display(), a.ids);
    }
    Ok((facts, json!({"wrong_answer": wrong, "subject_not_in_prompt": no_subject})))
}

fn trace_all(model: &Model, facts: &[Fact], target: Option<u32>, opt: &Options, g: &Global) -> anyhow::Result<Vec<Trace>> {
    let several = facts.len() > 1;
    let start = std::time::Instant::now();
    let bar = crate::progress::bar(facts.len() as u64, if several { "facts" } else { "positions" }, g.progress());
    let mut traces = vec![];
    for (n, f) in facts.iter().enumerate() {
        bar.set_message(f.label.clone());
        let t = ct::causal_trace(model, &f.ids, f.subject.clone(), target, opt, |i, total| {
            if !several {
                bar.set_length(total as u64);
                bar.set_position(i as u64);
            }
        })
        .map_err(|e| anyhow::anyhow!("{}: {e}", f.label))?;
        if several {
            bar.set_position(n as u64 + 1);
        }
        traces.push(t);
    }
    bar.finish_and_clear();
    if !g.quiet {
        let secs = start.elapsed().as_secs_f64();
        eprintln!("traced {} fact(s) in {secs:.1} s ({:.1} s per fact)", traces.len(), secs / traces.len() as f64);
    }
    Ok(traces)
}

/// ROME's colours: purple for the residual stream, green for MLPs, red for attention.
fn color(kind: TraceKind) -> plotters::style::RGBColor {
    match kind {
        TraceKind::Resid => plotters::style::RGBColor(84, 39, 143),
        TraceKind::Mlp => plotters::style::RGBColor(0, 109, 44),
        TraceKind::Attn => plotters::style::RGBColor(165, 15, 21),
    }
}

fn panel_title(kind: TraceKind, window: usize) -> String {
    match kind {
        TraceKind::Resid => "single restored layer".into(),
        TraceKind::Mlp => format!("restored MLP, window {window}"),
        TraceKind::Attn => format!("restored attention, window {window}"),
    }
}

/// One fact: p(answer) per kind, tokens × layers, subject tokens marked `*`.
fn fact_plot(t: &Trace, tok: &Tok, window: usize) -> anyhow::Result<String> {
    let rows: Vec<String> = t
        .ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            let s = tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
            if t.subject.contains(&i) { format!("{s}*") } else { s }
        })
        .collect();
    let panels: Vec<Heatmap> = t
        .grids
        .iter()
        .map(|(k, g)| Heatmap { title: panel_title(*k, window), rows: rows.clone(), values: g.clone(), color: color(*k), x_label: "layer".into() })
        .collect();
    let answer = tok.decode(&[t.target], false).unwrap_or_default();
    let title = format!("p({answer:?}): clean {:.3}, corrupted {:.3}", t.p_clean, t.p_corrupt);
    Ok(heatmaps_svg(&panels, &title)?)
}

/// Several facts: the mean indirect effect per token class × layer, per kind.
fn aggregate_plot(traces: &[Trace], window: usize) -> anyhow::Result<String> {
    let kinds: Vec<TraceKind> = traces[0].grids.iter().map(|(k, _)| *k).collect();
    let rows: Vec<String> = ct::CLASSES.iter().map(|c| c.to_string()).collect();
    let panels: Vec<Heatmap> = kinds
        .iter()
        .map(|&k| Heatmap {
            title: format!("AIE, {}", panel_title(k, window)),
            rows: rows.clone(),
            values: ct::class_effects(traces, k).0,
            color: color(k),
            x_label: "layer".into(),
        })
        .collect();
    let title = format!("Average indirect effect over {} facts", traces.len());
    Ok(heatmaps_svg(&panels, &title)?)
}
