//! Steering directions from contrastive example sets (positive vs negative), per layer, scored by
//! how well they separate held-out examples.
//!
//! Per example, the activation at the hook site (`blocks.{l}.hook_resid_pre`, as
//! andyrdt/refusal_direction, or `hook_resid_post`) is averaged over the chosen positions:
//!
//! - `last`: the last token;
//! - `post-instruction`: the chat template's tokens after the instruction (Qwen/SmolLM2:
//!   `<|im_end|>\n<|im_start|>assistant\n`), as refusal_direction's `eoi_toks`;
//! - `all`: every token.
//!
//! In *responses* mode ([`response_examples`]) each example is a prompt followed by a prefilled
//! assistant response (e.g. a refusal vs a compliant opening) and the positions are the response's
//! tokens (`last` or `all`); the positive and negative examples then differ only in the response.
//!
//! Methods, per layer:
//! - `mean-diff`: mean(positive) − mean(negative), unnormalised (Arditi et al.; its norm is the
//!   natural unit for additive steering: coefficient 1 moves the mean negative activation onto
//!   the mean positive one);
//! - `pca`: repeng's `pca_diff` (`extract.py`): the paired differences positive_i − negative_i
//!   (pairs in file order, as many as the smaller set), centred, their first principal component
//!   (unit length), with the sign chosen so that most positive examples project above their
//!   paired negative.
//!
//! Separation: with v̂ the unit direction, the threshold is the midpoint of the train classes'
//! mean projections; accuracy is the share of examples on the right side (positives above). With
//! held-out sets it is measured on them, otherwise on the train sets. Also the classes' mean and
//! standard deviation of the projection and Cohen's d (pooled standard deviation).
//!
//! Best layer: the highest accuracy (held-out if given), ties broken by the larger Cohen's d,
//! then the lower layer; layers in the last `exclude_last` fraction of the model (default 0.2,
//! as refusal_direction: `l ≥ floor(L·0.8)`) are not candidates unless no other layer was scored.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, IndexOp, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::{Component, Findings, Source};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::{Batch, HookPoint, Hooks};
use crate::data::{SetSpec, TextSet};
use crate::tokenizer::Tok;

pub const METHOD: &str = "direction";

/// How the direction is computed from the two classes' activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum DirMethod {
    /// Difference of the class means (unnormalised).
    MeanDiff,
    /// First principal component of the centred paired differences (unit length, sign by majority).
    Pca,
}

/// The residual-stream site of each layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Site {
    /// `blocks.{l}.hook_resid_pre`: the residual stream entering block l.
    ResidPre,
    /// `blocks.{l}.hook_resid_post`: the residual stream leaving block l.
    ResidPost,
}

impl Site {
    pub fn point(self, layer: usize) -> HookPoint {
        match self {
            Site::ResidPre => HookPoint::ResidPre(layer),
            Site::ResidPost => HookPoint::ResidPost(layer),
        }
    }
}

/// Which token positions of an example are averaged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Positions {
    /// The last token (of the prompt; in responses mode, of the response).
    Last,
    /// The chat template's tokens after the instruction (needs the chat template; prompts only).
    PostInstruction,
    /// Every token (in responses mode: every response token).
    All,
}

/// One example: its token ids and the positions whose activations are averaged.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub ids: Vec<u32>,
    pub positions: Vec<usize>,
}

/// The name of layer `l`'s vector in the vectors file: the hook site's name, e.g.
/// `blocks.12.hook_resid_pre`.
pub fn tensor_name(site: Site, layer: usize) -> String {
    site.point(layer).to_string()
}

/// Examples from prompts: the prompt's ids (chat template with generation prompt when `chat`)
/// and the positions to average.
pub fn prompt_examples(tok: &Tok, texts: &[String], chat: bool, positions: Positions) -> Result<Vec<Example>> {
    if positions == Positions::PostInstruction && !chat {
        return Err(Error::invalid("--positions post-instruction needs the chat template (--chat)"));
    }
    let ids = tok.prompts_ids(texts, chat)?;
    ids.into_iter()
        .zip(texts)
        .enumerate()
        .map(|(i, (ids, text))| {
            let n = ids.len();
            let positions = match positions {
                Positions::Last => vec![n - 1],
                Positions::All => (0..n).collect(),
                Positions::PostInstruction => {
                    let k = post_instruction_len(tok, text, &ids).map_err(|e| Error::invalid(format!("prompt {i}: {e}")))?;
                    (n - k..n).collect()
                }
            };
            Ok(Example { ids, positions })
        })
        .collect()
}

/// How many tokens the chat template puts after the instruction: the rendered text after the
/// instruction's last occurrence, tokenized on its own (as refusal_direction's `eoi_toks`), which
/// must be exactly the end of the prompt's ids.
pub(crate) fn post_instruction_len(tok: &Tok, text: &str, ids: &[u32]) -> Result<usize> {
    let rendered = tok.apply_chat(text)?;
    let needle = text.trim();
    let at = if needle.is_empty() { None } else { rendered.rfind(needle) };
    let Some(at) = at else {
        return Err(Error::invalid("the chat template does not contain the instruction's text; use --positions last or all"));
    };
    let suffix = &rendered[at + needle.len()..];
    let sids = tok.encode(suffix, false)?;
    if sids.is_empty() {
        return Err(Error::invalid("the chat template puts no tokens after the instruction; use --positions last"));
    }
    if sids.len() >= ids.len() || !ids.ends_with(&sids) {
        return Err(Error::invalid(
            "the chat template's tokens after the instruction do not tokenize on their own as in the prompt; use --positions last or all",
        ));
    }
    Ok(sids.len())
}

/// Examples for responses mode: each prompt in the chat template (user turn + generation
/// prompt), followed by an assistant response prefilled as text (`responses[i % responses.len()]`
/// for prompt i, tokenized on its own, no end-of-turn token); the positions are the response's
/// tokens (`last` or `all`).
pub fn response_examples(tok: &Tok, prompts: &[String], responses: &[String], positions: Positions) -> Result<Vec<Example>> {
    if responses.is_empty() {
        return Err(Error::invalid("responses mode needs at least one response text"));
    }
    if positions == Positions::PostInstruction {
        return Err(Error::invalid(
            "--positions post-instruction does not apply in responses mode (use last or all: the response's tokens)",
        ));
    }
    let resp: Vec<Vec<u32>> = responses
        .iter()
        .map(|r| {
            let ids = tok.encode(r, false)?;
            if ids.is_empty() {
                return Err(Error::invalid(format!("response {r:?} encodes to no tokens")));
            }
            Ok(ids)
        })
        .collect::<Result<_>>()?;
    let prefixes = tok.prompts_ids(prompts, true)?;
    Ok(prefixes
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let r = &resp[i % resp.len()];
            let start = p.len();
            let ids = [p, r.clone()].concat();
            let positions = match positions {
                Positions::Last => vec![ids.len() - 1],
                _ => (start..ids.len()).collect(),
            };
            Example { ids, positions }
        })
        .collect())
}

/// Per layer of `layers` (in that order) and per example, the activation at `site` averaged over
/// the example's positions: `out[k][i]` has d_model values. Right-padded batches of similar
/// lengths; `progress(done, total)` counts examples.
pub fn activations(
    model: &Model,
    examples: &[Example],
    site: Site,
    layers: &[usize],
    batch: usize,
    progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<Vec<f32>>>> {
    let points: Vec<HookPoint> = layers.iter().map(|&l| site.point(l)).collect();
    point_activations(model, examples, &points, batch, progress)
}

/// Per hook point of `points` (in that order) and per example, the activation at the point
/// averaged over the example's positions and flattened (`attn.hook_z`: head-major, n_heads·d_head
/// values). Right-padded batches of similar lengths; `progress(done, total)` counts examples.
pub fn point_activations(
    model: &Model,
    examples: &[Example],
    points: &[HookPoint],
    batch: usize,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<Vec<f32>>>> {
    let n_layers = model.blocks.len();
    if let Some(l) = points.iter().filter_map(|p| p.layer()).find(|&l| l >= n_layers) {
        return Err(Error::invalid(format!("layer {l} is out of range: the model has {n_layers} layers (0..{})", n_layers.saturating_sub(1))));
    }
    for (i, e) in examples.iter().enumerate() {
        if e.ids.is_empty() || e.positions.is_empty() || e.positions.iter().any(|&p| p >= e.ids.len()) {
            return Err(Error::invalid(format!("example {i}: no tokens, or positions outside its {} tokens", e.ids.len())));
        }
    }
    let mut out = vec![vec![vec![]; examples.len()]; points.len()];
    let lens: Vec<usize> = examples.iter().map(|e| e.ids.len()).collect();
    let mut done = 0;
    progress(0, examples.len());
    for chunk in crate::runtime::batch::length_batches(&lens, batch) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| examples[i].ids.clone()).collect();
        let mut hooks = Hooks::new();
        for &p in points {
            hooks.capture(p);
        }
        model.forward(&Batch::right_padded(&seqs, 0), None, &mut hooks, Fwd { last_only: true, ..Fwd::default() })?;
        for (k, p) in points.iter().enumerate() {
            let a = hooks.captured.get(p).ok_or_else(|| Error::invalid(format!("{p} was not captured")))?;
            for (r, &i) in chunk.iter().enumerate() {
                let pos: Vec<u32> = examples[i].positions.iter().map(|&p| p as u32).collect();
                let idx = Tensor::from_vec(pos, examples[i].positions.len(), &Device::Cpu)?;
                let rows = a.i(r)?.index_select(&idx, 0)?.flatten_from(1)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
                let mut mean = vec![0f64; rows[0].len()];
                for row in &rows {
                    mean.iter_mut().zip(row).for_each(|(m, &x)| *m += x as f64);
                }
                out[k][i] = mean.iter().map(|m| (m / rows.len() as f64) as f32).collect();
            }
        }
        done += chunk.len();
        progress(done, examples.len());
    }
    Ok(out)
}

fn class_mean(xs: &[Vec<f32>]) -> Vec<f64> {
    let mut m = vec![0f64; xs[0].len()];
    for x in xs {
        m.iter_mut().zip(x).for_each(|(a, &b)| *a += b as f64);
    }
    m.iter_mut().for_each(|a| *a /= xs.len() as f64);
    m
}

fn dot(a: &[f64], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(&x, &y)| x * y as f64).sum()
}

fn norm(a: &[f64]) -> f64 {
    a.iter().map(|x| x * x).sum::<f64>().sqrt()
}

/// The direction from the two classes' per-example activations (see the module doc).
pub fn direction(method: DirMethod, pos: &[Vec<f32>], neg: &[Vec<f32>]) -> Result<Vec<f32>> {
    if pos.is_empty() || neg.is_empty() {
        return Err(Error::invalid("direction: both example sets must be non-empty"));
    }
    let d = pos[0].len();
    if d == 0 || pos.iter().chain(neg).any(|x| x.len() != d) {
        return Err(Error::invalid("direction: activations of different sizes"));
    }
    let v: Vec<f64> = match method {
        DirMethod::MeanDiff => {
            let (p, n) = (class_mean(pos), class_mean(neg));
            p.iter().zip(&n).map(|(a, b)| a - b).collect()
        }
        DirMethod::Pca => {
            let pairs = pos.len().min(neg.len());
            if pairs < 2 {
                return Err(Error::invalid("direction: pca needs at least 2 positive/negative pairs"));
            }
            let diffs: Vec<Vec<f64>> =
                (0..pairs).map(|i| pos[i].iter().zip(&neg[i]).map(|(&a, &b)| a as f64 - b as f64).collect()).collect();
            let mut mean = vec![0f64; d];
            for x in &diffs {
                mean.iter_mut().zip(x).for_each(|(m, v)| *m += v);
            }
            mean.iter_mut().for_each(|m| *m /= pairs as f64);
            let x: Vec<Vec<f64>> = diffs.iter().map(|r| r.iter().zip(&mean).map(|(a, m)| a - m).collect()).collect();
            let mut v = first_component(&x, d)?;
            // repeng: flip when most positives project below their paired negative.
            let below = (0..pairs).filter(|&i| dot(&v, &pos[i]) < dot(&v, &neg[i])).count();
            if below as f64 / pairs as f64 > 0.5 {
                v.iter_mut().for_each(|a| *a = -*a);
            }
            v
        }
    };
    let n = norm(&v);
    if !(n > 0.0 && n.is_finite()) {
        return Err(Error::invalid("direction: the classes' activations do not differ (zero direction)"));
    }
    Ok(v.iter().map(|&a| a as f32).collect())
}

/// The unit first principal component of the rows of `x` (already centred), by power iteration
/// on xᵀx from a fixed pseudo-random start (deterministic).
fn first_component(x: &[Vec<f64>], d: usize) -> Result<Vec<f64>> {
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut v: Vec<f64> = (0..d)
        .map(|_| {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 11) as f64 / (1u64 << 53) as f64) - 0.5
        })
        .collect();
    let mut n = norm(&v);
    v.iter_mut().for_each(|a| *a /= n);
    for _ in 0..5000 {
        let xv: Vec<f64> = x.iter().map(|r| r.iter().zip(&v).map(|(a, b)| a * b).sum()).collect();
        let mut w = vec![0f64; d];
        for (r, &s) in x.iter().zip(&xv) {
            w.iter_mut().zip(r).for_each(|(a, b)| *a += s * b);
        }
        n = norm(&w);
        if !(n > 0.0 && n.is_finite()) {
            return Err(Error::invalid("direction: the paired differences have no variance (pca undefined)"));
        }
        w.iter_mut().for_each(|a| *a /= n);
        let change = w.iter().zip(&v).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        v = w;
        if change < 1e-12 {
            break;
        }
    }
    Ok(v)
}

/// How well a direction separates two classes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Separation {
    /// Share of examples on their class's side of the threshold (positives above).
    pub accuracy: f64,
    /// The midpoint of the train classes' mean projections on v̂.
    pub threshold: f64,
    pub mean_pos: f64,
    pub mean_neg: f64,
    pub std_pos: f64,
    pub std_neg: f64,
    /// (mean_pos − mean_neg) / pooled standard deviation; NaN (null in JSON) when both classes
    /// project to constants.
    pub cohens_d: f64,
    pub n_pos: usize,
    pub n_neg: usize,
}

fn mean_std(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    let var = if xs.len() > 1 { xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (xs.len() - 1) as f64 } else { 0.0 };
    (m, var.sqrt())
}

/// Separation of `pos` / `neg` by projection on the unit direction of `v`, with the threshold
/// from the train classes' mean projections.
pub fn separation(v: &[f32], train: (&[Vec<f32>], &[Vec<f32>]), eval: (&[Vec<f32>], &[Vec<f32>])) -> Separation {
    let n = v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    let u: Vec<f64> = v.iter().map(|&a| a as f64 / n).collect();
    let proj = |xs: &[Vec<f32>]| xs.iter().map(|x| dot(&u, x)).collect::<Vec<f64>>();
    let (tp, tn) = (proj(train.0), proj(train.1));
    let threshold = (mean_std(&tp).0 + mean_std(&tn).0) / 2.0;
    let (ep, en) = (proj(eval.0), proj(eval.1));
    let right = ep.iter().filter(|&&p| p > threshold).count() + en.iter().filter(|&&p| p <= threshold).count();
    let ((mp, sp), (mn, sn)) = (mean_std(&ep), mean_std(&en));
    let (np, nn) = (ep.len() as f64, en.len() as f64);
    let pooled = if np + nn > 2.0 { (((np - 1.0) * sp * sp + (nn - 1.0) * sn * sn) / (np + nn - 2.0)).sqrt() } else { 0.0 };
    Separation {
        accuracy: right as f64 / (np + nn),
        threshold,
        mean_pos: mp,
        mean_neg: mn,
        std_pos: sp,
        std_neg: sn,
        cohens_d: if pooled > 0.0 { (mp - mn) / pooled } else { f64::NAN },
        n_pos: ep.len(),
        n_neg: en.len(),
    }
}

/// Options of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub method: DirMethod,
    pub site: Site,
    /// Layers to compute (sorted, distinct).
    pub layers: Vec<usize>,
    /// Fraction of the last layers that are not candidates for the best layer.
    pub exclude_last: f64,
    /// Sequences per forward pass.
    pub batch: usize,
}

/// The example sets of a run (held-out sets optional, both or neither).
pub struct Sets {
    pub pos: Vec<Example>,
    pub neg: Vec<Example>,
    pub val: Option<(Vec<Example>, Vec<Example>)>,
}

/// One layer's direction and its scores.
#[derive(Debug, Clone, Serialize)]
pub struct LayerDirection {
    pub layer: usize,
    /// The hook site's name (also the tensor's name in the vectors file).
    pub site: String,
    #[serde(skip)]
    pub vector: Vec<f32>,
    /// ‖v‖.
    pub norm: f64,
    /// Separation of the train sets.
    pub train: Separation,
    /// Separation of the held-out sets, when given.
    pub val: Option<Separation>,
}

impl LayerDirection {
    /// The separation the layer is ranked by: held-out if given, else train.
    pub fn ranked(&self) -> &Separation {
        self.val.as_ref().unwrap_or(&self.train)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct DirectionResult {
    pub layers: Vec<LayerDirection>,
    /// Index into `layers` of the best layer.
    pub best: usize,
    pub n_layers: usize,
    /// Layers left out because every example had the same activation there (no direction).
    pub degenerate: Vec<usize>,
}

impl DirectionResult {
    pub fn best(&self) -> &LayerDirection {
        &self.layers[self.best]
    }
    pub fn get(&self, layer: usize) -> Option<&LayerDirection> {
        self.layers.iter().find(|l| l.layer == layer)
    }
}

/// The best layer's index into `ls` by the rule in the module doc.
pub fn best_layer(ls: &[LayerDirection], n_layers: usize, exclude_last: f64) -> usize {
    let cut = ((n_layers as f64) * (1.0 - exclude_last)).floor() as usize;
    let any_below = ls.iter().any(|l| l.layer < cut);
    let key = |l: &LayerDirection| {
        let s = l.ranked();
        (s.accuracy, if s.cohens_d.is_nan() { f64::NEG_INFINITY } else { s.cohens_d })
    };
    let mut best: Option<usize> = None;
    for (i, l) in ls.iter().enumerate() {
        if any_below && l.layer >= cut {
            continue;
        }
        match best {
            None => best = Some(i),
            Some(b) => {
                let (ka, kb) = (key(l), key(&ls[b]));
                if ka.0 > kb.0 || (ka.0 == kb.0 && ka.1 > kb.1) {
                    best = Some(i);
                }
            }
        }
    }
    best.unwrap_or(0)
}

/// Compute the directions and their scores. `progress(done, total)` counts examples through the
/// model over all sets.
pub fn locate(model: &Model, sets: &Sets, o: &Options, mut progress: impl FnMut(usize, usize)) -> Result<DirectionResult> {
    let n_layers = model.blocks.len();
    if o.layers.is_empty() {
        return Err(Error::invalid("direction: no layers to compute"));
    }
    if !(0.0..1.0).contains(&o.exclude_last) {
        return Err(Error::invalid(format!("--exclude-last must be in [0, 1), got {}", o.exclude_last)));
    }
    if o.batch == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    if sets.pos.is_empty() || sets.neg.is_empty() {
        return Err(Error::invalid("direction: the positive and negative sets must be non-empty"));
    }
    if let Some((p, n)) = &sets.val {
        if p.is_empty() || n.is_empty() {
            return Err(Error::invalid("direction: the held-out positive and negative sets must be non-empty"));
        }
    }
    let total = sets.pos.len() + sets.neg.len() + sets.val.as_ref().map_or(0, |(p, n)| p.len() + n.len());
    let mut offset = 0;
    let mut run = |ex: &[Example]| -> Result<Vec<Vec<Vec<f32>>>> {
        let base = offset;
        let r = activations(model, ex, o.site, &o.layers, o.batch, |i, _| progress(base + i, total))?;
        offset += ex.len();
        Ok(r)
    };
    let (ap, an) = (run(&sets.pos)?, run(&sets.neg)?);
    let val = match &sets.val {
        Some((p, n)) => Some((run(p)?, run(n)?)),
        None => None,
    };
    let mut layers = vec![];
    let mut degenerate = vec![];
    for (k, &l) in o.layers.iter().enumerate() {
        // Both classes can have identical activations at a layer (resid_pre of layer 0 at the
        // template's post-instruction tokens is the same embeddings): no direction there.
        if ap[k].iter().chain(&an[k]).all(|x| x == &ap[k][0]) {
            degenerate.push(l);
            continue;
        }
        let v = direction(o.method, &ap[k], &an[k]).map_err(|e| Error::invalid(format!("layer {l}: {e}")))?;
        let train = separation(&v, (&ap[k], &an[k]), (&ap[k], &an[k]));
        let val = val.as_ref().map(|(vp, vn)| separation(&v, (&ap[k], &an[k]), (&vp[k], &vn[k])));
        layers.push(LayerDirection {
            layer: l,
            site: tensor_name(o.site, l),
            norm: v.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt(),
            vector: v,
            train,
            val,
        });
    }
    if layers.is_empty() {
        return Err(Error::invalid(format!(
            "direction: the positive and negative examples have identical activations at every layer computed ({degenerate:?})"
        )));
    }
    let best = best_layer(&layers, n_layers, o.exclude_last);
    Ok(DirectionResult { layers, best, n_layers, degenerate })
}

/// Findings: one direction component `d{k}` per computed layer (in layer order), score = the
/// ranked accuracy (held-out if given), extras: layer, site/tensor name, norm, the separation
/// numbers; summary: the best layer and its tensor.
pub fn findings(r: &DirectionResult, options: serde_json::Value, model: Source, data: Vec<Source>) -> Findings {
    let held_out = r.layers.iter().any(|l| l.val.is_some());
    let meaning = format!(
        "accuracy of classifying {} positive/negative examples by projection on the layer's direction (threshold: midpoint of the train class means); higher = better separated",
        if held_out { "held-out" } else { "the train" }
    );
    let mut f = Findings::new(METHOD, &meaning, options, model, data);
    for (k, l) in r.layers.iter().enumerate() {
        let s = l.ranked();
        let score = f.push(Component::Direction(k), s.accuracy);
        let mut extra: BTreeMap<String, serde_json::Value> = BTreeMap::new();
        extra.insert("layer".into(), l.layer.into());
        extra.insert("tensor".into(), l.site.clone().into());
        extra.insert("norm".into(), serde_json::json!(l.norm));
        extra.insert("cohens_d".into(), serde_json::json!(s.cohens_d));
        extra.insert("mean_pos".into(), serde_json::json!(s.mean_pos));
        extra.insert("mean_neg".into(), serde_json::json!(s.mean_neg));
        extra.insert("std_pos".into(), serde_json::json!(s.std_pos));
        extra.insert("std_neg".into(), serde_json::json!(s.std_neg));
        extra.insert("threshold".into(), serde_json::json!(s.threshold));
        if held_out {
            extra.insert("train_accuracy".into(), serde_json::json!(l.train.accuracy));
        }
        score.extra = extra;
    }
    let b = r.best();
    f.summary.insert("best_layer".into(), b.layer.into());
    f.summary.insert("best_component".into(), Component::Direction(r.best).to_string().into());
    f.summary.insert("best_tensor".into(), b.site.clone().into());
    f.summary.insert("best_accuracy".into(), serde_json::json!(b.ranked().accuracy));
    if !r.degenerate.is_empty() {
        f.summary.insert("no_direction_layers".into(), serde_json::json!(r.degenerate));
    }
    f
}

/// Write every layer's vector (f32 [d_model], named by [`tensor_name`]) to a safetensors file,
/// byte-deterministic, whole or not at all. `metadata` goes to `__metadata__`.
/// Steering vectors, one per layer, named by hook site (`blocks.12.hook_resid_pre`), with the
/// metadata of the safetensors file they are written to.
pub struct Vectors {
    pub tensors: Vec<(String, Vec<f32>)>,
    pub metadata: BTreeMap<String, String>,
}

impl Vectors {
    pub fn of(r: &DirectionResult, metadata: BTreeMap<String, String>) -> Vectors {
        Vectors { tensors: r.layers.iter().map(|l| (l.site.clone(), l.vector.clone())).collect(), metadata }
    }

    /// Write them as safetensors (to a temporary sibling, renamed into place).
    pub fn write(&self, path: &Path) -> Result<()> {
        let tensors = self
            .tensors
            .iter()
            .map(|(name, v)| Ok((name.clone(), Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?)))
            .collect::<Result<Vec<_>>>()?;
        let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
        let res = crate::io::st::write(&tmp, &tensors, &self.metadata).and_then(|_| std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e)));
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }
}

/// A table of the layers: accuracy (held-out and train), Cohen's d, mean projections, ‖v‖; the
/// best layer marked.
pub fn table(r: &DirectionResult) -> String {
    let held_out = r.layers.iter().any(|l| l.val.is_some());
    let mut s = format!(
        "{:>5} {:>9} {:>9} {:>9} {:>10} {:>10} {:>9}\n",
        "layer",
        if held_out { "val acc" } else { "acc" },
        "train acc",
        "d",
        "mean pos",
        "mean neg",
        "|v|"
    );
    if !r.degenerate.is_empty() {
        s += &format!("no direction (identical activations) at layers {:?}\n", r.degenerate);
    }
    for (k, l) in r.layers.iter().enumerate() {
        let x = l.ranked();
        s += &format!(
            "{:>5} {:>9.4} {:>9.4} {:>9.3} {:>10.3} {:>10.3} {:>9.3}{}\n",
            l.layer,
            x.accuracy,
            l.train.accuracy,
            x.cohens_d,
            x.mean_pos,
            x.mean_neg,
            l.norm,
            if k == r.best { "  <- best" } else { "" }
        );
    }
    s
}

/// A steering direction per layer from contrastive sets (e.g. the refusal direction).
///
/// From positive and negative sets (e.g. harmful vs harmless instructions: the refusal direction
/// of Arditi et al.), at every layer, each layer scored by how well its direction separates
/// held-out examples.
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
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Spec {
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
}

/// A [`Spec`]'s sets, loaded.
struct Loaded {
    responses_mode: bool,
    chat: bool,
    positions: Positions,
    pos: TextSet,
    neg: Option<TextSet>,
    vpos: Option<TextSet>,
    vneg: Option<TextSet>,
    pos_resp: Vec<String>,
    neg_resp: Vec<String>,
    data: Vec<Source>,
}

/// Response texts from the repeated option and an optional file.
fn responses(inline: &[String], file: Option<&SetSpec>) -> Result<(Vec<String>, Option<TextSet>)> {
    let mut v = inline.to_vec();
    let set = file.map(|s| TextSet::load(s, 0)).transpose()?;
    if let Some(s) = &set {
        v.extend(s.texts.iter().cloned());
    }
    Ok((v, set))
}

impl Spec {
    /// Check the options and load the (small) sets.
    fn load(&self) -> Result<Loaded> {
        let bad = |m: &str| Err(Error::invalid(m));
        if self.batch_size == 0 {
            return bad("--batch-size must be at least 1");
        }
        if !(0.0..1.0).contains(&self.exclude_last) {
            return Err(Error::invalid(format!("--exclude-last must be in [0, 1), got {}", self.exclude_last)));
        }
        let (pos_resp, pos_resp_set) = responses(&self.positive_response, self.positive_responses.as_ref())?;
        let (neg_resp, neg_resp_set) = responses(&self.negative_response, self.negative_responses.as_ref())?;
        let responses_mode = !pos_resp.is_empty() || !neg_resp.is_empty();
        if responses_mode && (pos_resp.is_empty() || neg_resp.is_empty()) {
            return bad("responses mode needs both a positive and a negative response (--positive-response and --negative-response, or the files)");
        }
        if !responses_mode && self.negative.is_none() {
            return bad("--negative is required (unless in responses mode, with --positive-response/--negative-response)");
        }
        if !responses_mode && self.val_positive.is_some() != self.val_negative.is_some() {
            return bad("--val-positive and --val-negative go together");
        }
        if self.val_positive.is_none() && self.val_negative.is_some() {
            return bad("--val-negative needs --val-positive");
        }
        let chat = self.chat || responses_mode;
        let positions = self.positions.unwrap_or(if responses_mode {
            Positions::All
        } else if chat {
            Positions::PostInstruction
        } else {
            Positions::Last
        });
        let pos = TextSet::load(&self.positive, self.limit)?;
        let neg = self.negative.as_ref().map(|s| TextSet::load(s, self.limit)).transpose()?;
        let vpos = self.val_positive.as_ref().map(|s| TextSet::load(s, self.val_limit)).transpose()?;
        let vneg = self.val_negative.as_ref().map(|s| TextSet::load(s, self.val_limit)).transpose()?;
        let mut data = vec![];
        for s in [Some(&pos), neg.as_ref(), vpos.as_ref(), vneg.as_ref(), pos_resp_set.as_ref(), neg_resp_set.as_ref()].into_iter().flatten() {
            data.push(Source { file: Some(s.spec.path.clone()), sha256: s.sha256.clone() });
        }
        if responses_mode && (!self.positive_response.is_empty() || !self.negative_response.is_empty()) {
            let inline = serde_json::to_string(&serde_json::json!([self.positive_response, self.negative_response])).expect("strings serialise");
            data.push(Source::inline(&inline));
        }
        Ok(Loaded { responses_mode, chat, positions, pos, neg, vpos, vneg, pos_resp, neg_resp, data })
    }
}

impl super::Method for Spec {
    fn check(&self) -> Result<()> {
        self.load().map(|_| ())
    }

    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        let s = self.load()?;
        let (model, tok) = (cx.model(), cx.tok()?);
        let layers = super::layer_list(&self.layers, model.blocks.len())?;
        let examples = |set: &TextSet, resp: &[String]| -> Result<Vec<Example>> {
            if s.responses_mode {
                response_examples(tok, &set.texts, resp, s.positions)
            } else {
                prompt_examples(tok, &set.texts, s.chat, s.positions)
            }
        };
        let val = match &s.vpos {
            Some(vp) => Some((examples(vp, &s.pos_resp)?, examples(s.vneg.as_ref().unwrap_or(vp), &s.neg_resp)?)),
            None => None,
        };
        let sets = Sets { pos: examples(&s.pos, &s.pos_resp)?, neg: examples(s.neg.as_ref().unwrap_or(&s.pos), &s.neg_resp)?, val };
        let opts = Options { method: self.method, site: self.site, layers: layers.clone(), exclude_last: self.exclude_last, batch: self.batch_size };
        let bar = super::bar("examples", cx.progress);
        let r = locate(model, &sets, &opts, super::tick(&bar))?;
        bar.finish_and_clear();
        let options = serde_json::json!({
            "method": self.method,
            "site": self.site,
            "positions": s.positions,
            "layers": layers,
            "chat": s.chat,
            "limit": self.limit,
            "val_limit": self.val_limit,
            "exclude_last": self.exclude_last,
            "responses_mode": s.responses_mode,
            "positive_responses": s.pos_resp,
            "negative_responses": s.neg_resp,
            "n_positive": sets.pos.len(),
            "n_negative": sets.neg.len(),
            "n_val_positive": sets.val.as_ref().map(|v| v.0.len()),
            "n_val_negative": sets.val.as_ref().map(|v| v.1.len()),
        });
        let name = |v: serde_json::Value| v.as_str().unwrap_or_default().to_string();
        let metadata: BTreeMap<String, String> = [
            ("format", "mechc-directions/1".to_string()),
            ("method", name(serde_json::json!(self.method))),
            ("site", name(serde_json::json!(self.site))),
            ("positions", name(serde_json::json!(s.positions))),
            ("model_sha256", cx.source.sha256.clone()),
            ("best_tensor", r.best().site.clone()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut out = super::Located::new(findings(&r, options, cx.source.clone(), s.data));
        out.vectors = Some(Vectors::of(&r, metadata));
        out.report = table(&r);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::{random_model, RandomSpec};

    /// Synthetic activations: noise plus a planted offset along axis 0 for the positives.
    fn planted(n: usize, d: usize, offset: f32, seed: u64) -> (Vec<Vec<f32>>, Vec<Vec<f32>>) {
        let mut s = seed;
        let mut noise = || {
            s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((s >> 11) as f64 / (1u64 << 53) as f64 - 0.5) as f32
        };
        let mut pos = vec![];
        let mut neg = vec![];
        for _ in 0..n {
            let shared: Vec<f32> = (0..d).map(|_| noise()).collect();
            let mut p: Vec<f32> = shared.iter().map(|&x| x + 0.1 * noise()).collect();
            let ng: Vec<f32> = shared.iter().map(|&x| x + 0.1 * noise()).collect();
            // The pair's offset varies in size, so the differences have variance along axis 0.
            p[0] += offset * (1.0 + noise());
            pos.push(p);
            neg.push(ng);
        }
        (pos, neg)
    }

    #[test]
    fn mean_diff_and_pca_recover_a_planted_direction() {
        let (pos, neg) = planted(40, 16, 3.0, 5);
        let md = direction(DirMethod::MeanDiff, &pos, &neg).unwrap();
        let want: Vec<f64> = (0..16)
            .map(|j| pos.iter().map(|x| x[j] as f64).sum::<f64>() / 40.0 - neg.iter().map(|x| x[j] as f64).sum::<f64>() / 40.0)
            .collect();
        for (a, b) in md.iter().zip(&want) {
            assert!((*a as f64 - b).abs() < 1e-5);
        }
        let pca = direction(DirMethod::Pca, &pos, &neg).unwrap();
        let n = pca.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "pca direction is unit length, got {n}");
        assert!(pca[0] > 0.95, "pca should point along +axis 0: {pca:?}");
        // Swapping the classes flips the sign (majority rule), not the axis.
        let flipped = direction(DirMethod::Pca, &neg, &pos).unwrap();
        assert!(flipped[0] < -0.95);
        // Both separate the classes perfectly on fresh data.
        let (vp, vn) = planted(30, 16, 3.0, 99);
        for v in [&md, &pca] {
            let s = separation(v, (&pos, &neg), (&vp, &vn));
            assert_eq!(s.accuracy, 1.0, "{s:?}");
            assert!(s.cohens_d > 2.0 && s.mean_pos > s.threshold && s.mean_neg < s.threshold, "{s:?}");
        }
        // A useless direction (orthogonal to the offset) separates at chance, not perfectly.
        let mut ortho = vec![0f32; 16];
        ortho[5] = 1.0;
        let s = separation(&ortho, (&pos, &neg), (&vp, &vn));
        assert!(s.accuracy < 0.8 && s.cohens_d.abs() < 1.0, "{s:?}");
        // Deterministic.
        assert_eq!(pca, direction(DirMethod::Pca, &pos, &neg).unwrap());
        // Degenerate input is an error, not a panic.
        assert!(direction(DirMethod::MeanDiff, &pos, &pos).is_err());
        assert!(direction(DirMethod::Pca, &pos[..1], &neg[..1]).is_err());
        assert!(direction(DirMethod::MeanDiff, &[], &neg).is_err());
    }

    fn layer(l: usize, acc: f64, d: f64) -> LayerDirection {
        let s = Separation { accuracy: acc, threshold: 0.0, mean_pos: 0.0, mean_neg: 0.0, std_pos: 1.0, std_neg: 1.0, cohens_d: d, n_pos: 1, n_neg: 1 };
        LayerDirection { layer: l, site: String::new(), vector: vec![], norm: 1.0, train: s.clone(), val: Some(s) }
    }

    #[test]
    fn best_layer_rule() {
        // Highest accuracy; ties by d; layers in the last 20% skipped (10 layers: 8 and 9).
        let ls = vec![layer(2, 0.9, 5.0), layer(4, 0.95, 1.0), layer(5, 0.95, 2.0), layer(8, 1.0, 9.0)];
        assert_eq!(ls[best_layer(&ls, 10, 0.2)].layer, 5);
        assert_eq!(ls[best_layer(&ls, 10, 0.0)].layer, 8);
        // Only excluded layers computed: the best of them.
        let late = vec![layer(8, 0.7, 1.0), layer(9, 0.8, 1.0)];
        assert_eq!(late[best_layer(&late, 10, 0.2)].layer, 9);
        // Full ties: the lower layer.
        let tie = vec![layer(1, 1.0, 3.0), layer(3, 1.0, 3.0)];
        assert_eq!(tie[best_layer(&tie, 10, 0.2)].layer, 1);
    }

    /// `activations` averages the site's activation over the chosen positions, batched or not,
    /// and equals a plain single-sequence capture.
    #[test]
    fn activations_average_the_positions() {
        let m = random_model(RandomSpec::from_seed(3).config(), 3).unwrap();
        let ex = vec![
            Example { ids: vec![1, 2, 3, 4], positions: vec![1, 3] },
            Example { ids: vec![5, 6], positions: vec![1] },
            Example { ids: vec![7, 1, 2, 9, 9, 4], positions: vec![0, 1, 2, 3, 4, 5] },
        ];
        let layers = vec![0, m.blocks.len() - 1];
        for site in [Site::ResidPre, Site::ResidPost] {
            let got = activations(&m, &ex, site, &layers, 2, |_, _| {}).unwrap();
            for (k, &l) in layers.iter().enumerate() {
                for (i, e) in ex.iter().enumerate() {
                    let mut h = Hooks::new();
                    h.capture(site.point(l));
                    m.forward(&Batch::single(&e.ids), None, &mut h, Fwd::default()).unwrap();
                    let a = h.captured[&site.point(l)].i(0).unwrap().to_vec2::<f32>().unwrap();
                    for j in 0..a[0].len() {
                        let want = e.positions.iter().map(|&p| a[p][j] as f64).sum::<f64>() / e.positions.len() as f64;
                        assert!((got[k][i][j] as f64 - want).abs() < 1e-4, "{site:?} layer {l} example {i}");
                    }
                }
            }
        }
        assert!(activations(&m, &ex, Site::ResidPre, &[99], 2, |_, _| {}).unwrap_err().to_string().contains("99"));
        let bad = vec![Example { ids: vec![1, 2], positions: vec![2] }];
        assert!(activations(&m, &bad, Site::ResidPre, &[0], 2, |_, _| {}).is_err());
    }
}
