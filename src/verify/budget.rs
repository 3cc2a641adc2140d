//! Behaviour budgets: the `[verify]` table of a pipeline. After the last pass the compiled model
//! is diffed against its source on the given prompts/text, the metrics are measured, and every
//! budget is checked; one violated budget fails the compile (nothing is written).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::diff::{PromptsDiff, TextDiff};
use crate::error::{Error, Result};

fn d_limit() -> usize {
    100
}
fn d_tokens() -> usize {
    2048
}
fn d_seq_len() -> usize {
    512
}
fn d_batch() -> usize {
    8
}
fn d_gen() -> usize {
    64
}
fn yes() -> bool {
    true
}

/// `[verify]`: what to measure on, and the budgets.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    /// Neutral prompts as FILE[:FIELD] (relative to the pipeline file), for KL and agreement.
    pub prompts: Option<String>,
    /// How many of them (0 = all).
    #[serde(default = "d_limit")]
    pub limit: usize,
    /// Apply the chat template to the prompts.
    #[serde(default)]
    pub chat: bool,
    /// Text file for perplexity (relative to the pipeline file).
    pub text: Option<String>,
    /// Tokens of the text to use.
    #[serde(default = "d_tokens")]
    pub tokens: usize,
    /// Perplexity window (disjoint windows).
    #[serde(default = "d_seq_len")]
    pub seq_len: usize,
    #[serde(default = "d_batch")]
    pub batch_size: usize,

    /// Max mean KL(source‖compiled) of the first generated token over the prompts (nats).
    pub max_kl: Option<f64>,
    /// Max mean KL over every prompt position.
    pub max_kl_all: Option<f64>,
    /// Min share of prompts whose first generated token (greedy) is unchanged, in [0, 1].
    pub min_top1: Option<f64>,
    /// Max perplexity(compiled) / perplexity(source) on the text.
    pub max_ppl_ratio: Option<f64>,

    /// `[verify.refusal]`: refusal rate of the compiled model (and, for the report, the source).
    pub refusal: Option<RefusalBudget>,
    /// `[verify.edit]`: knowledge-edit metrics of the compiled model (and the source).
    pub edit: Option<EditBudget>,
    /// `[verify.steer]`: the steering score of the compiled model (and the source).
    pub steer: Option<SteerBudget>,
}

/// The behaviour score of `mechc eval steer` at c = 0, on the compiled model and on the source
/// (`steer_score`, `steer_score_source`, `steer_gain` = their difference): did the baked shift
/// move the model along the direction (projection) or toward the targets (target log-prob)?
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SteerBudget {
    /// Prompts, FILE[:FIELD], relative to the pipeline file.
    pub prompts: String,
    #[serde(default = "d_limit")]
    pub limit: usize,
    #[serde(default)]
    pub chat: bool,
    /// The direction: FILE.safetensors[:TENSOR] relative to the pipeline file, or
    /// `{ by = ID [, layer = L] }` naming a `[[locate]]` direction step.
    pub direction: DirectionRef,
    /// projection (default) or target.
    pub metric: Option<crate::verify::steer::SteerMetric>,
    /// For metric = "target": strings whose first token's log-prob is scored.
    #[serde(default)]
    pub targets: Vec<String>,
    /// Layer whose last-token resid_post is projected (default: the last).
    pub measure_layer: Option<usize>,
    pub min_score: Option<f64>,
    pub min_gain: Option<f64>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum DirectionRef {
    File(String),
    Found(crate::ir::findings::FromDirection),
}

/// Refusal rate on an instruction set, greedy, chat template (see `mechc eval refusal`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RefusalBudget {
    /// FILE[:FIELD], relative to the pipeline file.
    pub prompts: String,
    /// First N prompts (0 = all).
    #[serde(default)]
    pub limit: usize,
    #[serde(default = "d_gen")]
    pub max_tokens: usize,
    #[serde(default = "yes")]
    pub chat: bool,
    /// Bounds on the share of prompts refused, in [0, 1].
    pub min_rate: Option<f64>,
    pub max_rate: Option<f64>,
}

/// CounterFact-style edit metrics (see `mechc eval edit`); rates in percent.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct EditBudget {
    /// Records file, relative to the pipeline file.
    pub records: String,
    /// Only these record ids (`case_id` values); default: the first `limit`.
    #[serde(default)]
    pub ids: Vec<String>,
    #[serde(default = "d_limit")]
    pub limit: usize,
    pub min_score: Option<f64>,
    pub min_efficacy: Option<f64>,
    pub min_paraphrase: Option<f64>,
    pub min_neighbourhood: Option<f64>,
}

/// One budget and what was measured.
#[derive(Debug, Clone, Serialize)]
pub struct BudgetCheck {
    pub budget: String,
    pub bound: f64,
    pub metric: String,
    pub measured: f64,
    pub ok: bool,
}

impl VerifySpec {
    /// (budget key as `[section.]key`, bound, metric it bounds, is an upper bound).
    fn budgets(&self) -> Vec<(&'static str, f64, &'static str, bool)> {
        let r = self.refusal.as_ref();
        let e = self.edit.as_ref();
        let s = self.steer.as_ref();
        [
            ("max_kl", self.max_kl, "kl_first_mean", true),
            ("max_kl_all", self.max_kl_all, "kl_all_mean", true),
            ("min_top1", self.min_top1, "top1_first", false),
            ("max_ppl_ratio", self.max_ppl_ratio, "ppl_ratio", true),
            ("refusal.min_rate", r.and_then(|r| r.min_rate), "refusal_rate", false),
            ("refusal.max_rate", r.and_then(|r| r.max_rate), "refusal_rate", true),
            ("edit.min_score", e.and_then(|e| e.min_score), "edit_score", false),
            ("edit.min_efficacy", e.and_then(|e| e.min_efficacy), "edit_efficacy", false),
            ("edit.min_paraphrase", e.and_then(|e| e.min_paraphrase), "edit_paraphrase", false),
            ("edit.min_neighbourhood", e.and_then(|e| e.min_neighbourhood), "edit_neighbourhood", false),
            ("steer.min_score", s.and_then(|s| s.min_score), "steer_score", false),
            ("steer.min_gain", s.and_then(|s| s.min_gain), "steer_gain", false),
        ]
        .into_iter()
        .filter_map(|(k, b, m, up)| b.map(|b| (k, b, m, up)))
        .collect()
    }

    /// Budgets that need data the table does not name are configuration errors.
    pub fn validate(&self, file: &std::path::Path) -> Result<()> {
        for (key, bound, metric, _) in self.budgets() {
            if !bound.is_finite() {
                return Err(Error::config(file, format!("verify.{key}"), "must be a finite number"));
            }
            if key.contains('.') {
                continue; // task budgets carry their own data
            }
            let needs_text = metric.starts_with("ppl");
            if needs_text && self.text.is_none() {
                return Err(Error::config(file, format!("verify.{key}"), "needs `text` (a file to measure perplexity on)"));
            }
            if !needs_text && self.prompts.is_none() {
                return Err(Error::config(file, format!("verify.{key}"), "needs `prompts` (FILE[:FIELD])"));
            }
        }
        Ok(())
    }

    pub fn check(&self, metrics: &BTreeMap<String, f64>) -> Vec<BudgetCheck> {
        self.budgets()
            .into_iter()
            .map(|(key, bound, metric, upper)| {
                let measured = metrics.get(metric).copied().unwrap_or(f64::NAN);
                let ok = if upper { measured <= bound } else { measured >= bound };
                BudgetCheck { budget: key.to_string(), bound, metric: metric.to_string(), measured, ok }
            })
            .collect()
    }
}

/// The named metrics of a source-vs-compiled diff.
pub fn metrics(p: Option<&PromptsDiff>, t: Option<&TextDiff>) -> BTreeMap<String, f64> {
    let mut m = BTreeMap::new();
    if let Some(p) = p {
        m.insert("kl_first_mean".into(), p.first.kl_mean);
        m.insert("kl_first_max".into(), p.first.kl_max);
        m.insert("kl_all_mean".into(), p.all.kl_mean);
        m.insert("top1_first".into(), p.first.top1_agreement);
        m.insert("top1_all".into(), p.all.top1_agreement);
    }
    if let Some(t) = t {
        m.insert("ppl_source".into(), t.perplexity_a);
        m.insert("ppl_compiled".into(), t.perplexity_b);
        m.insert("ppl_ratio".into(), t.perplexity_ratio);
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets_check_both_directions_and_nan_fails() {
        let spec: VerifySpec = toml::from_str("prompts = \"p.json\"\nmax_kl = 0.1\nmin_top1 = 0.9").unwrap();
        let mut m = BTreeMap::new();
        m.insert("kl_first_mean".to_string(), 0.05);
        m.insert("top1_first".to_string(), 0.85);
        let c = spec.check(&m);
        assert_eq!(c.iter().map(|c| (c.budget.as_str(), c.ok)).collect::<Vec<_>>(), [("max_kl", true), ("min_top1", false)]);
        m.insert("kl_first_mean".to_string(), f64::NAN);
        assert!(!spec.check(&m)[0].ok, "an unmeasurable metric never passes");
        let no_text: VerifySpec = toml::from_str("max_ppl_ratio = 1.1").unwrap();
        assert!(no_text.validate(std::path::Path::new("p.toml")).unwrap_err().to_string().contains("needs `text`"));
        assert!(toml::from_str::<VerifySpec>("max_kll = 1").is_err());
    }
}
