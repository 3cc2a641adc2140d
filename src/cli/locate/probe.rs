//! `mechc locate probe`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::data::{SetSpec, TextSet};
use crate::ir::Source;
use crate::locate::direction::{self as dir, Positions};
use crate::locate::probe::{self, ProbeSite, Sets, Validation};

/// Train linear probes (logistic regression) on labelled sets, one per layer (or per attention
/// head with --site head), and score each by held-out accuracy: where is the distinction between
/// the positive and negative examples (e.g. harmful vs harmless instructions) linearly decodable?
///
/// Per example the activation at --site is averaged over --positions (the last token by
/// default). Features are standardised on the train split; the probe minimises the mean log-loss
/// plus --l2/2·‖w‖² (bias unpenalised) by L-BFGS from zero, in f64 (deterministic). Held-out
/// examples: --val-positive/--val-negative, else a seeded split of the train sets
/// (--val-fraction, --seed; each class split on its own).
///
/// --shuffle-labels is the control: the train labels are permuted (with --seed) before fitting;
/// held-out accuracy should then be near chance (0.5 on balanced sets).
///
/// Output: findings (--out) with one score per `L{l}` (or `L{l}.H{h}`) = held-out accuracy,
/// extras: train_accuracy, val_loss, train_loss, iters; summary: the best component (highest
/// held-out accuracy, ties by lower held-out loss, then the earlier one) and its layer.
#[derive(Args, Debug)]
pub struct ProbeArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Positive examples (label 1), FILE[:FIELD] (e.g. harmful_train.json:instruction).
    #[arg(long)]
    pub positive: SetSpec,
    /// Negative examples (label 0), FILE[:FIELD] (e.g. harmless_train.json:instruction).
    #[arg(long)]
    pub negative: SetSpec,
    /// Held-out positive examples (e.g. harmful_val.json:instruction); with --val-negative.
    /// Without them, --val-fraction of the train sets is held out.
    #[arg(long)]
    pub val_positive: Option<SetSpec>,
    /// Held-out negative examples (e.g. harmless_val.json:instruction); with --val-positive.
    #[arg(long)]
    pub val_negative: Option<SetSpec>,
    /// Without held-out sets: the fraction of each train set held out, in (0, 1).
    #[arg(long, default_value_t = 0.3)]
    pub val_fraction: f64,
    /// Seed of the held-out split and of --shuffle-labels.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use the first N examples of each train set (0 = all; harmless_train has 18793).
    #[arg(long, default_value_t = 128)]
    pub limit: usize,
    /// Use the first N examples of each held-out set (0 = all; harmless_val has 6264).
    #[arg(long, default_value_t = 128)]
    pub val_limit: usize,
    /// Wrap prompts in the chat template (user turn + generation prompt).
    #[arg(long)]
    pub chat: bool,
    /// Positions averaged per example: last (the last token), post-instruction (the chat
    /// template's tokens after the instruction; needs --chat) or all.
    #[arg(long, value_enum, default_value_t = Positions::Last)]
    pub positions: Positions,
    /// Features: resid-pre (blocks.L.hook_resid_pre), resid-post (blocks.L.hook_resid_post), or
    /// head (blocks.L.attn.hook_z, one probe per head on its d_head values).
    #[arg(long, value_enum, default_value_t = ProbeSite::ResidPre)]
    pub site: ProbeSite,
    /// Layers to probe, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// L2 penalty on the standardised weights (the loss is the mean log-loss + l2/2·‖w‖²).
    #[arg(long, default_value_t = 1e-2)]
    pub l2: f64,
    /// L-BFGS iteration cap per probe.
    #[arg(long, default_value_t = 500)]
    pub max_iters: u64,
    /// Control: permute the train labels (with --seed) before fitting.
    #[arg(long)]
    pub shuffle_labels: bool,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Write the findings (JSON) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace --out if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: ProbeArgs, g: &Global) -> anyhow::Result<()> {
    super::check_out(a.out.as_deref(), a.force)?;
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if !(a.l2 > 0.0 && a.l2.is_finite()) {
        anyhow::bail!("--l2 must be positive, got {}", a.l2);
    }
    if a.max_iters == 0 {
        anyhow::bail!("--max-iters must be at least 1");
    }
    if a.val_positive.is_some() != a.val_negative.is_some() {
        anyhow::bail!("--val-positive and --val-negative go together");
    }
    let held_out_sets = a.val_positive.is_some();
    if !held_out_sets {
        probe::check_fraction(a.val_fraction)?;
    }
    if a.positions == Positions::PostInstruction && !a.chat {
        anyhow::bail!("--positions post-instruction needs the chat template (--chat)");
    }

    // Small inputs first, so that bad input fails before the model loads.
    let pos = TextSet::load(&a.positive, a.limit)?;
    let neg = TextSet::load(&a.negative, a.limit)?;
    let vpos = a.val_positive.as_ref().map(|s| TextSet::load(s, a.val_limit)).transpose()?;
    let vneg = a.val_negative.as_ref().map(|s| TextSet::load(s, a.val_limit)).transpose()?;
    let data: Vec<Source> = [Some(&pos), Some(&neg), vpos.as_ref(), vneg.as_ref()]
        .into_iter()
        .flatten()
        .map(|s| Source { file: Some(s.spec.path.clone()), sha256: s.sha256.clone() })
        .collect();

    let loaded = crate::io::load(&a.model, g.progress())?;
    let model = &loaded.model;
    let n_layers = model.blocks.len();
    let model_src = Source::model(&a.model)?;
    let tok = loaded.tok()?;
    let mut layers = if a.layers.is_empty() { (0..n_layers).collect() } else { a.layers.clone() };
    layers.sort_unstable();
    layers.dedup();
    if let Some(&l) = layers.iter().find(|&&l| l >= n_layers) {
        anyhow::bail!("--layers: layer {l} is out of range (the model has {n_layers} layers: 0..{})", n_layers - 1);
    }

    let examples = |set: &TextSet| dir::prompt_examples(tok, &set.texts, a.chat, a.positions);
    let val = match (&vpos, &vneg) {
        (Some(p), Some(n)) => Validation::Sets(examples(p)?, examples(n)?),
        _ => Validation::Split { fraction: a.val_fraction, seed: a.seed },
    };
    let sets = Sets { pos: examples(&pos)?, neg: examples(&neg)?, val };
    let opts = probe::Options {
        site: a.site,
        layers: layers.clone(),
        l2: a.l2,
        max_iters: a.max_iters,
        shuffle_labels: a.shuffle_labels,
        seed: a.seed,
        batch: a.batch_size,
    };

    let bar = crate::progress::bar(0, "examples", g.progress());
    let acts = probe::collect(model, &sets, &opts, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let bar = crate::progress::bar(layers.len() as u64, "layers", g.progress());
    let r = probe::fit_all(&acts, &opts, model.cfg.head_dim, |i, _| bar.set_position(i as u64))?;
    bar.finish_and_clear();

    let options = json!({
        "site": a.site,
        "positions": a.positions,
        "layers": layers,
        "chat": a.chat,
        "limit": a.limit,
        "val_limit": a.val_limit,
        "held_out": if held_out_sets { "sets" } else { "split" },
        "val_fraction": if held_out_sets { None } else { Some(a.val_fraction) },
        "seed": a.seed,
        "l2": a.l2,
        "max_iters": a.max_iters,
        "shuffle_labels": a.shuffle_labels,
        "n_positive": sets.pos.len(),
        "n_negative": sets.neg.len(),
    });
    let f = probe::findings(&r, options, model_src, data);
    if !g.quiet {
        eprint!("{}", probe::table(&r));
    }
    super::finish(f, a.out.as_ref(), g, &[])
}
