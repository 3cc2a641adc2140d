//! Searches over a pass's parameters, outside the passes (which stay a rewrite plus its twin).
//!
//! A pass option written `OPTION = "auto"` with an `auto = { .. }` table (today: bake-steering's
//! `coeff`, see [`SEARCHABLE`]) is resolved by the compile driver, the way `compile/select.rs`
//! resolves `select = { .. }`: the pass only ever sees an explicit number.
//!
//! - At plan time [`extract`] checks the `auto` table and loads its prompt sets (bad input fails
//!   before any pass runs) and returns a [`ParamSearch`]; the driver also builds the pass once
//!   with [`ParamSearch::placeholder_options`] so the pass checks its other options then too.
//! - At run time, just before the pass (so on the model as the pass receives it, after earlier
//!   passes), [`ParamSearch::run`] evaluates candidates through the pass's runtime twin: build the
//!   pass with the candidate value, take `pass.twin(model)`, measure the budget and the metric
//!   under those hooks ([`objective`]). Nothing here knows what the pass does, so any pass and any
//!   scalar option can be searched. The pass is then built with the chosen value, and that is
//!   the pass that runs.
//!
//! Every search writes one trial table, [`SearchRecord`]: the manifest's `passes[i].search`
//! (`option`, `method`, `space`, `budget`, `metric`, `trials`, `chosen`, `bracket`), printed as a
//! table under the pass's line ([`SearchRecord::table`]); `plot = "curve.svg"` in the `auto`
//! table draws the trials ([`SearchRecord::plot_svg`]), written only after a successful compile.
//!
//! Searches: [`coeff`] (grid, then Brent's root finder on the KL budget's edge).

pub mod coeff;
pub mod objective;

use std::path::PathBuf;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::passes::{BuildCtx, Pass, PassInfo};
use crate::runtime::Hooks;
use crate::tokenizer::Tok;

/// The options a search may choose: (pass, option). An option is searched when it is written
/// `"auto"` with an `auto` table beside it.
pub const SEARCHABLE: &[(&str, &str)] = &[("bake-steering", "coeff")];

/// One search method over one scalar option, given only a way to get the pass's twin at a value.
pub trait Search {
    /// A value the pass accepts, to build it at plan time (checking its other options).
    fn placeholder(&self) -> f64;
    /// Search on `model` (the model as the pass receives it); `twin_at(v)` is the pass's runtime
    /// twin on `model` with `option` = v.
    fn run(&self, option: &str, model: &Model, twin_at: &dyn Fn(f64) -> Result<Hooks>) -> Result<SearchRecord>;
    /// Files to write beside the checkpoint after a successful compile (e.g. the curve).
    fn side_files(&self, record: &SearchRecord) -> Result<Vec<(PathBuf, Vec<u8>)>>;
}

/// One evaluated value.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Trial {
    pub value: f64,
    /// Which step of the method evaluated it (coeff: "grid" or "refine").
    pub stage: &'static str,
    /// The budget's measure: mean first-token KL (nats) over the budget's prompts.
    pub kl: f64,
    /// Its largest value over the prompts.
    pub kl_max: f64,
    pub within_budget: bool,
    /// The metric on the metric prompts, where evaluated.
    pub metric: Option<f64>,
    /// The metric on the control prompts, where given and evaluated.
    pub control: Option<f64>,
}

/// The budget a search keeps.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Budget {
    /// What is bounded: "first_token_kl_mean" (KL(unchanged ‖ changed) of the next-token
    /// distributions after each prompt, mean over prompts).
    pub measure: &'static str,
    pub max: f64,
    pub prompts: usize,
}

/// What a search maximises.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MetricInfo {
    /// "projection", "target_logprob" or "refusal_rate".
    pub name: &'static str,
    pub prompts: usize,
    /// Prompts the metric is also measured on and reported, not optimised.
    pub control_prompts: Option<usize>,
}

/// The record of a search: `passes[i].search` in the manifest, one format for every search.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct SearchRecord {
    /// The option chosen (e.g. "coeff").
    pub option: String,
    /// e.g. "grid+brent".
    pub method: &'static str,
    /// The method's settings (coeff: range, grid, tol).
    pub space: serde_json::Value,
    pub budget: Budget,
    pub metric: MetricInfo,
    /// Every evaluation in the order made.
    pub trials: Vec<Trial>,
    /// The value the pass was built with.
    pub chosen: f64,
    /// (largest evaluated value within budget, nearest evaluated value beyond it that is not);
    /// None if the budget does not bind inside the space.
    pub bracket: Option<[f64; 2]>,
}

impl SearchRecord {
    /// The trial of the chosen value (the first one with its metric).
    pub fn chosen_trial(&self) -> &Trial {
        self.trials
            .iter()
            .find(|t| t.value == self.chosen && t.metric.is_some())
            .or_else(|| self.trials.iter().find(|t| t.value == self.chosen))
            .expect("the chosen value is a trial")
    }

    /// One line for the pass's summary.
    pub fn summary(&self) -> String {
        let t = self.chosen_trial();
        format!(
            "{} = auto → {:.4} ({} = {:.4}, first-token KL {:.4} ≤ {} over {} prompts, {} evaluations)",
            self.option,
            self.chosen,
            self.metric.name,
            t.metric.unwrap_or(f64::NAN),
            t.kl,
            self.budget.max,
            self.budget.prompts,
            self.trials.len()
        )
    }

    /// The trials as a table, by |value|, the chosen one marked.
    pub fn table(&self) -> String {
        let mut pts = self.trials.clone();
        pts.sort_by(|a, b| a.value.abs().total_cmp(&b.value.abs()));
        let has_ctl = pts.iter().any(|p| p.control.is_some());
        let mut s = format!(
            "{:>10} {:>7} {:>10} {:>10} {:>12}{}\n",
            self.option,
            "stage",
            "KL mean",
            "KL max",
            self.metric.name,
            if has_ctl { format!(" {:>12}", "control") } else { String::new() }
        );
        for p in &pts {
            let mark = if p.value == self.chosen {
                "  <- chosen"
            } else if !p.within_budget {
                "  (over budget)"
            } else {
                ""
            };
            let m = p.metric.map(|m| format!("{m:.4}")).unwrap_or_else(|| "-".into());
            let c = if has_ctl { format!(" {:>12}", p.control.map(|m| format!("{m:.4}")).unwrap_or_else(|| "-".into())) } else { String::new() };
            s += &format!("{:>10.4} {:>7} {:>10.4} {:>10.4} {:>12}{c}{mark}\n", p.value, p.stage, p.kl, p.kl_max, m);
        }
        s
    }

    /// The trade-off curve (metric, control, KL and the budget against the value) as an SVG.
    pub fn plot_svg(&self) -> Result<String> {
        let mut pts = self.trials.clone();
        pts.sort_by(|a, b| a.value.total_cmp(&b.value));
        let series = |f: &dyn Fn(&Trial) -> Option<f64>| -> Vec<(f64, f64)> { pts.iter().filter_map(|p| f(p).map(|y| (p.value, y))).collect() };
        let name = self.metric.name;
        let mut s = vec![(format!("{name} (metric prompts)"), series(&|p| p.metric))];
        if pts.iter().any(|p| p.control.is_some()) {
            s.push((format!("{name} (control prompts)"), series(&|p| p.control)));
        }
        s.push(("first-token KL, mean (nats)".to_string(), series(&|p| Some(p.kl))));
        let (x0, x1) = (pts[0].value, pts[pts.len() - 1].value);
        s.push((format!("KL budget {}", self.budget.max), vec![(x0, self.budget.max), (x1, self.budget.max)]));
        crate::report::lines_svg(&s, &format!("{} = auto: chosen {:.4}", self.option, self.chosen), &self.option, "")
    }
}

/// Builds one pass with one option set to a value: the pass's options without the search's
/// keys, and what `build` needs to be called again at run time.
pub struct Builder {
    pub info: &'static PassInfo,
    pub option: String,
    /// The options without `auto` and without the searched option.
    pub base: toml::Table,
    base_dir: PathBuf,
    tok: Option<Tok>,
    progress: bool,
}

impl Builder {
    /// `info`'s pass with `option` chosen by a search; `base` its other options; `cx` what
    /// `build` will be given again (its `source` is replaced by the one [`Builder::build`] gets).
    pub fn new(info: &'static PassInfo, option: &str, base: toml::Table, cx: &BuildCtx) -> Builder {
        Builder { info, option: option.to_string(), base, base_dir: cx.base_dir.to_path_buf(), tok: cx.tok.cloned(), progress: cx.progress }
    }

    /// The pass's options with the option at `value`.
    pub fn options_at(&self, value: f64) -> toml::Table {
        let mut t = self.base.clone();
        t.insert(self.option.clone(), toml::Value::Float(value));
        t
    }

    /// The pass with the option at `value`, its options checked against `source`.
    pub fn build(&self, value: f64, source: &Model) -> Result<Box<dyn Pass>> {
        let cx = BuildCtx { source, base_dir: &self.base_dir, tok: self.tok.as_ref(), progress: self.progress };
        (self.info.build)(&self.options_at(value), &cx)
    }
}

/// A search found in a pass's options at plan time, run by the driver just before the pass.
pub struct ParamSearch {
    pub builder: Builder,
    pub search: Box<dyn Search>,
}

impl ParamSearch {
    /// Options to build the pass with at plan time, before the search can run.
    pub fn placeholder_options(&self) -> toml::Table {
        self.builder.options_at(self.search.placeholder())
    }

    /// Search on `model` (the model as the pass receives it; passes are built against `source`,
    /// as at plan time); then the pass built with the chosen value, its options, and the record.
    pub fn run(&self, model: &Model, source: &Model) -> Result<(Box<dyn Pass>, toml::Table, SearchRecord)> {
        let twin_at = |v: f64| self.builder.build(v, source)?.twin(model);
        let record = self.search.run(&self.builder.option, model, &twin_at)?;
        let pass = self.builder.build(record.chosen, source)?;
        Ok((pass, self.builder.options_at(record.chosen), record))
    }

    pub fn side_files(&self, record: &SearchRecord) -> Result<Vec<(PathBuf, Vec<u8>)>> {
        self.search.side_files(record)
    }
}

/// The search a pass's options ask for, if any (see the module documentation): `auto` is checked
/// and its prompt sets loaded here. `options` are those after `select` / `direction = { by }`.
pub fn extract(pass: &str, options: &toml::Table, cx: &BuildCtx) -> Result<Option<ParamSearch>> {
    let Some(&(_, option)) = SEARCHABLE.iter().find(|(p, _)| *p == pass) else {
        // The pass has no searchable option; an `auto` key is then the pass's unknown field.
        return Ok(None);
    };
    let is_auto = matches!(options.get(option), Some(toml::Value::String(s)) if s == "auto");
    let table = match (is_auto, options.get("auto")) {
        (false, None) => return Ok(None),
        (false, Some(_)) => return Err(Error::invalid(format!("`auto` applies only with {option} = \"auto\""))),
        (true, None) => {
            return Err(Error::invalid(format!(
                "`{option} = \"auto\"` needs an `auto` table, e.g. auto = {{ max_kl = 0.5, kl_prompts = \"harmless.json:instruction\", range = [0, 4] }}"
            )))
        }
        (true, Some(toml::Value::Table(t))) => t,
        (true, Some(other)) => return Err(Error::invalid(format!("`auto` must be a table, found {other}"))),
    };
    let search = coeff::CoeffSearch::from_table(table, options, cx)?;
    let info = crate::passes::find(pass).ok_or_else(|| Error::invalid(format!("unknown pass `{pass}`")))?;
    let mut base = options.clone();
    base.remove("auto");
    base.remove(option);
    let builder = Builder::new(info, option, base, cx);
    Ok(Some(ParamSearch { builder, search: Box::new(search) }))
}
