//! `mechc locate direction`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::data::{SetSpec, TextSet};
use crate::ir::Source;
use crate::locate::direction::{self as dir, DirMethod, Positions, Sets, Site};

/// Find a steering direction from contrastive sets (e.g. harmful vs harmless instructions: the
/// refusal direction of Arditi et al.), at every layer, and score each layer by how well its
/// direction separates held-out examples.
///
/// Per example the activation at --site is averaged over --positions; the direction is the
/// difference of the class means (mean-diff, unnormalised) or the first principal component of
/// the centred paired differences (pca, unit length, sign: most positives project above their
/// paired negative, as repeng). Separation: projection on the unit direction, threshold = the
/// midpoint of the train classes' mean projections; accuracy, class means/stds and Cohen's d,
/// on --val-positive/--val-negative when given, else on the train sets.
///
/// Best layer: highest (held-out) accuracy, ties by Cohen's d, then the lower layer; layers in the
/// last --exclude-last fraction are not candidates (as refusal_direction) unless no other layer
/// was computed.
///
/// Responses mode (--positive-response/--negative-response, e.g. a refusal vs a compliant
/// opening): every prompt is put in the chat template and followed by a prefilled assistant
/// response; activations are taken at the response's tokens (--positions all or last). The two
/// classes share the prompts and differ only in the response: for models that rarely refuse
/// (SmolLM2), this finds the "now refusing" direction that prompt sets cannot. Separation is
/// trivially high there (the texts differ): choose the layer by its steering effect.
///
/// Outputs: findings (--out; components `d{k}`, one per computed layer, score = accuracy, extras:
/// layer, tensor, norm, separation numbers; summary: the best layer) and the vectors (--vectors:
/// safetensors, one f32 [d_model] tensor per layer named by its hook site, e.g.
/// `blocks.12.hook_resid_pre`). Use them as `bake-steering`'s
/// `direction = "dirs.safetensors:blocks.12.hook_resid_pre"` or
/// `mechc eval steer --direction dirs.safetensors:blocks.12.hook_resid_pre`.
/// A resid_pre direction of layer l lives where block l−1's output is: add it with
/// `--layer l−1` (eval steer) / `layer = l−1` (bake-steering add).
#[derive(Args, Debug)]
pub struct DirectionArgs {
    /// HF model directory or .gguf file.
    #[arg(long)]
    pub model: PathBuf,
    /// Positive prompts, FILE[:FIELD] (e.g. harmful_train.json:instruction). In responses mode:
    /// the prompts of both classes (unless --negative is given).
    #[arg(long)]
    pub positive: SetSpec,
    /// Negative prompts, FILE[:FIELD] (e.g. harmless_train.json:instruction). Required unless in
    /// responses mode.
    #[arg(long)]
    pub negative: Option<SetSpec>,
    /// Held-out positive prompts for scoring the layers (e.g. harmful_val.json:instruction).
    #[arg(long)]
    pub val_positive: Option<SetSpec>,
    /// Held-out negative prompts (e.g. harmless_val.json:instruction). Required with
    /// --val-positive unless in responses mode (where it defaults to --val-positive).
    #[arg(long)]
    pub val_negative: Option<SetSpec>,
    /// Use the first N prompts of each train set (0 = all).
    #[arg(long, default_value_t = 128)]
    pub limit: usize,
    /// Use the first N prompts of each held-out set (0 = all).
    #[arg(long, default_value_t = 128)]
    pub val_limit: usize,
    /// Wrap prompts in the chat template (user turn + generation prompt). Implied in responses mode.
    #[arg(long)]
    pub chat: bool,
    /// mean-diff: difference of class means; pca: first principal component of paired differences.
    #[arg(long, value_enum, default_value_t = DirMethod::MeanDiff)]
    pub method: DirMethod,
    /// Layers to compute, comma-separated (default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Hook site per layer: resid-pre (blocks.L.hook_resid_pre, as refusal_direction) or resid-post.
    #[arg(long, value_enum, default_value_t = Site::ResidPre)]
    pub site: Site,
    /// Positions averaged per example: last, post-instruction (the chat template's tokens after the
    /// instruction, as refusal_direction; needs --chat) or all. Default: post-instruction with
    /// --chat, else last; in responses mode: all (the response's tokens).
    #[arg(long, value_enum)]
    pub positions: Option<Positions>,
    /// Responses mode: an assistant response prefilled after every positive prompt (e.g. "I'm
    /// sorry, but I can't help with that."). Repeat for several; prompt i gets response i mod n.
    #[arg(long)]
    pub positive_response: Vec<String>,
    /// Responses mode: the response prefilled after every negative prompt (e.g. "Sure, here is").
    /// Repeatable.
    #[arg(long)]
    pub negative_response: Vec<String>,
    /// Responses mode: positive responses from a file, FILE[:FIELD] (added to --positive-response).
    #[arg(long)]
    pub positive_responses: Option<SetSpec>,
    /// Responses mode: negative responses from a file, FILE[:FIELD] (e.g. the model's own
    /// compliant answers; added to --negative-response).
    #[arg(long)]
    pub negative_responses: Option<SetSpec>,
    /// Fraction of the last layers that are not candidates for the best layer.
    #[arg(long, default_value_t = 0.2)]
    pub exclude_last: f64,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Write the findings (JSON) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the vectors here (safetensors, one tensor per layer named like blocks.L.hook_resid_pre).
    #[arg(long)]
    pub vectors: Option<PathBuf>,
    /// Replace --out / --vectors if they exist.
    #[arg(long)]
    pub force: bool,
}

/// Response texts from the repeated option and an optional file.
fn responses(inline: &[String], file: Option<&SetSpec>) -> anyhow::Result<(Vec<String>, Option<TextSet>)> {
    let mut v = inline.to_vec();
    let set = file.map(|s| TextSet::load(s, 0)).transpose()?;
    if let Some(s) = &set {
        v.extend(s.texts.iter().cloned());
    }
    Ok((v, set))
}

pub fn run(a: DirectionArgs, g: &Global) -> anyhow::Result<()> {
    super::check_out(a.out.as_deref(), a.force)?;
    super::check_out(a.vectors.as_deref(), a.force)?;
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    if !(0.0..1.0).contains(&a.exclude_last) {
        anyhow::bail!("--exclude-last must be in [0, 1), got {}", a.exclude_last);
    }
    let (pos_resp, pos_resp_set) = responses(&a.positive_response, a.positive_responses.as_ref())?;
    let (neg_resp, neg_resp_set) = responses(&a.negative_response, a.negative_responses.as_ref())?;
    let responses_mode = !pos_resp.is_empty() || !neg_resp.is_empty();
    if responses_mode && (pos_resp.is_empty() || neg_resp.is_empty()) {
        anyhow::bail!("responses mode needs both a positive and a negative response (--positive-response and --negative-response, or the files)");
    }
    if !responses_mode && a.negative.is_none() {
        anyhow::bail!("--negative is required (unless in responses mode, with --positive-response/--negative-response)");
    }
    if !responses_mode && a.val_positive.is_some() != a.val_negative.is_some() {
        anyhow::bail!("--val-positive and --val-negative go together");
    }
    if a.val_positive.is_none() && a.val_negative.is_some() {
        anyhow::bail!("--val-negative needs --val-positive");
    }
    let chat = a.chat || responses_mode;
    let positions = a.positions.unwrap_or(if responses_mode {
        Positions::All
    } else if chat {
        Positions::PostInstruction
    } else {
        Positions::Last
    });

    // Small inputs first, so that bad input fails before the model loads.
    let pos = TextSet::load(&a.positive, a.limit)?;
    let neg = a.negative.as_ref().map(|s| TextSet::load(s, a.limit)).transpose()?;
    let vpos = a.val_positive.as_ref().map(|s| TextSet::load(s, a.val_limit)).transpose()?;
    let vneg = a.val_negative.as_ref().map(|s| TextSet::load(s, a.val_limit)).transpose()?;
    let mut data = vec![];
    for s in [Some(&pos), neg.as_ref(), vpos.as_ref(), vneg.as_ref(), pos_resp_set.as_ref(), neg_resp_set.as_ref()].into_iter().flatten() {
        data.push(Source { file: Some(s.spec.path.clone()), sha256: s.sha256.clone() });
    }
    if responses_mode && (!a.positive_response.is_empty() || !a.negative_response.is_empty()) {
        data.push(Source::inline(&serde_json::to_string(&json!([a.positive_response, a.negative_response]))?));
    }

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

    let examples = |set: &TextSet, resp: &[String]| -> crate::Result<Vec<dir::Example>> {
        if responses_mode {
            dir::response_examples(tok, &set.texts, resp, positions)
        } else {
            dir::prompt_examples(tok, &set.texts, chat, positions)
        }
    };
    let neg_prompts = neg.as_ref().unwrap_or(&pos);
    let val = match &vpos {
        Some(vp) => Some((examples(vp, &pos_resp)?, examples(vneg.as_ref().unwrap_or(vp), &neg_resp)?)),
        None => None,
    };
    let sets = Sets { pos: examples(&pos, &pos_resp)?, neg: examples(neg_prompts, &neg_resp)?, val };
    let opts = dir::Options { method: a.method, site: a.site, layers: layers.clone(), exclude_last: a.exclude_last, batch: a.batch_size };

    let bar = crate::progress::bar(0, "examples", g.progress());
    let r = dir::locate(model, &sets, &opts, |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();

    let options = json!({
        "method": a.method,
        "site": a.site,
        "positions": positions,
        "layers": layers,
        "chat": chat,
        "limit": a.limit,
        "val_limit": a.val_limit,
        "exclude_last": a.exclude_last,
        "responses_mode": responses_mode,
        "positive_responses": pos_resp,
        "negative_responses": neg_resp,
        "n_positive": sets.pos.len(),
        "n_negative": sets.neg.len(),
        "n_val_positive": sets.val.as_ref().map(|v| v.0.len()),
        "n_val_negative": sets.val.as_ref().map(|v| v.1.len()),
        "vectors": a.vectors,
    });
    let f = dir::findings(&r, options.clone(), model_src.clone(), data);
    if let Some(p) = &a.vectors {
        let mut meta = BTreeMap::new();
        meta.insert("format".to_string(), "mechc-directions/1".to_string());
        meta.insert("method".to_string(), serde_json::to_value(a.method)?.as_str().unwrap_or_default().to_string());
        meta.insert("site".to_string(), serde_json::to_value(a.site)?.as_str().unwrap_or_default().to_string());
        meta.insert("positions".to_string(), serde_json::to_value(positions)?.as_str().unwrap_or_default().to_string());
        meta.insert("model_sha256".to_string(), model_src.sha256.clone());
        meta.insert("best_tensor".to_string(), r.best().site.clone());
        dir::write_vectors(p, &r, &meta)?;
        if !g.quiet {
            eprintln!("wrote {}", p.display());
        }
    }
    if !g.quiet {
        eprint!("{}", dir::table(&r));
    }
    super::finish(f, a.out.as_ref(), g, &[])
}
