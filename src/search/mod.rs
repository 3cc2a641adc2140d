//! Searches over a pass's parameters, outside the passes (which stay a rewrite plus its twin).
//!
//! A pass option written `OPTION = "auto"` with an `auto = { .. }` table (today: bake-steering's
//! `coeff`, and `params` for its ablation kernel, see [`SEARCHABLE`]) is resolved by the compile
//! driver, the way `compile/select.rs` resolves `select = { .. }`: the pass only ever sees
//! explicit values.
//!
//! - At plan time [`extract`] checks the `auto` table and loads its prompt sets (bad input fails
//!   before any pass runs) and returns a [`ParamSearch`]; the driver also builds the pass once
//!   with [`ParamSearch::placeholder_options`] so the pass checks its other options then too.
//! - At run time, just before the pass (so on the model as the pass receives it, after earlier
//!   passes), [`ParamSearch::run`] evaluates candidates through the pass's runtime twin: build the
//!   pass with the candidate values, take `pass.twin(model)`, measure the budget and the metric
//!   under those hooks ([`objective`]). Nothing here knows what the pass does, so any pass and any
//!   option can be searched; candidate values may use the forms `compile/select.rs` resolves
//!   (e.g. `direction = { by = ID, layer = 13.4 }`: the driver hands the search a resolver, so
//!   searches know nothing of findings either). The pass is then built with the chosen values,
//!   and that is the pass that runs.
//!
//! Every search writes one trial table, [`SearchRecord`]: the manifest's `passes[i].search`
//! (`option`, `method`, `space`, `budget`, `metric`, `trials`, `chosen`, `bracket`), printed as a
//! table under the pass's line ([`SearchRecord::table`]); `plot = "curve.svg"` in the `auto`
//! table draws the trials ([`SearchRecord::plot_svg`]), written only after a successful compile.
//!
//! Searches: [`coeff`] (grid, then Brent's root finder on the KL budget's edge); [`kernel`]
//! (`params = "auto"`: TPE over bake-steering's ablation kernel and direction layer, a Pareto
//! front of refusal score vs KL, the winner confirmed by generation).

pub mod coeff;
pub mod kernel;
pub mod objective;

use std::collections::BTreeMap;

use std::path::PathBuf;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::passes::{BuildCtx, Pass, PassInfo};
use crate::runtime::Hooks;
use crate::tokenizer::Tok;

/// The options a search may choose: (pass, option). An option is searched when it is written
/// `"auto"` with an `auto` table beside it.
pub const SEARCHABLE: &[(&str, &str)] = &[("bake-steering", "coeff"), ("bake-steering", "params"), ("conditional-steer", "coeff")];

/// Options as the driver resolves them (`select`, `direction = { by }` → explicit forms).
pub type Resolve<'a> = dyn Fn(&toml::Table) -> Result<toml::Table> + 'a;

/// One search method, given only a way to get the pass's twin at candidate option values.
pub trait Search {
    /// Option values the pass accepts, to build it at plan time (checking its other options).
    fn placeholder(&self) -> toml::Table;
    /// Search on `model` (the model as the pass receives it); `twin_at(values)` is the pass's
    /// runtime twin on `model` with `values` set in its options. The record and the chosen values.
    fn run(&self, option: &str, model: &Model, twin_at: &dyn Fn(&toml::Table) -> Result<Hooks>) -> Result<(SearchRecord, toml::Table)>;
    /// Where `auto.plot` asked for the record's SVG, if it did.
    fn plot(&self) -> Option<&PathBuf>;
    /// Files to write beside the checkpoint after a successful compile (the plot).
    fn side_files(&self, record: &SearchRecord) -> Result<Vec<(PathBuf, Vec<u8>)>> {
        Ok(match self.plot() {
            Some(p) => vec![(p.clone(), record.plot_svg()?.into_bytes())],
            None => vec![],
        })
    }
}

/// One evaluated value.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Trial {
    /// The searched option's value; for a search over several parameters, the trial's number
    /// (from 1), its point in `params`.
    pub value: f64,
    /// The point of a search over several parameters (name → value).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub params: BTreeMap<String, f64>,
    /// Which step of the method evaluated it (coeff: "grid" or "refine"; kernel: "startup" or "tpe").
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
    /// A confirming measurement where made (kernel: the greedy refusal rate).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub confirmed: Option<f64>,
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
    /// "projection", "target_logprob", "refusal_rate" (maximised) or "refusal_score" (minimised).
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
    /// The trials (by `value`) on the Pareto front of metric vs KL, for multi-parameter searches.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub front: Vec<f64>,
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
        if !t.params.is_empty() {
            return format!(
                "{} = auto → trial {} of {} ({} = {:.4}{}, first-token KL {:.4} ≤ {} over {} prompts)",
                self.option,
                self.chosen,
                self.trials.len(),
                self.metric.name,
                t.metric.unwrap_or(f64::NAN),
                t.confirmed.map_or(String::new(), |r| format!(", refusal rate {r:.3}")),
                t.kl,
                self.budget.max,
                self.budget.prompts,
            );
        }
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

    /// The trials as a table, by |value| (multi-parameter searches: in order, with their
    /// points), the chosen one marked.
    pub fn table(&self) -> String {
        if self.trials.iter().any(|t| !t.params.is_empty()) {
            return self.params_table();
        }
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

    fn params_table(&self) -> String {
        let names: Vec<&String> = self.trials[0].params.keys().collect();
        let mut s = format!("{:>5} {:>7} {:>8} {:>8} {:>13} {:>7}", "trial", "stage", "KL mean", "KL max", self.metric.name, "rate");
        for n in &names {
            s += &format!(" {:>8}", short(n));
        }
        s += "\n";
        for p in &self.trials {
            let rate = p.confirmed.map_or("-".to_string(), |r| format!("{r:.3}"));
            s += &format!("{:>5} {:>7} {:>8.4} {:>8.4} {:>13.4} {:>7}", p.value, p.stage, p.kl, p.kl_max, p.metric.unwrap_or(f64::NAN), rate);
            for n in &names {
                s += &format!(" {:>8.3}", p.params[*n]);
            }
            let on_front = self.front.contains(&p.value);
            s += match (p.value == self.chosen, on_front, p.within_budget) {
                (true, _, _) => "  <- chosen",
                (_, true, true) => "  (front)",
                (_, true, false) => "  (front, over budget)",
                (_, false, false) => "  (over budget)",
                _ => "",
            };
            s += "\n";
        }
        s
    }

    /// The trade-off curve (metric, control, KL and the budget against the value) as an SVG;
    /// for multi-parameter searches the Pareto front, metric against KL.
    pub fn plot_svg(&self) -> Result<String> {
        if self.trials.iter().any(|t| !t.params.is_empty()) {
            let mut front: Vec<(f64, f64)> = self.trials.iter().filter(|t| self.front.contains(&t.value)).map(|t| (t.kl, t.metric.unwrap_or(f64::NAN))).collect();
            front.sort_by(|a, b| a.0.total_cmp(&b.0));
            let (lo, hi) = self.trials.iter().filter_map(|t| t.metric).fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), m| (a.min(m), b.max(m)));
            let series = vec![
                ("Pareto front".to_string(), front),
                (format!("KL budget {}", self.budget.max), vec![(self.budget.max, lo), (self.budget.max, hi)]),
            ];
            return crate::report::lines_svg(&series, &format!("{} = auto: trial {} chosen", self.option, self.chosen), "first-token KL, mean (nats)", self.metric.name);
        }
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

/// "attn.max_weight" → "a.maxw": short column names for the trial table.
fn short(name: &str) -> String {
    name.replace("attn.", "a.")
        .replace("mlp.", "m.")
        .replace("max_weight_position", "pos")
        .replace("min_weight_distance", "dist")
        .replace("max_weight", "maxw")
        .replace("min_weight", "minw")
        .replace("direction_layer", "dir.L")
}

/// Builds one pass with searched option values: the pass's options without the search's keys,
/// and what `build` needs to be called again at run time.
pub struct Builder {
    pub info: &'static PassInfo,
    pub option: String,
    /// The options as written (before the driver resolves them), without `auto` and without
    /// the searched option.
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

    /// The pass's options with `values` set, resolved.
    pub fn options_at(&self, values: &toml::Table, resolve: &Resolve) -> Result<toml::Table> {
        let mut t = self.base.clone();
        t.extend(values.clone());
        resolve(&t)
    }

    /// The pass with `values` set, its options checked against `source`.
    pub fn build(&self, values: &toml::Table, source: &Model, resolve: &Resolve) -> Result<Box<dyn Pass>> {
        let cx = BuildCtx { source, base_dir: &self.base_dir, tok: self.tok.as_ref(), progress: self.progress };
        (self.info.build)(&self.options_at(values, resolve)?, &cx)
    }
}

/// A search found in a pass's options at plan time, run by the driver just before the pass.
pub struct ParamSearch {
    pub builder: Builder,
    pub search: Box<dyn Search>,
}

impl ParamSearch {
    /// Options to build the pass with at plan time, before the search can run.
    pub fn placeholder_options(&self, resolve: &Resolve) -> Result<toml::Table> {
        self.builder.options_at(&self.search.placeholder(), resolve)
    }

    /// Search on `model` (the model as the pass receives it; passes are built against `source`,
    /// as at plan time); then the pass built with the chosen values, its options as written with
    /// the chosen values set (unresolved: the driver resolves and records them), and the record.
    pub fn run(&self, model: &Model, source: &Model, resolve: &Resolve) -> Result<(Box<dyn Pass>, toml::Table, SearchRecord)> {
        let twin_at = |v: &toml::Table| self.builder.build(v, source, resolve)?.twin(model);
        let (record, chosen) = self.search.run(&self.builder.option, model, &twin_at)?;
        let pass = self.builder.build(&chosen, source, resolve)?;
        let mut written = self.builder.base.clone();
        written.extend(chosen);
        Ok((pass, written, record))
    }

    pub fn side_files(&self, record: &SearchRecord) -> Result<Vec<(PathBuf, Vec<u8>)>> {
        self.search.side_files(record)
    }
}

/// The search a pass's options ask for, if any (see the module documentation): `auto` is checked
/// and its prompt sets loaded here. `raw` are the options as written; `resolve` makes their
/// `select` / `direction = { by }` forms explicit.
pub fn extract(pass: &str, raw: &toml::Table, resolve: &Resolve, cx: &BuildCtx) -> Result<Option<ParamSearch>> {
    let searchable: Vec<&str> = SEARCHABLE.iter().filter(|(p, _)| *p == pass).map(|(_, o)| *o).collect();
    if searchable.is_empty() {
        // The pass has no searchable option; an `auto` key is then the pass's unknown field.
        return Ok(None);
    }
    let autos: Vec<&str> = searchable.iter().copied().filter(|o| matches!(raw.get(*o), Some(toml::Value::String(s)) if s == "auto")).collect();
    let option = match autos.as_slice() {
        [] => searchable.join(" or "),
        [one] => one.to_string(),
        _ => return Err(Error::invalid(format!("{} are all \"auto\": search one at a time", autos.join(" and ")))),
    };
    let option = option.as_str();
    let is_auto = autos.len() == 1;
    let table = match (is_auto, raw.get("auto")) {
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
    let mut base = raw.clone();
    base.remove("auto");
    base.remove(option);
    let search: Box<dyn Search> = match option {
        "coeff" => Box::new(coeff::CoeffSearch::from_table(table, &resolve(raw)?, cx)?),
        _ => Box::new(kernel::KernelSearch::from_table(table, &base, cx)?),
    };
    let info = crate::passes::find(pass).ok_or_else(|| Error::invalid(format!("unknown pass `{pass}`")))?;
    let builder = Builder::new(info, option, base, cx);
    Ok(Some(ParamSearch { builder, search }))
}
