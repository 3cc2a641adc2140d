//! Linear probes: logistic regression on a labelled set's activations, one probe per layer (the
//! residual stream at `hook_resid_pre` / `hook_resid_post`) or per attention head (its slice of
//! `attn.hook_z`, d_head features), scored by held-out accuracy.
//!
//! Examples and positions are [`direction`](super::direction)'s (the activation is averaged over
//! the chosen positions; the last token by default) and collected by the same function
//! ([`direction::point_activations`]).
//!
//! The probe: features standardised with the train split's mean and standard deviation (a
//! feature constant on the train split is only centred), then
//! `p(y = 1 | x) = σ(w·x + b)` minimising the mean log-loss plus `l2/2 · ‖w‖²` (the bias is not
//! penalised), by L-BFGS (argmin, More–Thuente line search) from zero in f64: deterministic, and
//! the loss is strictly convex for `l2 > 0`, so the optimum is unique. An example is classified
//! positive when `p > 0.5`.
//!
//! Held-out examples: the given validation sets, or a seeded split of the train sets (each class
//! split on its own, so the classes keep their proportions). A control (`shuffle_labels`): the
//! train labels are permuted with the seed before fitting; a probe that then still scores well
//! on held-out data would be reading something other than the labels.
//!
//! Best unit: the highest held-out accuracy, ties broken by the lower held-out loss, then the
//! earlier unit.

use std::collections::BTreeMap;

use argmin::core::{CostFunction, Executor, Gradient, State};
use argmin::solver::linesearch::MoreThuenteLineSearch;
use argmin::solver::quasinewton::LBFGS;
use serde::Serialize;

use super::direction::{self, Example, Positions};
use crate::data::{SetSpec, TextSet};
use crate::error::{Error, Result};
use crate::ir::{Component, Findings, Source};
use crate::model::Model;
use crate::runtime::HookPoint;

pub const METHOD: &str = "probe";

/// Where the probe reads its features.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ProbeSite {
    /// `blocks.{l}.hook_resid_pre`: the residual stream entering block l (d_model features).
    ResidPre,
    /// `blocks.{l}.hook_resid_post`: the residual stream leaving block l (d_model features).
    ResidPost,
    /// `blocks.{l}.attn.hook_z`, one probe per head on its d_head slice.
    Head,
}

impl ProbeSite {
    pub fn point(self, layer: usize) -> HookPoint {
        match self {
            ProbeSite::ResidPre => HookPoint::ResidPre(layer),
            ProbeSite::ResidPost => HookPoint::ResidPost(layer),
            ProbeSite::Head => HookPoint::AttnZ(layer),
        }
    }
}

/// A fitted probe: standardisation and the logistic weights (in standardised units).
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    pub mean: Vec<f64>,
    pub scale: Vec<f64>,
    pub w: Vec<f64>,
    pub b: f64,
    /// L-BFGS iterations used.
    pub iters: u64,
}

fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

/// log(1 + e^z), stable.
fn softplus(z: f64) -> f64 {
    if z > 0.0 {
        z + (-z).exp().ln_1p()
    } else {
        z.exp().ln_1p()
    }
}

/// The regularised objective on standardised features `x` (rows) with labels `y`: parameters
/// `theta = [w..., b]`; mean log-loss + `l2/2 · ‖w‖²`.
pub struct Objective<'a> {
    pub x: &'a [Vec<f64>],
    pub y: &'a [bool],
    pub l2: f64,
}

impl Objective<'_> {
    /// The objective and its gradient at `theta`.
    pub fn loss_grad(&self, theta: &[f64]) -> (f64, Vec<f64>) {
        let d = theta.len() - 1;
        let (w, b) = (&theta[..d], theta[d]);
        let n = self.x.len() as f64;
        let mut g = vec![0f64; d + 1];
        let mut loss = 0.0;
        for (x, &y) in self.x.iter().zip(self.y) {
            let z = x.iter().zip(w).map(|(a, b)| a * b).sum::<f64>() + b;
            // -log p(y): softplus(z) − y·z.
            loss += softplus(z) - if y { z } else { 0.0 };
            let r = sigmoid(z) - if y { 1.0 } else { 0.0 };
            g[..d].iter_mut().zip(x).for_each(|(gi, xi)| *gi += r * xi);
            g[d] += r;
        }
        g.iter_mut().for_each(|v| *v /= n);
        loss /= n;
        loss += 0.5 * self.l2 * w.iter().map(|v| v * v).sum::<f64>();
        g[..d].iter_mut().zip(w).for_each(|(gi, wi)| *gi += self.l2 * wi);
        (loss, g)
    }
}

impl CostFunction for Objective<'_> {
    type Param = Vec<f64>;
    type Output = f64;
    fn cost(&self, p: &Vec<f64>) -> std::result::Result<f64, argmin::core::Error> {
        Ok(self.loss_grad(p).0)
    }
}

impl Gradient for Objective<'_> {
    type Param = Vec<f64>;
    type Gradient = Vec<f64>;
    fn gradient(&self, p: &Vec<f64>) -> std::result::Result<Vec<f64>, argmin::core::Error> {
        Ok(self.loss_grad(p).1)
    }
}

/// Standardisation of `x` by the train rows' mean and (population) standard deviation; a
/// constant feature gets scale 1.
pub fn standardiser(x: &[Vec<f32>]) -> (Vec<f64>, Vec<f64>) {
    let d = x[0].len();
    let n = x.len() as f64;
    let mut mean = vec![0f64; d];
    for r in x {
        mean.iter_mut().zip(r).for_each(|(m, &v)| *m += v as f64);
    }
    mean.iter_mut().for_each(|m| *m /= n);
    let mut var = vec![0f64; d];
    for r in x {
        var.iter_mut().zip(r).zip(&mean).for_each(|((s, &v), m)| *s += (v as f64 - m).powi(2));
    }
    let scale = var.iter().map(|s| (s / n).sqrt()).map(|s| if s > 1e-12 && s.is_finite() { s } else { 1.0 }).collect();
    (mean, scale)
}

impl Probe {
    /// Fit on `x` (rows of equal length) with labels `y` (see the module doc).
    pub fn fit(x: &[Vec<f32>], y: &[bool], l2: f64, max_iters: u64) -> Result<Probe> {
        if x.is_empty() || x.len() != y.len() {
            return Err(Error::invalid("probe: no examples, or not one label per example"));
        }
        let d = x[0].len();
        if d == 0 || x.iter().any(|r| r.len() != d) {
            return Err(Error::invalid("probe: activations of different sizes"));
        }
        if !(l2 > 0.0 && l2.is_finite()) {
            return Err(Error::invalid(format!("--l2 must be positive, got {l2}")));
        }
        let (mean, scale) = standardiser(x);
        let xs: Vec<Vec<f64>> = x.iter().map(|r| standardise(r, &mean, &scale)).collect();
        let obj = Objective { x: &xs, y, l2 };
        let ls = MoreThuenteLineSearch::new();
        let solver = LBFGS::new(ls, 10)
            .with_tolerance_grad(1e-9)
            .and_then(|s| s.with_tolerance_cost(0.0))
            .map_err(|e| Error::invalid(format!("probe: {e}")))?;
        let res = Executor::new(obj, solver)
            .configure(|s| s.param(vec![0f64; d + 1]).max_iters(max_iters))
            .run()
            .map_err(|e| Error::invalid(format!("probe: L-BFGS failed: {e}")))?;
        let st = res.state();
        let theta = st.get_best_param().or(st.get_param()).cloned().ok_or_else(|| Error::invalid("probe: L-BFGS returned no parameters"))?;
        if theta.iter().any(|v| !v.is_finite()) {
            return Err(Error::invalid("probe: the fit diverged (non-finite weights)"));
        }
        let iters = st.get_iter();
        Ok(Probe { mean, scale, w: theta[..d].to_vec(), b: theta[d], iters })
    }

    /// p(y = 1 | x).
    pub fn prob(&self, x: &[f32]) -> f64 {
        let s = standardise(x, &self.mean, &self.scale);
        sigmoid(s.iter().zip(&self.w).map(|(a, b)| a * b).sum::<f64>() + self.b)
    }

    /// Accuracy (positive when p > 0.5) and mean log-loss (unregularised) on `x`, `y`.
    pub fn score(&self, x: &[Vec<f32>], y: &[bool]) -> (f64, f64) {
        let mut right = 0;
        let mut loss = 0.0;
        for (r, &t) in x.iter().zip(y) {
            let p = self.prob(r).clamp(1e-15, 1.0 - 1e-15);
            if (p > 0.5) == t {
                right += 1;
            }
            loss -= if t { p.ln() } else { (1.0 - p).ln() };
        }
        (right as f64 / x.len() as f64, loss / x.len() as f64)
    }
}

fn standardise(r: &[f32], mean: &[f64], scale: &[f64]) -> Vec<f64> {
    r.iter().zip(mean).zip(scale).map(|((&v, m), s)| (v as f64 - m) / s).collect()
}

/// A deterministic generator (splitmix64) for splits and label shuffles, independent of `rand`'s
/// version.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Fisher–Yates.
    fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// A seeded split of `0..n` into (train, held-out) indices, both sorted: `round(n · fraction)`
/// held out.
pub fn split(n: usize, fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut idx: Vec<usize> = (0..n).collect();
    SplitMix(seed).shuffle(&mut idx);
    let k = ((n as f64) * fraction).round() as usize;
    let mut val = idx[..k.min(n)].to_vec();
    let mut train = idx[k.min(n)..].to_vec();
    val.sort_unstable();
    train.sort_unstable();
    (train, val)
}

/// `labels` permuted with `seed` (the shuffled-label control).
pub fn shuffled(labels: &[bool], seed: u64) -> Vec<bool> {
    let mut v = labels.to_vec();
    // A different stream from the split's, so that the control does not depend on the split.
    SplitMix(seed ^ 0x5bd1_e995_0000_0001).shuffle(&mut v);
    v
}

/// Held-out examples: given sets, or a seeded split of the train sets.
#[derive(Debug, Clone)]
pub enum Validation {
    Sets(Vec<Example>, Vec<Example>),
    Split { fraction: f64, seed: u64 },
}

/// The example sets of a run.
pub struct Sets {
    pub pos: Vec<Example>,
    pub neg: Vec<Example>,
    pub val: Validation,
}

/// Options of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub site: ProbeSite,
    /// Layers to probe (sorted, distinct).
    pub layers: Vec<usize>,
    /// L2 penalty on the standardised weights.
    pub l2: f64,
    /// L-BFGS iteration cap per probe.
    pub max_iters: u64,
    /// Permute the train labels with `seed` before fitting (control).
    pub shuffle_labels: bool,
    pub seed: u64,
    /// Sequences per forward pass.
    pub batch: usize,
}

/// One probe's scores.
#[derive(Debug, Clone, Serialize)]
pub struct UnitProbe {
    pub component: Component,
    pub layer: usize,
    pub head: Option<usize>,
    pub val_accuracy: f64,
    pub val_loss: f64,
    pub train_accuracy: f64,
    pub train_loss: f64,
    pub iters: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ProbeResult {
    pub units: Vec<UnitProbe>,
    /// Index into `units` of the best one.
    pub best: usize,
    pub n_train: (usize, usize),
    pub n_val: (usize, usize),
}

impl ProbeResult {
    pub fn best(&self) -> &UnitProbe {
        &self.units[self.best]
    }
    /// The best accuracy per layer (for head probes: the best head).
    pub fn per_layer(&self) -> BTreeMap<usize, f64> {
        let mut m: BTreeMap<usize, f64> = BTreeMap::new();
        for u in &self.units {
            let e = m.entry(u.layer).or_insert(f64::NEG_INFINITY);
            *e = e.max(u.val_accuracy);
        }
        m
    }
}

/// The activations of a run: per probed layer, the train rows (positives then negatives) with
/// their labels, and the held-out rows with theirs.
pub struct Activations {
    pub layers: Vec<usize>,
    /// `train[k][i]`: layer `layers[k]`, example i.
    pub train: Vec<Vec<Vec<f32>>>,
    pub train_y: Vec<bool>,
    pub val: Vec<Vec<Vec<f32>>>,
    pub val_y: Vec<bool>,
}

fn check_options(o: &Options) -> Result<()> {
    if o.layers.is_empty() {
        return Err(Error::invalid("probe: no layers to probe"));
    }
    if o.batch == 0 {
        return Err(Error::invalid("--batch-size must be at least 1"));
    }
    if !(o.l2 > 0.0 && o.l2.is_finite()) {
        return Err(Error::invalid(format!("--l2 must be positive, got {}", o.l2)));
    }
    if o.max_iters == 0 {
        return Err(Error::invalid("--max-iters must be at least 1"));
    }
    Ok(())
}

/// Check a held-out fraction: in (0, 1).
pub fn check_fraction(f: f64) -> Result<()> {
    if !(f > 0.0 && f < 1.0) {
        return Err(Error::invalid(format!("--val-fraction must be in (0, 1), got {f}")));
    }
    Ok(())
}

/// Run the examples through the model and split them into train and held-out rows.
/// `progress(done, total)` counts examples.
pub fn collect(model: &Model, sets: &Sets, o: &Options, mut progress: impl FnMut(usize, usize)) -> Result<Activations> {
    check_options(o)?;
    if sets.pos.is_empty() || sets.neg.is_empty() {
        return Err(Error::invalid("probe: the positive and negative sets must be non-empty"));
    }
    let points: Vec<HookPoint> = o.layers.iter().map(|&l| o.site.point(l)).collect();
    let extra = match &sets.val {
        Validation::Sets(p, n) => {
            if p.is_empty() || n.is_empty() {
                return Err(Error::invalid("probe: the held-out positive and negative sets must be non-empty"));
            }
            p.len() + n.len()
        }
        Validation::Split { fraction, .. } => {
            check_fraction(*fraction)?;
            0
        }
    };
    let total = sets.pos.len() + sets.neg.len() + extra;
    let mut offset = 0;
    let mut run = |ex: &[Example]| -> Result<Vec<Vec<Vec<f32>>>> {
        let base = offset;
        let r = direction::point_activations(model, ex, &points, o.batch, |i, _| progress(base + i, total))?;
        offset += ex.len();
        Ok(r)
    };
    let (ap, an) = (run(&sets.pos)?, run(&sets.neg)?);
    let join = |p: Vec<Vec<Vec<f32>>>, n: Vec<Vec<Vec<f32>>>| -> Vec<Vec<Vec<f32>>> {
        p.into_iter().zip(n).map(|(mut a, b)| {
            a.extend(b);
            a
        }).collect()
    };
    let labels = |np: usize, nn: usize| -> Vec<bool> { std::iter::repeat(true).take(np).chain(std::iter::repeat(false).take(nn)).collect() };
    match &sets.val {
        Validation::Sets(p, n) => {
            let (vp, vn) = (run(p)?, run(n)?);
            Ok(Activations {
                layers: o.layers.clone(),
                train: join(ap, an),
                train_y: labels(sets.pos.len(), sets.neg.len()),
                val: join(vp, vn),
                val_y: labels(p.len(), n.len()),
            })
        }
        Validation::Split { fraction, seed } => {
            // Each class split on its own (different seeds per class).
            let (tp, vp) = split(sets.pos.len(), *fraction, *seed);
            let (tn, vn) = split(sets.neg.len(), *fraction, seed.wrapping_add(1));
            for (what, n) in [("positive", tp.len()), ("negative", tn.len())] {
                if n == 0 {
                    return Err(Error::invalid(format!("--val-fraction {fraction} leaves no {what} train examples")));
                }
            }
            for (what, n) in [("positive", vp.len()), ("negative", vn.len())] {
                if n == 0 {
                    return Err(Error::invalid(format!("--val-fraction {fraction} holds out no {what} examples (too few examples)")));
                }
            }
            let pick = |a: &[Vec<f32>], b: &[Vec<f32>], ia: &[usize], ib: &[usize]| -> Vec<Vec<f32>> {
                ia.iter().map(|&i| a[i].clone()).chain(ib.iter().map(|&i| b[i].clone())).collect()
            };
            let train = (0..o.layers.len()).map(|k| pick(&ap[k], &an[k], &tp, &tn)).collect();
            let val = (0..o.layers.len()).map(|k| pick(&ap[k], &an[k], &vp, &vn)).collect();
            Ok(Activations { layers: o.layers.clone(), train, train_y: labels(tp.len(), tn.len()), val, val_y: labels(vp.len(), vn.len()) })
        }
    }
}

/// Fit and score one probe per layer (or per head) on collected activations. `progress(done,
/// total)` counts layers.
pub fn fit_all(acts: &Activations, o: &Options, head_dim: usize, mut progress: impl FnMut(usize, usize)) -> Result<ProbeResult> {
    check_options(o)?;
    let train_y = if o.shuffle_labels { shuffled(&acts.train_y, o.seed) } else { acts.train_y.clone() };
    let mut units = vec![];
    progress(0, acts.layers.len());
    for (k, &l) in acts.layers.iter().enumerate() {
        let d = acts.train[k][0].len();
        let heads: Vec<(Option<usize>, std::ops::Range<usize>)> = if o.site == ProbeSite::Head {
            if head_dim == 0 || d % head_dim != 0 {
                return Err(Error::invalid(format!("layer {l}: attn.hook_z has {d} values, not a multiple of head_dim {head_dim}")));
            }
            (0..d / head_dim).map(|h| (Some(h), h * head_dim..(h + 1) * head_dim)).collect()
        } else {
            vec![(None, 0..d)]
        };
        for (head, r) in heads {
            let slice = |rows: &[Vec<f32>]| -> Vec<Vec<f32>> { rows.iter().map(|x| x[r.clone()].to_vec()).collect() };
            let (tx, vx) = (slice(&acts.train[k]), slice(&acts.val[k]));
            let p = Probe::fit(&tx, &train_y, o.l2, o.max_iters).map_err(|e| Error::invalid(format!("layer {l}: {e}")))?;
            let (train_accuracy, train_loss) = p.score(&tx, &train_y);
            let (val_accuracy, val_loss) = p.score(&vx, &acts.val_y);
            let component = match head {
                Some(h) => Component::Head { layer: l, head: h },
                None => Component::Block(l),
            };
            units.push(UnitProbe { component, layer: l, head, val_accuracy, val_loss, train_accuracy, train_loss, iters: p.iters });
        }
        progress(k + 1, acts.layers.len());
    }
    let best = best_unit(&units);
    let n_pos = |y: &[bool]| y.iter().filter(|&&t| t).count();
    Ok(ProbeResult {
        best,
        n_train: (n_pos(&acts.train_y), acts.train_y.len() - n_pos(&acts.train_y)),
        n_val: (n_pos(&acts.val_y), acts.val_y.len() - n_pos(&acts.val_y)),
        units,
    })
}

/// The best unit's index by the rule in the module doc.
pub fn best_unit(units: &[UnitProbe]) -> usize {
    let mut best = 0;
    for (i, u) in units.iter().enumerate().skip(1) {
        let b = &units[best];
        if u.val_accuracy > b.val_accuracy || (u.val_accuracy == b.val_accuracy && u.val_loss < b.val_loss) {
            best = i;
        }
    }
    best
}

/// Collect the activations and fit every probe.
pub fn locate(
    model: &Model,
    sets: &Sets,
    o: &Options,
    progress_examples: impl FnMut(usize, usize),
    progress_layers: impl FnMut(usize, usize),
) -> Result<ProbeResult> {
    let acts = collect(model, sets, o, progress_examples)?;
    fit_all(&acts, o, model.cfg.head_dim, progress_layers)
}

/// Findings: one score per probed `L{l}` (or `L{l}.H{h}`) = held-out accuracy; extras: train
/// accuracy, held-out and train loss, L-BFGS iterations; summary: the best component, its layer
/// and accuracy, the sizes of the splits.
pub fn findings(r: &ProbeResult, options: serde_json::Value, model: Source, data: Vec<Source>) -> Findings {
    let meaning = "held-out accuracy of an L2-regularised logistic-regression probe (positive vs negative) on the component's activations; 0.5 = chance on balanced sets, higher = linearly decodable";
    let mut f = Findings::new(METHOD, meaning, options, model, data);
    for u in &r.units {
        let s = f.push(u.component, u.val_accuracy);
        s.extra.insert("layer".into(), u.layer.into());
        s.extra.insert("train_accuracy".into(), serde_json::json!(u.train_accuracy));
        s.extra.insert("val_loss".into(), serde_json::json!(u.val_loss));
        s.extra.insert("train_loss".into(), serde_json::json!(u.train_loss));
        s.extra.insert("iters".into(), u.iters.into());
    }
    let b = r.best();
    f.summary.insert("best_layer".into(), b.layer.into());
    f.summary.insert("best_component".into(), b.component.to_string().into());
    f.summary.insert("best_accuracy".into(), serde_json::json!(b.val_accuracy));
    f.summary.insert("n_train".into(), serde_json::json!([r.n_train.0, r.n_train.1]));
    f.summary.insert("n_val".into(), serde_json::json!([r.n_val.0, r.n_val.1]));
    f
}

/// A table: per layer (head probes: the layer's best head) held-out and train accuracy and
/// held-out loss; the best marked.
pub fn table(r: &ProbeResult) -> String {
    let mut s = format!("{:>10} {:>9} {:>9} {:>9}\n", "component", "val acc", "train acc", "val loss");
    let show: Vec<usize> = if r.units.iter().any(|u| u.head.is_some()) {
        let mut by_layer: BTreeMap<usize, usize> = BTreeMap::new();
        for (i, u) in r.units.iter().enumerate() {
            let e = by_layer.entry(u.layer).or_insert(i);
            let c = &r.units[*e];
            if u.val_accuracy > c.val_accuracy || (u.val_accuracy == c.val_accuracy && u.val_loss < c.val_loss) {
                *e = i;
            }
        }
        by_layer.into_values().collect()
    } else {
        (0..r.units.len()).collect()
    };
    for i in show {
        let u = &r.units[i];
        s += &format!(
            "{:>10} {:>9.4} {:>9.4} {:>9.4}{}\n",
            u.component.to_string(),
            u.val_accuracy,
            u.train_accuracy,
            u.val_loss,
            if i == r.best { "  <- best" } else { "" }
        );
    }
    s
}

/// Linear probes per layer (or head), scored by held-out accuracy.
///
/// Train logistic-regression probes on labelled sets, one per layer (or per attention head with
/// --site head), and score each by held-out accuracy: where is the distinction between the
/// positive and negative examples (e.g. harmful vs harmless instructions) linearly decodable?
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
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Spec {
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
}

impl Spec {
    /// Check the options and load the (small) sets: positive, negative, and the held-out pair.
    fn load(&self) -> Result<(TextSet, TextSet, Option<(TextSet, TextSet)>)> {
        if self.batch_size == 0 {
            return Err(Error::invalid("--batch-size must be at least 1"));
        }
        if !(self.l2 > 0.0 && self.l2.is_finite()) {
            return Err(Error::invalid(format!("--l2 must be positive, got {}", self.l2)));
        }
        if self.max_iters == 0 {
            return Err(Error::invalid("--max-iters must be at least 1"));
        }
        let held_out = match (&self.val_positive, &self.val_negative) {
            (Some(p), Some(n)) => Some((TextSet::load(p, self.val_limit)?, TextSet::load(n, self.val_limit)?)),
            (None, None) => {
                check_fraction(self.val_fraction)?;
                None
            }
            _ => return Err(Error::invalid("--val-positive and --val-negative go together")),
        };
        if self.positions == Positions::PostInstruction && !self.chat {
            return Err(Error::invalid("--positions post-instruction needs the chat template (--chat)"));
        }
        Ok((TextSet::load(&self.positive, self.limit)?, TextSet::load(&self.negative, self.limit)?, held_out))
    }
}

impl super::Method for Spec {
    fn check(&self) -> Result<()> {
        self.load().map(|_| ())
    }

    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        let (pos, neg, held_out) = self.load()?;
        let data: Vec<Source> = [Some(&pos), Some(&neg), held_out.as_ref().map(|h| &h.0), held_out.as_ref().map(|h| &h.1)]
            .into_iter()
            .flatten()
            .map(|s| Source { file: Some(s.spec.path.clone()), sha256: s.sha256.clone() })
            .collect();
        let (model, tok) = (cx.model(), cx.tok()?);
        let layers = super::layer_list(&self.layers, model.blocks.len())?;
        let examples = |set: &TextSet| direction::prompt_examples(tok, &set.texts, self.chat, self.positions);
        let val = match &held_out {
            Some((p, n)) => Validation::Sets(examples(p)?, examples(n)?),
            None => Validation::Split { fraction: self.val_fraction, seed: self.seed },
        };
        let sets = Sets { pos: examples(&pos)?, neg: examples(&neg)?, val };
        let opts = Options {
            site: self.site,
            layers: layers.clone(),
            l2: self.l2,
            max_iters: self.max_iters,
            shuffle_labels: self.shuffle_labels,
            seed: self.seed,
            batch: self.batch_size,
        };
        let bar = super::bar("examples", cx.progress);
        let acts = collect(model, &sets, &opts, super::tick(&bar))?;
        bar.finish_and_clear();
        let bar = crate::progress::bar(layers.len() as u64, "layers", cx.progress);
        let r = fit_all(&acts, &opts, model.cfg.head_dim, |i, _| bar.set_position(i as u64))?;
        bar.finish_and_clear();
        let options = serde_json::json!({
            "site": self.site,
            "positions": self.positions,
            "layers": layers,
            "chat": self.chat,
            "limit": self.limit,
            "val_limit": self.val_limit,
            "held_out": if held_out.is_some() { "sets" } else { "split" },
            "val_fraction": if held_out.is_some() { None } else { Some(self.val_fraction) },
            "seed": self.seed,
            "l2": self.l2,
            "max_iters": self.max_iters,
            "shuffle_labels": self.shuffle_labels,
            "n_positive": sets.pos.len(),
            "n_negative": sets.neg.len(),
        });
        let mut out = super::Located::new(findings(&r, options, cx.source.clone(), data));
        out.report = table(&r);
        Ok(out)
    }
}
