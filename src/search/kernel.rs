//! `params = "auto"` for bake-steering's ablate mode: the per-layer ablation kernel (and, with
//! `direction = { by = ID }`, the direction's fractional layer) searched as heretic searches it,
//! every candidate measured through the pass's runtime twin, never by rewriting weights.
//!
//! The space (heretic's ranges, with L the last layer's index): per component (`attn`: o_proj,
//! `mlp`: down_proj) `max_weight` ∈ [0.8, 1.5] (mlp: [−0.25, 1.5], clamped at 0 so the search
//! can switch the MLPs off), `max_weight_position` ∈ [0.6 L, L], `min_weight` ∈ [0, 1] as a
//! fraction of max_weight, `min_weight_distance` ∈ [1, max(0.6 L, 2)]; `direction_layer` ∈
//! `auto.direction_layers` when given.
//!
//! Per trial, two generation-free measurements under the twin, each one batched forward with
//! logits at the last position only: the mean **refusal score** (log-odds of the refusal tokens
//! at the first response position, Arditi et al.'s) of the harmful `metric_prompts`, and the mean
//! first-token **KL**(unchanged ‖ ablated) over the harmless `kl_prompts`. The optimiser is TPE
//! (the `tpe` crate: one Parzen-estimator optimiser per parameter, told the same cost; heretic uses
//! Optuna's TPE), after `startup` uniform random trials, on the cost
//! `score + 10 · max(0, KL − max_kl) / max_kl`: refusals down, the budget a wall with a slope.
//!
//! Then the **Pareto front** of (score, KL) over all trials; of its points within the budget, the
//! `confirm` lowest-score ones get the greedy **refusal rate** of `confirm_prompts` (generation,
//! `mechc eval refusal`'s markers), and the lowest rate wins (ties: lower KL). With `confirm = 0`
//! the lowest in-budget score wins. No trial within budget: the compile fails, nothing written.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Budget, MetricInfo, Search, SearchRecord, Trial};
use crate::data::{SetSpec, TextSet};
use crate::error::{Error, Result};
use crate::locate::refusal_direction::mean_refusal;
use crate::model::Model;
use crate::passes::BuildCtx;
use crate::runtime::score::{kl, last_logprobs};
use crate::runtime::Hooks;
use crate::tokenizer::Tok;
use crate::verify::refusal::{refusal_eval_hooked, RefusalOpts};

fn invalid(m: impl Into<String>) -> Error {
    Error::invalid(m)
}

fn d_limit() -> usize {
    24
}
fn d_trials() -> usize {
    48
}
fn d_startup() -> usize {
    16
}
fn d_confirm() -> usize {
    3
}
fn d_max_tokens() -> usize {
    48
}
fn d_batch() -> usize {
    16
}
fn yes() -> bool {
    true
}
fn d_refusal_tokens() -> Vec<String> {
    vec!["I".into(), "As".into()]
}
fn d_components() -> Vec<String> {
    vec!["attn".into(), "mlp".into()]
}

/// The `auto` table of `params = "auto"`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoOpts {
    max_kl: f64,
    kl_prompts: String,
    metric_prompts: String,
    confirm_prompts: Option<String>,
    #[serde(default)]
    skip: usize,
    #[serde(default = "d_limit")]
    limit: usize,
    #[serde(default = "d_trials")]
    trials: usize,
    #[serde(default = "d_startup")]
    startup: usize,
    #[serde(default)]
    seed: u64,
    direction_layers: Option<[f64; 2]>,
    #[serde(default = "d_components")]
    components: Vec<String>,
    #[serde(default = "d_refusal_tokens")]
    refusal_tokens: Vec<String>,
    #[serde(default = "d_confirm")]
    confirm: usize,
    #[serde(default = "d_max_tokens")]
    max_tokens: usize,
    #[serde(default = "yes")]
    chat: bool,
    #[serde(default = "d_batch")]
    batch: usize,
    plot: Option<String>,
}

/// One searched parameter: its name in the trial table and its range [lo, hi).
#[derive(Debug, Clone, PartialEq)]
pub struct Dim {
    pub name: String,
    pub lo: f64,
    pub hi: f64,
}

/// The space for `components` of a model with `n_layers` blocks (see the module doc).
pub fn space(components: &[String], n_layers: usize, direction_layers: Option<[f64; 2]>) -> Vec<Dim> {
    let last = n_layers.saturating_sub(1) as f64;
    let dim = |name: String, lo: f64, hi: f64| Dim { name, lo, hi };
    let mut dims = vec![];
    if let Some([lo, hi]) = direction_layers {
        dims.push(dim("direction_layer".into(), lo, hi));
    }
    for c in components {
        let floor = if c == "mlp" { -0.25 } else { 0.8 };
        dims.push(dim(format!("{c}.max_weight"), floor, 1.5));
        dims.push(dim(format!("{c}.max_weight_position"), 0.6 * last, last.max(0.6 * last + 1e-6)));
        dims.push(dim(format!("{c}.min_weight"), 0.0, 1.0));
        dims.push(dim(format!("{c}.min_weight_distance"), 1.0, (0.6 * last).max(2.0)));
    }
    dims
}

/// A point of the space as the pass's option values: `kernel = { .. }` (and the direction's
/// layer, `direction = { by, layer }`), with the kernel's max_weight clamped at 0 and min_weight
/// the fraction of it.
pub fn values(point: &BTreeMap<String, f64>, components: &[String], direction_by: Option<&str>) -> toml::Table {
    use toml::Value as V;
    let mut kernel = toml::Table::new();
    for c in components {
        let p = |k: &str| point[&format!("{c}.{k}")];
        let max = p("max_weight").max(0.0);
        let k = toml::Table::from_iter([
            ("max_weight".to_string(), V::Float(max)),
            ("max_weight_position".to_string(), V::Float(p("max_weight_position"))),
            ("min_weight".to_string(), V::Float(p("min_weight") * max)),
            ("min_weight_distance".to_string(), V::Float(p("min_weight_distance"))),
        ]);
        kernel.insert(c.clone(), V::Table(k));
    }
    let mut t = toml::Table::from_iter([("kernel".to_string(), V::Table(kernel))]);
    if let (Some(by), Some(l)) = (direction_by, point.get("direction_layer")) {
        t.insert("direction".into(), V::Table(toml::Table::from_iter([("by".to_string(), V::String(by.into())), ("layer".to_string(), V::Float(*l))])));
    }
    t
}

/// Indices of the trials no other trial beats on both score and KL (lower is better on each).
pub fn pareto_front(points: &[(f64, f64)]) -> Vec<usize> {
    (0..points.len())
        .filter(|&i| {
            let (s, k) = points[i];
            !points.iter().enumerate().any(|(j, &(s2, k2))| j != i && s2 <= s && k2 <= k && (s2 < s || k2 < k))
        })
        .collect()
}

/// The cost TPE minimises: the score, plus a penalty that grows with the excess over the budget.
pub fn cost(score: f64, kl: f64, max_kl: f64) -> f64 {
    score + 10.0 * (kl - max_kl).max(0.0) / max_kl
}

/// A checked `auto` table with its prompts loaded.
pub struct KernelSearch {
    max_kl: f64,
    dims: Vec<Dim>,
    components: Vec<String>,
    direction_by: Option<String>,
    trials: usize,
    startup: usize,
    seed: u64,
    confirm: usize,
    kl_prompts: Vec<Vec<u32>>,
    harmful: Vec<Vec<u32>>,
    refusal_tokens: Vec<u32>,
    confirm_prompts: Vec<String>,
    refusal: RefusalOpts,
    tok: Tok,
    batch: usize,
    plot: Option<PathBuf>,
    progress: bool,
}

impl KernelSearch {
    /// Check the `auto` table against the pass's other options (`base`, as written) and load
    /// its prompt sets.
    pub fn from_table(t: &toml::Table, base: &toml::Table, cx: &BuildCtx) -> Result<KernelSearch> {
        let a: AutoOpts = crate::passes::options(t).map_err(|e| invalid(format!("`auto`: {e}")))?;
        if base.get("mode").and_then(toml::Value::as_str) != Some("ablate") {
            return Err(invalid("`params = \"auto\"` searches the ablation kernel: it needs mode = \"ablate\""));
        }
        for k in ["kernel", "layers", "weights"] {
            if base.contains_key(k) {
                return Err(invalid(format!("`params = \"auto\"` chooses the kernel: drop `{k}`")));
            }
        }
        if !(a.max_kl > 0.0 && a.max_kl.is_finite()) {
            return Err(invalid(format!("`auto.max_kl` = {}: must be a positive number", a.max_kl)));
        }
        if a.trials == 0 || a.startup == 0 || a.startup > a.trials {
            return Err(invalid(format!("`auto.trials` = {} and `auto.startup` = {}: need 1 ≤ startup ≤ trials", a.trials, a.startup)));
        }
        if a.batch == 0 || a.limit == 0 || a.max_tokens == 0 {
            return Err(invalid("`auto.batch`, `auto.limit` and `auto.max_tokens` must be at least 1"));
        }
        if a.components.is_empty() || a.components.iter().any(|c| c != "attn" && c != "mlp") {
            return Err(invalid(format!("`auto.components` = {:?}: give \"attn\", \"mlp\" or both", a.components)));
        }
        let n = cx.source.cfg.num_layers;
        let direction_by = match (&a.direction_layers, base.get("direction")) {
            (None, _) => None,
            (Some(_), Some(toml::Value::Table(d))) => match d.get("by").and_then(toml::Value::as_str) {
                Some(by) if !d.contains_key("layer") => Some(by.to_string()),
                _ => return Err(invalid("`auto.direction_layers` searches the layer of direction = { by = ID }: drop its `layer`")),
            },
            (Some(_), _) => return Err(invalid("`auto.direction_layers` needs direction = { by = ID } (a [[locate]] step's per-layer vectors)")),
        };
        if let Some([lo, hi]) = a.direction_layers {
            if !(lo >= 0.0 && lo < hi && hi <= (n - 1) as f64) {
                return Err(invalid(format!("`auto.direction_layers` = [{lo}, {hi}]: need 0 ≤ lo < hi ≤ {} (the last layer)", n - 1)));
            }
        }
        let tok = cx.tok.ok_or_else(|| invalid("params = \"auto\" needs the model's tokenizer (tokenizer.json) to read its prompts"))?;
        let load = |key: &str, s: &str| -> Result<Vec<String>> {
            let mut spec = SetSpec::parse(s);
            spec.path = cx.path(&spec.path.to_string_lossy());
            let mut set = TextSet::load(&spec, a.skip + a.limit).map_err(|e| invalid(format!("`auto.{key}`: {e}")))?;
            let texts = set.texts.split_off(a.skip.min(set.texts.len()));
            if texts.is_empty() {
                return Err(invalid(format!("`auto.{key}`: no prompts in {spec} after the first {} (`auto.skip`)", a.skip)));
            }
            Ok(texts)
        };
        let kl_texts = load("kl_prompts", &a.kl_prompts)?;
        let harmful_texts = load("metric_prompts", &a.metric_prompts)?;
        let confirm_prompts = match &a.confirm_prompts {
            Some(p) => load("confirm_prompts", p)?,
            None => harmful_texts.clone(),
        };
        let refusal_tokens = a
            .refusal_tokens
            .iter()
            .map(|t| crate::locate::first_token(tok, "auto.refusal_tokens", t))
            .collect::<Result<Vec<u32>>>()?;
        if refusal_tokens.is_empty() {
            return Err(invalid("`auto.refusal_tokens`: give at least one text"));
        }
        Ok(KernelSearch {
            max_kl: a.max_kl,
            dims: space(&a.components, n, a.direction_layers),
            components: a.components,
            direction_by,
            trials: a.trials,
            startup: a.startup,
            seed: a.seed,
            confirm: a.confirm,
            kl_prompts: tok.prompts_ids(&kl_texts, a.chat)?,
            harmful: tok.prompts_ids(&harmful_texts, a.chat)?,
            refusal_tokens,
            confirm_prompts,
            refusal: RefusalOpts { max_tokens: a.max_tokens, batch: a.batch, chat: a.chat, ..Default::default() },
            tok: tok.clone(),
            batch: a.batch,
            plot: a.plot.as_deref().map(|p| cx.path(p)),
            progress: cx.progress,
        })
    }

    /// (mean KL, max KL, mean refusal score) under `hooks`; `base` the unablated log-probs.
    fn measure(&self, model: &Model, hooks: &Hooks, base: &[Vec<f32>]) -> Result<(f64, f64, f64)> {
        let mut kls = vec![0f64; self.kl_prompts.len()];
        last_logprobs(model, &self.kl_prompts, hooks, self.batch, |i, lp| kls[i] = kl(&base[i], lp))?;
        let score = mean_refusal(model, &self.harmful, hooks, &self.refusal_tokens, self.batch)?;
        let n = kls.len() as f64;
        Ok((kls.iter().sum::<f64>() / n, kls.iter().cloned().fold(0.0, f64::max), score))
    }

    fn point_values(&self, point: &BTreeMap<String, f64>) -> toml::Table {
        values(point, &self.components, self.direction_by.as_deref())
    }
}

impl Search for KernelSearch {
    /// The middle of every range.
    fn placeholder(&self) -> toml::Table {
        let mid = self.dims.iter().map(|d| (d.name.clone(), (d.lo + d.hi) / 2.0)).collect();
        self.point_values(&mid)
    }

    fn run(&self, option: &str, model: &Model, twin_at: &dyn Fn(&toml::Table) -> Result<Hooks>) -> Result<(SearchRecord, toml::Table)> {
        use rand::Rng as _;
        let mut base = vec![vec![]; self.kl_prompts.len()];
        last_logprobs(model, &self.kl_prompts, &Hooks::new(), self.batch, |i, lp| base[i] = lp.to_vec())?;
        let mut optims = self
            .dims
            .iter()
            .map(|d| tpe::range(d.lo, d.hi).map(|r| tpe::TpeOptimizer::new(tpe::parzen_estimator(), r)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("params = \"auto\": bad search range: {e}")))?;
        let mut uniform = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(self.seed);
        let mut tpe_rng = <rand_tpe::rngs::StdRng as rand_tpe::SeedableRng>::seed_from_u64(self.seed);
        let bar = crate::progress::bar(self.trials as u64, "auto params", self.progress);
        let mut trials: Vec<Trial> = vec![];
        for i in 0..self.trials {
            let startup = i < self.startup;
            let mut xs = vec![];
            for (d, o) in self.dims.iter().zip(optims.iter_mut()) {
                xs.push(if startup { uniform.gen_range(d.lo..d.hi) } else { o.ask(&mut tpe_rng).map_err(|e| invalid(format!("TPE: {e}")))? });
            }
            let point: BTreeMap<String, f64> = self.dims.iter().map(|d| d.name.clone()).zip(xs.iter().copied()).collect();
            let (kl_mean, kl_max, score) = self.measure(model, &twin_at(&self.point_values(&point))?, &base)?;
            let c = cost(score, kl_mean, self.max_kl);
            for (x, o) in xs.iter().zip(optims.iter_mut()) {
                o.tell(*x, c).map_err(|e| invalid(format!("TPE: {e}")))?;
            }
            bar.set_message(format!("trial {}: refusal score {score:.3}, KL {kl_mean:.3}", i + 1));
            bar.inc(1);
            trials.push(Trial {
                value: (i + 1) as f64,
                params: point,
                stage: if startup { "startup" } else { "tpe" },
                kl: kl_mean,
                kl_max,
                within_budget: kl_mean <= self.max_kl,
                metric: Some(score),
                ..Trial::default()
            });
        }
        bar.finish_and_clear();
        let front = pareto_front(&trials.iter().map(|t| (t.metric.unwrap_or(f64::INFINITY), t.kl)).collect::<Vec<_>>());
        let mut ok: Vec<usize> = front.iter().copied().filter(|&i| trials[i].within_budget).collect();
        if ok.is_empty() {
            let lowest = trials.iter().map(|t| t.kl).fold(f64::INFINITY, f64::min);
            return Err(invalid(format!(
                "params = \"auto\": budget unreachable: the lowest mean first-token KL of {} trials is {lowest:.4} > max_kl = {} on {} prompts (raise `auto.max_kl`, or ablate less: `auto.components = [\"attn\"]`)",
                trials.len(),
                self.max_kl,
                self.kl_prompts.len()
            )));
        }
        ok.sort_by(|&a, &b| trials[a].metric.unwrap_or(f64::INFINITY).total_cmp(&trials[b].metric.unwrap_or(f64::INFINITY)));
        let mut best = ok[0];
        if self.confirm > 0 {
            let bar = crate::progress::bar(self.confirm.min(ok.len()) as u64, "confirming (generation)", self.progress);
            for &i in ok.iter().take(self.confirm) {
                let hooks = twin_at(&self.point_values(&trials[i].params))?;
                let rate = refusal_eval_hooked(model, &self.tok, &self.confirm_prompts, &self.refusal, &hooks, |_, _| {})?.rate;
                trials[i].confirmed = Some(rate);
                bar.inc(1);
            }
            bar.finish_and_clear();
            best = ok
                .iter()
                .copied()
                .take(self.confirm)
                .min_by(|&a, &b| {
                    let rate = |i: usize| trials[i].confirmed.unwrap_or(f64::INFINITY);
                    rate(a).total_cmp(&rate(b)).then(trials[a].kl.total_cmp(&trials[b].kl))
                })
                .expect("ok is not empty");
        }
        let chosen = self.point_values(&trials[best].params);
        let record = SearchRecord {
            option: option.to_string(),
            method: "tpe",
            space: serde_json::json!({
                "dims": self.dims.iter().map(|d| serde_json::json!({"name": d.name, "range": [d.lo, d.hi]})).collect::<Vec<_>>(),
                "trials": self.trials, "startup": self.startup, "seed": self.seed, "confirm": self.confirm,
                "confirm_prompts": self.confirm_prompts.len(), "refusal_token_ids": self.refusal_tokens,
                "cost": "refusal_score + 10 * max(0, kl - max_kl) / max_kl",
            }),
            budget: Budget { measure: "first_token_kl_mean", max: self.max_kl, prompts: self.kl_prompts.len() },
            metric: MetricInfo { name: "refusal_score", prompts: self.harmful.len(), control_prompts: None },
            chosen: trials[best].value,
            front: front.iter().map(|&i| trials[i].value).collect(),
            trials,
            bracket: None,
        };
        Ok((record, chosen))
    }

    fn plot(&self) -> Option<&PathBuf> {
        self.plot.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_front_keeps_what_nothing_beats_on_both() {
        // (score, KL): 0 and 2 trade off; 1 is beaten by 0 on both; 3 ties 2's KL with a worse score.
        let pts = [(-3.0, 0.1), (-2.0, 0.2), (-4.0, 0.3), (-3.5, 0.3)];
        assert_eq!(pareto_front(&pts), vec![0, 2]);
        assert_eq!(pareto_front(&[(1.0, 1.0), (1.0, 1.0)]), vec![0, 1]);
    }

    #[test]
    fn cost_is_the_score_inside_the_budget_and_penalised_outside() {
        assert_eq!(cost(-2.0, 0.1, 0.2), -2.0);
        assert!((cost(-2.0, 0.4, 0.2) - 8.0).abs() < 1e-12);
    }

    #[test]
    fn values_clamp_the_mlp_weight_and_scale_min_weight() {
        let comps = vec!["attn".to_string(), "mlp".to_string()];
        let dims = space(&comps, 24, Some([10.0, 18.0]));
        assert_eq!(dims.len(), 9);
        assert_eq!((dims[0].lo, dims[0].hi), (10.0, 18.0));
        let d = dims.iter().find(|d| d.name == "mlp.max_weight").unwrap();
        assert_eq!((d.lo, d.hi), (-0.25, 1.5));
        let point: BTreeMap<String, f64> = [
            ("direction_layer", 12.5),
            ("attn.max_weight", 1.2),
            ("attn.max_weight_position", 15.0),
            ("attn.min_weight", 0.5),
            ("attn.min_weight_distance", 4.0),
            ("mlp.max_weight", -0.1),
            ("mlp.max_weight_position", 16.0),
            ("mlp.min_weight", 0.5),
            ("mlp.min_weight_distance", 3.0),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let v = values(&point, &comps, Some("refusal"));
        let k = v["kernel"].as_table().unwrap();
        assert_eq!(k["attn"]["min_weight"].as_float(), Some(0.6));
        assert_eq!(k["mlp"]["max_weight"].as_float(), Some(0.0));
        assert_eq!(k["mlp"]["min_weight"].as_float(), Some(0.0));
        assert_eq!(v["direction"]["layer"].as_float(), Some(12.5));
        assert_eq!(v["direction"]["by"].as_str(), Some("refusal"));
    }
}
