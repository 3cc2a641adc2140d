//! What a search measures at a candidate: the budget's first-token KL(unchanged ‖ changed) over
//! neutral prompts, and the metric it maximises (and a control), all on the model as the pass
//! receives it with the pass's twin hooked in. The evaluators are those of `verify`
//! (`refusal::first_token_kl_fn`, `steer::projection_hooked`, `steer::target_logprob_hooked`,
//! `refusal::refusal_eval_hooked`); this file holds their prompt sets, loaded at plan time.

use candle_core::Tensor;

use crate::data::SetSpec;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::passes::BuildCtx;
use crate::runtime::Hooks;
use crate::tokenizer::Tok;
use crate::verify::refusal::RefusalOpts;

/// The `auto` table's keys about what is measured (see bake-steering's doc).
pub struct ObjectiveOpts<'a> {
    pub kl_prompts: &'a str,
    pub metric: Option<&'a str>,
    pub metric_prompts: Option<&'a str>,
    pub control_prompts: Option<&'a str>,
    pub targets: &'a [String],
    pub limit: usize,
    pub chat: bool,
    pub max_tokens: usize,
    pub batch: usize,
}

/// What a search maximises, with its prompts ready.
pub enum Metric {
    /// Mean last-token resid_post of the last layer on the unit direction.
    Projection { unit: Vec<f64>, prompts: Vec<Vec<u32>>, control: Option<Vec<Vec<u32>>> },
    /// Mean log-prob of the target tokens at the next-token position.
    Target { prompts: Vec<Vec<u32>>, control: Option<Vec<Vec<u32>>>, targets: Vec<u32> },
    /// Refusal-phrase rate of greedy completions.
    Refusal { tok: Tok, prompts: Vec<String>, control: Option<Vec<String>>, opts: RefusalOpts },
}

/// The budget's prompts and the metric.
pub struct Objective {
    pub kl_prompts: Vec<Vec<u32>>,
    pub metric: Metric,
    pub batch: usize,
}

fn invalid(m: impl Into<String>) -> Error {
    Error::invalid(m)
}

impl Objective {
    /// Load the prompt sets (relative paths against the pipeline's directory). `direction` is
    /// the direction the `projection` metric projects on (None: that metric is refused).
    pub fn load(o: &ObjectiveOpts, direction: Option<&dyn Fn() -> Result<Tensor>>, cx: &BuildCtx) -> Result<Objective> {
        if o.batch == 0 {
            return Err(invalid("`auto.batch` must be at least 1"));
        }
        let tok = cx.tok.ok_or_else(|| invalid("coeff = \"auto\" needs the model's tokenizer (tokenizer.json) to read its prompts"))?;
        let load = |key: &str, s: &str| -> Result<Vec<String>> {
            let mut spec = SetSpec::parse(s);
            spec.path = cx.path(&spec.path.to_string_lossy());
            let set = crate::data::TextSet::load(&spec, o.limit).map_err(|e| invalid(format!("`auto.{key}`: {e}")))?;
            if set.texts.is_empty() {
                return Err(invalid(format!("`auto.{key}`: no prompts in {spec}")));
            }
            Ok(set.texts)
        };
        let ids = |texts: &[String]| tok.prompts_ids(texts, o.chat);
        let kl_texts = load("kl_prompts", o.kl_prompts)?;
        let metric_texts = match o.metric_prompts {
            Some(p) => load("metric_prompts", p)?,
            None => kl_texts.clone(),
        };
        let control = o.control_prompts.map(|p| load("control_prompts", p)).transpose()?;
        let metric = match o.metric.unwrap_or("projection") {
            "projection" => {
                let dir = direction.ok_or_else(|| invalid("`auto.metric` = \"projection\" needs a pass with a `direction`"))?;
                let unit = crate::verify::steer::unit_f64(&dir()?)?;
                Metric::Projection { unit, prompts: ids(&metric_texts)?, control: control.as_deref().map(ids).transpose()? }
            }
            "target" => {
                if o.targets.is_empty() {
                    return Err(invalid("`auto.metric` = \"target\" needs `auto.targets` (e.g. [\" happy\"])"));
                }
                let targets = crate::verify::steer::target_tokens(tok, o.targets)?.into_iter().map(|t| t.token_id).collect();
                Metric::Target { prompts: ids(&metric_texts)?, control: control.as_deref().map(ids).transpose()?, targets }
            }
            "refusal" => {
                if o.metric_prompts.is_none() {
                    return Err(invalid("`auto.metric` = \"refusal\" needs `auto.metric_prompts` (e.g. harmful instructions)"));
                }
                if o.max_tokens == 0 {
                    return Err(invalid("`auto.max_tokens` must be at least 1"));
                }
                let opts = RefusalOpts { max_tokens: o.max_tokens, batch: o.batch, chat: o.chat, ..Default::default() };
                Metric::Refusal { tok: tok.clone(), prompts: metric_texts, control, opts }
            }
            other => return Err(invalid(format!("unknown `auto.metric` = \"{other}\" (metrics: projection, target, refusal)"))),
        };
        if o.metric != Some("target") && !o.targets.is_empty() {
            return Err(invalid("`auto.targets` applies only to metric = \"target\""));
        }
        Ok(Objective { kl_prompts: ids(&kl_texts)?, metric, batch: o.batch })
    }

    pub fn metric_name(&self) -> &'static str {
        match self.metric {
            Metric::Projection { .. } => "projection",
            Metric::Target { .. } => "target_logprob",
            Metric::Refusal { .. } => "refusal_rate",
        }
    }

    pub fn metric_prompts(&self) -> usize {
        match &self.metric {
            Metric::Projection { prompts, .. } | Metric::Target { prompts, .. } => prompts.len(),
            Metric::Refusal { prompts, .. } => prompts.len(),
        }
    }

    pub fn control_prompts(&self) -> Option<usize> {
        match &self.metric {
            Metric::Projection { control, .. } | Metric::Target { control, .. } => control.as_ref().map(Vec::len),
            Metric::Refusal { control, .. } => control.as_ref().map(Vec::len),
        }
    }

    /// The budget's measure as a function of the hooks: (mean, max) first-token KL over the KL
    /// prompts against `model` without hooks (computed once).
    pub fn kl_fn<'a>(&'a self, model: &'a Model) -> impl FnMut(&Hooks) -> Result<(f64, f64)> + 'a {
        crate::verify::refusal::first_token_kl_fn(model, &self.kl_prompts, self.batch)
    }

    /// (metric, control metric) on `model` with `hooks`.
    pub fn metric(&self, model: &Model, hooks: &Hooks) -> Result<(f64, Option<f64>)> {
        use crate::verify::steer::{projection_hooked, target_logprob_hooked};
        let b = self.batch;
        match &self.metric {
            Metric::Projection { unit, prompts, control } => Ok((
                projection_hooked(model, hooks, unit, prompts, b)?,
                control.as_ref().map(|p| projection_hooked(model, hooks, unit, p, b)).transpose()?,
            )),
            Metric::Target { prompts, control, targets } => Ok((
                target_logprob_hooked(model, hooks, prompts, targets, b)?,
                control.as_ref().map(|p| target_logprob_hooked(model, hooks, p, targets, b)).transpose()?,
            )),
            Metric::Refusal { tok, prompts, control, opts } => {
                let rate = |p: &[String]| -> Result<f64> { Ok(crate::verify::refusal::refusal_eval_hooked(model, tok, p, opts, hooks, |_, _| {})?.rate) };
                Ok((rate(prompts)?, control.as_deref().map(rate).transpose()?))
            }
        }
    }
}
