//! `OPTION = "auto"` over one scalar option (today bake-steering's `coeff`): the value that
//! maximises a behaviour metric subject to a budget on the mean first-token KL(unchanged ‖
//! changed) over neutral prompts, every candidate measured with the pass's runtime twin on the
//! model as the pass receives it, never by rewriting weights per candidate.
//!
//! The `auto` table (bake-steering's doc lists every key): `max_kl`, `kl_prompts`, `range`
//! (required); `metric`, `metric_prompts`, `control_prompts`, `targets`, `limit`, `chat`,
//! `max_tokens`, `grid`, `tol`, `batch`, `plot`.
//!
//! The search ([`search`]), over a range [lo, hi] of one sign (|c| grows from the end nearer 0):
//!
//! 1. a grid of `grid` evenly spaced values from lo to hi: the KL at each (one forward over
//!    the KL prompts) and the metric at each (so the record holds the whole trade-off curve);
//! 2. if even the near end breaks the budget, the search fails ("budget unreachable");
//! 3. the KL is close to monotone in |c|, so the feasible set is an interval starting at the near
//!    end: the first grid point that breaks the budget and the feasible one before it bracket its
//!    edge, which Brent's root finder (argmin's `BrentRoot`: bisection's guarantee, secant /
//!    inverse quadratic speed, ~5–8 KL evaluations to a 2 % bracket) places on
//!    KL(c) − max_kl = 0. Root finding rather than minimising a penalised objective because the
//!    constraint is what binds: the metric usually rises with |c|, so the best feasible c sits on
//!    the budget's edge, and a root finder finds that edge with a bracket we can report;
//! 4. the chosen c is, among every evaluated value within budget *on that interval* (grid
//!    points before the first violation, and the largest in-budget point of the refinement), the
//!    one with the highest metric; ties go to the smaller |c| (less KL for the same behaviour).
//!
//! Grid points past the first violation that happen to be within budget again are recorded but
//! never chosen: a model that breaks and then recovers as c grows is not one to trust.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;

use argmin::core::{CostFunction, Executor};
use argmin::solver::brent::BrentRoot;
use serde::Deserialize;

use super::objective::{Objective, ObjectiveOpts};
use super::{Budget, MetricInfo, Search, SearchRecord, Trial};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::passes::BuildCtx;
use crate::runtime::Hooks;

/// What to search.
#[derive(Debug, Clone)]
pub struct SearchSpec {
    /// Budget on the mean first-token KL (nats).
    pub max_kl: f64,
    /// [lo, hi], one sign (0 allowed at either end), lo < hi.
    pub range: (f64, f64),
    /// Grid points, ≥ 2, ends included.
    pub grid: usize,
    /// Refinement stops when the bracket is narrower than `tol` × |its outer end|.
    pub tol: f64,
}

impl SearchSpec {
    pub fn validate(&self) -> Result<()> {
        let (lo, hi) = self.range;
        if !(lo.is_finite() && hi.is_finite() && lo < hi) {
            return Err(Error::invalid(format!("`auto.range` = [{lo}, {hi}]: need finite lo < hi")));
        }
        if lo < 0.0 && hi > 0.0 {
            return Err(Error::invalid(format!(
                "`auto.range` = [{lo}, {hi}] crosses 0: search one sign (e.g. [0, {hi}]; for the other sign use [{lo}, 0])"
            )));
        }
        if !(self.max_kl > 0.0 && self.max_kl.is_finite()) {
            return Err(Error::invalid(format!("`auto.max_kl` = {}: must be a positive number", self.max_kl)));
        }
        if self.grid < 2 {
            return Err(Error::invalid(format!("`auto.grid` = {}: need at least 2 points", self.grid)));
        }
        if !(self.tol > 0.0 && self.tol < 1.0) {
            return Err(Error::invalid(format!("`auto.tol` = {}: must be in (0, 1)", self.tol)));
        }
        Ok(())
    }

    /// The grid, from the end nearer 0 outwards.
    pub fn grid_points(&self) -> Vec<f64> {
        let (lo, hi) = self.range;
        let n = self.grid;
        let mut g: Vec<f64> = (0..n).map(|k| lo + (hi - lo) * k as f64 / (n - 1) as f64).collect();
        g[n - 1] = hi;
        if hi <= 0.0 {
            g.reverse();
        }
        g
    }
}

/// The outcome of [`search`].
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The chosen value and its measurements.
    pub value: f64,
    pub kl: f64,
    pub kl_max: f64,
    pub metric: f64,
    pub control: Option<f64>,
    pub max_kl: f64,
    /// (largest evaluated c within budget, nearest evaluated c beyond it that is not); None if
    /// the whole range is within budget (the budget does not bind: widen the range).
    pub bracket: Option<[f64; 2]>,
    /// Every evaluation, grid first (near end outwards), then the refinement in its order.
    pub trials: Vec<Trial>,
}

/// A KL measurement: (mean, max) over the prompts.
pub type KlFn<'a> = dyn FnMut(f64) -> Result<(f64, f64)> + 'a;
/// A metric measurement: (metric, control metric).
pub type MetricFn<'a> = dyn FnMut(f64) -> Result<(f64, Option<f64>)> + 'a;

struct Edge<'a, 'b> {
    kl: RefCell<&'b mut KlFn<'a>>,
    max_kl: f64,
    /// Memo by coefficient bits (Brent's init re-evaluates the bracket ends).
    seen: &'b RefCell<HashMap<u64, (f64, f64)>>,
    log: &'b RefCell<Vec<(f64, f64, f64)>>,
    err: &'b RefCell<Option<Error>>,
}

impl CostFunction for Edge<'_, '_> {
    type Param = f64;
    type Output = f64;
    fn cost(&self, c: &f64) -> std::result::Result<f64, argmin::core::Error> {
        if let Some(&(m, _)) = self.seen.borrow().get(&c.to_bits()) {
            return Ok(m - self.max_kl);
        }
        match (self.kl.borrow_mut())(*c) {
            Ok((mean, max)) => {
                self.seen.borrow_mut().insert(c.to_bits(), (mean, max));
                self.log.borrow_mut().push((*c, mean, max));
                Ok(mean - self.max_kl)
            }
            Err(e) => {
                *self.err.borrow_mut() = Some(e);
                Err(argmin::core::Error::msg("KL evaluation failed"))
            }
        }
    }
}

/// Run the search with `kl(c)` → (mean, max) and `metric(c)` → (metric, control). See the
/// module documentation. `n_kl` names the prompt count in the error message.
pub fn search(spec: &SearchSpec, kl: &mut KlFn, metric: &mut MetricFn, n_kl: usize) -> Result<Outcome> {
    spec.validate()?;
    let grid = spec.grid_points();
    let mut points: Vec<Trial> = vec![];
    for &c in &grid {
        let (kl_mean, kl_max) = kl(c)?;
        points.push(Trial { value: c, stage: "grid", kl: kl_mean, kl_max, within_budget: kl_mean <= spec.max_kl, metric: None, control: None, ..Trial::default() });
    }
    if !points[0].within_budget {
        return Err(Error::invalid(format!(
            "coeff = \"auto\": budget unreachable: even c = {} (the near end of `auto.range`) gives a mean first-token KL of {:.4} > max_kl = {} on {n_kl} prompts (lower the range's near end or raise `auto.max_kl`)",
            points[0].value, points[0].kl, spec.max_kl
        )));
    }
    for p in points.iter_mut() {
        let (m, ctl) = metric(p.value)?;
        p.metric = Some(m);
        p.control = ctl;
    }
    let first_bad = points.iter().position(|p| !p.within_budget);
    let mut candidates: Vec<usize> = (0..first_bad.unwrap_or(points.len())).collect();
    let mut bracket = None;
    if let Some(j) = first_bad {
        let (a, b) = (grid[j - 1], grid[j]);
        let seen = RefCell::new(HashMap::from([
            (a.to_bits(), (points[j - 1].kl, points[j - 1].kl_max)),
            (b.to_bits(), (points[j].kl, points[j].kl_max)),
        ]));
        let (log, err) = (RefCell::new(vec![]), RefCell::new(None));
        let edge = Edge { kl: RefCell::new(&mut *kl), max_kl: spec.max_kl, seen: &seen, log: &log, err: &err };
        let tol = spec.tol * b.abs().max(a.abs());
        let (lo, hi) = if a < b { (a, b) } else { (b, a) };
        let run = Executor::new(edge, BrentRoot::new(lo, hi, tol)).configure(|s| s.param(a).max_iters(60)).run();
        if let Some(e) = err.borrow_mut().take() {
            return Err(e);
        }
        if let Err(e) = run {
            return Err(Error::invalid(format!("coeff = \"auto\": refining the budget's edge in [{lo}, {hi}] failed: {e}")));
        }
        let log = log.into_inner();
        let start = points.len();
        for (c, mean, max) in log {
            points.push(Trial { value: c, stage: "refine", kl: mean, kl_max: max, within_budget: mean <= spec.max_kl, metric: None, control: None, ..Trial::default() });
        }
        // The bracket: the outermost in-budget point inside [a, b] and the nearest point past it.
        let inside = |c: f64| c.abs() >= a.abs() && c.abs() <= b.abs();
        let all: Vec<usize> = (0..points.len()).filter(|&i| inside(points[i].value)).collect();
        let ok = all.iter().copied().filter(|&i| points[i].within_budget).max_by(|&x, &y| points[x].value.abs().total_cmp(&points[y].value.abs()));
        let ok = ok.expect("grid[j-1] is within budget");
        let bad = all
            .iter()
            .copied()
            .filter(|&i| !points[i].within_budget && points[i].value.abs() > points[ok].value.abs())
            .min_by(|&x, &y| points[x].value.abs().total_cmp(&points[y].value.abs()))
            .expect("grid[j] is past the edge");
        bracket = Some([points[ok].value, points[bad].value]);
        if ok >= start {
            let (m, ctl) = metric(points[ok].value)?;
            points[ok].metric = Some(m);
            points[ok].control = ctl;
            candidates.push(ok);
        }
    }
    let best = candidates
        .iter()
        .copied()
        .max_by(|&x, &y| {
            let (px, py) = (&points[x], &points[y]);
            px.metric.unwrap_or(f64::NEG_INFINITY)
                .total_cmp(&py.metric.unwrap_or(f64::NEG_INFINITY))
                .then(py.value.abs().total_cmp(&px.value.abs()))
        })
        .expect("the near end is a candidate");
    let p = &points[best];
    Ok(Outcome {
        value: p.value,
        kl: p.kl,
        kl_max: p.kl_max,
        metric: p.metric.unwrap_or(f64::NAN),
        control: p.control,
        max_kl: spec.max_kl,
        bracket,
        trials: points.clone(),
    })
}

fn d_limit() -> usize {
    20
}
fn d_grid() -> usize {
    8
}
fn d_tol() -> f64 {
    0.02
}
fn d_batch() -> usize {
    8
}
fn d_max_tokens() -> usize {
    32
}
fn yes() -> bool {
    true
}

/// The `auto` table.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AutoOpts {
    max_kl: f64,
    kl_prompts: String,
    range: [f64; 2],
    #[serde(default)]
    metric: Option<String>,
    metric_prompts: Option<String>,
    control_prompts: Option<String>,
    #[serde(default)]
    targets: Vec<String>,
    #[serde(default = "d_limit")]
    limit: usize,
    #[serde(default = "yes")]
    chat: bool,
    #[serde(default = "d_max_tokens")]
    max_tokens: usize,
    #[serde(default = "d_grid")]
    grid: usize,
    #[serde(default = "d_tol")]
    tol: f64,
    #[serde(default = "d_batch")]
    batch: usize,
    plot: Option<String>,
}

/// A checked `auto` table with its prompts loaded.
pub struct CoeffSearch {
    pub spec: SearchSpec,
    pub objective: Objective,
    plot: Option<PathBuf>,
    progress: bool,
}

impl CoeffSearch {
    /// Check the `auto` table and load its prompt sets (small; before anything heavy runs).
    /// `options` are the pass's: the `projection` metric projects on its `direction`.
    pub fn from_table(t: &toml::Table, options: &toml::Table, cx: &BuildCtx) -> Result<CoeffSearch> {
        let a: AutoOpts = crate::passes::options(t).map_err(|e| Error::invalid(format!("`auto`: {e}")))?;
        let spec = SearchSpec { max_kl: a.max_kl, range: (a.range[0], a.range[1]), grid: a.grid, tol: a.tol };
        spec.validate()?;
        let o = ObjectiveOpts {
            kl_prompts: &a.kl_prompts,
            metric: a.metric.as_deref(),
            metric_prompts: a.metric_prompts.as_deref(),
            control_prompts: a.control_prompts.as_deref(),
            targets: &a.targets,
            limit: a.limit,
            chat: a.chat,
            max_tokens: a.max_tokens,
            batch: a.batch,
        };
        let direction = || crate::passes::common::steering_vector(options, cx);
        let has_direction = options.contains_key("direction");
        let objective = Objective::load(&o, has_direction.then_some(&direction as &dyn Fn() -> Result<candle_core::Tensor>), cx)?;
        Ok(CoeffSearch { spec, objective, plot: a.plot.as_deref().map(|p| cx.path(p)), progress: cx.progress })
    }

    /// [`search`] with the KL and the metric measured on `model` under `twin_at(c)`.
    pub fn outcome(&self, model: &Model, twin_at: &dyn Fn(f64) -> Result<Hooks>) -> Result<Outcome> {
        let bar = crate::progress::bar(0, "auto coeff", self.progress);
        let mut kl_of = self.objective.kl_fn(model);
        let mut evals = 0u64;
        let mut kl = |c: f64| {
            evals += 1;
            bar.set_message(format!("KL at c = {c:.4}"));
            bar.set_position(evals);
            kl_of(&twin_at(c)?)
        };
        let mut metric = |c: f64| -> Result<(f64, Option<f64>)> {
            bar.set_message(format!("{} at c = {c:.4}", self.objective.metric_name()));
            self.objective.metric(model, &twin_at(c)?)
        };
        let r = search(&self.spec, &mut kl, &mut metric, self.objective.kl_prompts.len())?;
        bar.finish_and_clear();
        Ok(r)
    }
}

fn at(option: &str, c: f64) -> toml::Table {
    toml::Table::from_iter([(option.to_string(), toml::Value::Float(c))])
}

impl Search for CoeffSearch {
    /// The near end of the range.
    fn placeholder(&self) -> toml::Table {
        at("coeff", self.spec.grid_points()[0])
    }

    fn run(&self, option: &str, model: &Model, twin_at: &dyn Fn(&toml::Table) -> Result<Hooks>) -> Result<(SearchRecord, toml::Table)> {
        let r = self.outcome(model, &|c| twin_at(&at(option, c)))?;
        let (lo, hi) = self.spec.range;
        let record = SearchRecord {
            option: option.to_string(),
            method: "grid+brent",
            space: serde_json::json!({ "range": [lo, hi], "grid": self.spec.grid, "tol": self.spec.tol }),
            budget: Budget { measure: "first_token_kl_mean", max: self.spec.max_kl, prompts: self.objective.kl_prompts.len() },
            metric: MetricInfo { name: self.objective.metric_name(), prompts: self.objective.metric_prompts(), control_prompts: self.objective.control_prompts() },
            trials: r.trials,
            chosen: r.value,
            bracket: r.bracket,
            front: vec![],
        };
        Ok((record, at(option, r.value)))
    }

    fn plot(&self) -> Option<&PathBuf> {
        self.plot.as_ref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(max_kl: f64, range: (f64, f64)) -> SearchSpec {
        SearchSpec { max_kl, range, grid: 6, tol: 0.01 }
    }

    #[test]
    fn finds_the_budget_edge_of_a_monotone_kl() {
        // KL = c², metric = c: the answer is sqrt(max_kl).
        let mut kl = |c: f64| Ok((c * c, c * c));
        let mut m = |c: f64| Ok((c, None));
        let r = search(&spec(2.0, (0.0, 5.0)), &mut kl, &mut m, 1).unwrap();
        assert!(r.kl <= 2.0 && (r.value - 2f64.sqrt()).abs() < 0.03, "{r:?}");
        let [ok, bad] = r.bracket.unwrap();
        assert_eq!(ok, r.value);
        assert!(bad * bad > 2.0 && bad - ok <= 0.01 * 2.0 + 1e-9, "{ok} {bad}");
        // Negative side: mirror image.
        let r = search(&spec(2.0, (-5.0, 0.0)), &mut kl, &mut |c: f64| Ok((-c, None)), 1).unwrap();
        assert!((r.value + 2f64.sqrt()).abs() < 0.03, "{r:?}");
    }

    #[test]
    fn a_flat_metric_prefers_the_smaller_coefficient_and_unreachable_fails() {
        let mut kl = |c: f64| Ok((c, c));
        let r = search(&spec(3.0, (0.0, 5.0)), &mut kl, &mut |_| Ok((1.0, None)), 1).unwrap();
        assert_eq!(r.value, 0.0);
        let e = search(&spec(0.1, (1.0, 5.0)), &mut kl, &mut |_| Ok((1.0, None)), 7).unwrap_err().to_string();
        assert!(e.contains("budget unreachable") && e.contains("c = 1") && e.contains("7 prompts"), "{e}");
        // A budget that never binds: no bracket, the far end.
        let r = search(&spec(100.0, (0.0, 5.0)), &mut kl, &mut |c| Ok((c, None)), 1).unwrap();
        assert_eq!((r.value, r.bracket), (5.0, None));
        assert!(spec(1.0, (-1.0, 1.0)).validate().unwrap_err().to_string().contains("crosses 0"));
    }

    /// `coeff = "auto"` as the compile driver resolves it: `extract` checks the `auto` table, then
    /// the pass is built with the search's placeholder. Errors name the option.
    #[test]
    fn bad_auto_tables_name_the_option() {
        use crate::model::random::{random_model, RandomSpec};
        use crate::passes::BuildCtx;
        let m = (0..)
            .map(RandomSpec::from_seed)
            .find(|s| s.arch == crate::model::Arch::Llama && s.config().num_layers >= 2)
            .map(|s| random_model(s.config(), 0).unwrap())
            .unwrap();
        let err = |m: &crate::model::Model, s: &str| -> String {
            let (t, cx) = (s.parse::<toml::Table>().unwrap(), BuildCtx::new(m));
            let info = crate::passes::find("bake-steering").unwrap();
            let same = |t: &toml::Table| Ok(t.clone());
            let r = crate::search::extract("bake-steering", &t, &same, &cx).and_then(|found| match found {
                Some(search) => (info.build)(&search.placeholder_options(&same)?, &cx).map(|_| ()),
                None => (info.build)(&t, &cx).map(|_| ()),
            });
            match r {
                Ok(_) => panic!("{s} should fail"),
                Err(e) => e.to_string(),
            }
        };
        let dir = format!("[{}]", vec!["0.5"; m.cfg.hidden_size].join(", "));
        assert!(err(&m, &format!("mode = \"add\"\ndirection = {dir}\nlayer = 0\ncoeff = \"auto\"")).contains("needs an `auto` table"));
        assert!(err(&m, &format!("mode = \"add\"\ndirection = {dir}\nlayer = 0\ncoeff = 1\nauto = {{ max_kl = 1, kl_prompts = \"p\", range = [0, 1] }}")).contains("only with coeff"));
        assert!(err(&m, &format!("mode = \"add\"\ndirection = {dir}\nlayer = 0\ncoeff = \"auto\"\nauto = {{ max_kl = 1, kl_prompts = \"p\", range = [-1, 1] }}")).contains("crosses 0"));
    }
}
