//! `coeff = "auto"` for additive steering (`bake-steering` mode add): the coefficient c that
//! maximises a behaviour metric subject to a budget on the first-token KL(unsteered ‖ steered)
//! over neutral prompts, searched with the runtime twin (c·v added at
//! `blocks.{layer}.hook_resid_post` at every position), never by rewriting weights per candidate.
//!
//! The search ([`search`]), over a range [lo, hi] of one sign (|c| grows from the end nearer 0):
//!
//! 1. a grid of `grid` evenly spaced coefficients from lo to hi: the KL at each (one forward over
//!    the KL prompts) and the metric at each (so the record holds the whole trade-off curve);
//! 2. if even the near end breaks the budget, the search fails ("budget unreachable");
//! 3. the KL is close to monotone in |c|, so the feasible set is an interval starting at the near
//!    end: the first grid point that breaks the budget and the feasible one before it bracket its
//!    edge, which Brent's root finder (argmin's `BrentRoot`: bisection's guarantee, secant /
//!    inverse quadratic speed, ~5–8 KL evaluations to a 2 % bracket) places on
//!    KL(c) − max_kl = 0. Root finding rather than minimising a penalised objective because the
//!    constraint is what binds: the metric usually rises with |c|, so the best feasible c sits on
//!    the budget's edge, and a root finder finds that edge with a bracket we can report;
//! 4. the chosen c is, among every evaluated coefficient within budget *on that interval* (grid
//!    points before the first violation, and the largest in-budget point of the refinement), the
//!    one with the highest metric; ties go to the smaller |c| (less KL for the same behaviour).
//!
//! Grid points past the first violation that happen to be within budget again are recorded but
//! never chosen: a model that breaks and then recovers as c grows is not one to trust.

use std::cell::RefCell;
use std::collections::HashMap;

use argmin::core::{CostFunction, Executor};
use argmin::solver::brent::BrentRoot;
use candle_core::{DType, Tensor};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::Model;
use crate::runtime::{HookPoint, Hooks, Op};
use crate::verify::score::{kl, last_token};

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

/// One evaluated coefficient.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AutoPoint {
    pub coeff: f64,
    /// "grid" or "refine".
    pub stage: &'static str,
    pub kl_mean: f64,
    pub kl_max: f64,
    pub within_budget: bool,
    /// The metric (on the metric prompts), where evaluated.
    pub metric: Option<f64>,
    /// The metric on the control prompts, where given and evaluated.
    pub control: Option<f64>,
}

/// The outcome of a search.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AutoResult {
    pub coeff: f64,
    pub kl_mean: f64,
    pub kl_max: f64,
    pub metric: f64,
    pub control: Option<f64>,
    pub max_kl: f64,
    /// (largest evaluated c within budget, nearest evaluated c beyond it that is not); None if
    /// the whole range is within budget (the budget does not bind: widen the range).
    pub bracket: Option<[f64; 2]>,
    /// Every evaluation, grid first (near end outwards), then the refinement in its order.
    pub points: Vec<AutoPoint>,
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
pub fn search(spec: &SearchSpec, kl: &mut KlFn, metric: &mut MetricFn, n_kl: usize) -> Result<AutoResult> {
    spec.validate()?;
    let grid = spec.grid_points();
    let mut points: Vec<AutoPoint> = vec![];
    for &c in &grid {
        let (kl_mean, kl_max) = kl(c)?;
        points.push(AutoPoint { coeff: c, stage: "grid", kl_mean, kl_max, within_budget: kl_mean <= spec.max_kl, metric: None, control: None });
    }
    if !points[0].within_budget {
        return Err(Error::invalid(format!(
            "coeff = \"auto\": budget unreachable: even c = {} (the near end of `auto.range`) gives a mean first-token KL of {:.4} > max_kl = {} on {n_kl} prompts (lower the range's near end or raise `auto.max_kl`)",
            points[0].coeff, points[0].kl_mean, spec.max_kl
        )));
    }
    for p in points.iter_mut() {
        let (m, ctl) = metric(p.coeff)?;
        p.metric = Some(m);
        p.control = ctl;
    }
    let first_bad = points.iter().position(|p| !p.within_budget);
    let mut candidates: Vec<usize> = (0..first_bad.unwrap_or(points.len())).collect();
    let mut bracket = None;
    if let Some(j) = first_bad {
        let (a, b) = (grid[j - 1], grid[j]);
        let seen = RefCell::new(HashMap::from([
            (a.to_bits(), (points[j - 1].kl_mean, points[j - 1].kl_max)),
            (b.to_bits(), (points[j].kl_mean, points[j].kl_max)),
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
            points.push(AutoPoint { coeff: c, stage: "refine", kl_mean: mean, kl_max: max, within_budget: mean <= spec.max_kl, metric: None, control: None });
        }
        // The bracket: the outermost in-budget point inside [a, b] and the nearest point past it.
        let inside = |c: f64| c.abs() >= a.abs() && c.abs() <= b.abs();
        let all: Vec<usize> = (0..points.len()).filter(|&i| inside(points[i].coeff)).collect();
        let ok = all.iter().copied().filter(|&i| points[i].within_budget).max_by(|&x, &y| points[x].coeff.abs().total_cmp(&points[y].coeff.abs()));
        let ok = ok.expect("grid[j-1] is within budget");
        let bad = all
            .iter()
            .copied()
            .filter(|&i| !points[i].within_budget && points[i].coeff.abs() > points[ok].coeff.abs())
            .min_by(|&x, &y| points[x].coeff.abs().total_cmp(&points[y].coeff.abs()))
            .expect("grid[j] is past the edge");
        bracket = Some([points[ok].coeff, points[bad].coeff]);
        if ok >= start {
            let (m, ctl) = metric(points[ok].coeff)?;
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
                .then(py.coeff.abs().total_cmp(&px.coeff.abs()))
        })
        .expect("the near end is a candidate");
    let p = &points[best];
    Ok(AutoResult {
        coeff: p.coeff,
        kl_mean: p.kl_mean,
        kl_max: p.kl_max,
        metric: p.metric.unwrap_or(f64::NAN),
        control: p.control,
        max_kl: spec.max_kl,
        bracket,
        points: points.clone(),
    })
}

/// The twin of baking c·v after block `layer`.
pub fn steer_hooks(layer: usize, v: &Tensor, c: f64) -> Result<Hooks> {
    let mut h = Hooks::new();
    h.intervene(HookPoint::ResidPost(layer), Op::Add((v.to_dtype(DType::F32)? * c)?));
    Ok(h)
}

/// First-token KL(unsteered ‖ steered with c·v after `layer`) over `prompts`: (mean, max). The
/// unsteered distributions are computed once, on the first call.
pub fn kl_fn<'a>(model: &'a Model, layer: usize, v: &'a Tensor, prompts: &'a [Vec<u32>], batch: usize) -> impl FnMut(f64) -> Result<(f64, f64)> + 'a {
    let mut base: Option<Vec<Vec<f32>>> = None;
    move |c: f64| {
        if prompts.is_empty() {
            return Err(Error::invalid("coeff = \"auto\": no KL prompts"));
        }
        if base.is_none() {
            let mut b = vec![vec![]; prompts.len()];
            last_token(model, prompts, batch, &Hooks::new(), None, |i, lp, _| {
                b[i] = lp.to_vec();
                Ok(())
            })?;
            base = Some(b);
        }
        let base = base.as_ref().expect("set above");
        if c == 0.0 {
            return Ok((0.0, 0.0));
        }
        let mut kls = vec![0f64; prompts.len()];
        last_token(model, prompts, batch, &steer_hooks(layer, v, c)?, None, |i, lp, _| {
            kls[i] = kl(&base[i], lp);
            Ok(())
        })?;
        Ok((kls.iter().sum::<f64>() / kls.len() as f64, kls.iter().cloned().fold(0.0, f64::max)))
    }
}

/// Mean last-token projection of the last layer's resid_post on v̂, steered by c·v after `layer`.
pub fn projection(model: &Model, layer: usize, v: &Tensor, prompts: &[Vec<u32>], batch: usize, c: f64) -> Result<f64> {
    let vv = v.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    let n = vv.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    let unit: Vec<f64> = vv.iter().map(|&x| x as f64 / n).collect();
    let measure = HookPoint::ResidPost(model.cfg.num_layers - 1);
    let mut s = 0f64;
    last_token(model, prompts, batch, &steer_hooks(layer, v, c)?, Some(measure), |_, _, a| {
        s += a.expect("captured").iter().zip(&unit).map(|(&x, &u)| x as f64 * u).sum::<f64>();
        Ok(())
    })?;
    Ok(s / prompts.len() as f64)
}

/// Mean log-prob of the target tokens at the next-token position, steered by c·v after `layer`.
pub fn target_logprob(model: &Model, layer: usize, v: &Tensor, prompts: &[Vec<u32>], targets: &[u32], batch: usize, c: f64) -> Result<f64> {
    let mut s = 0f64;
    last_token(model, prompts, batch, &steer_hooks(layer, v, c)?, None, |_, lp, _| {
        s += targets.iter().map(|&t| lp[t as usize] as f64).sum::<f64>() / targets.len() as f64;
        Ok(())
    })?;
    Ok(s / prompts.len() as f64)
}

/// A table of the evaluated points (for the compile's output).
pub fn table(r: &AutoResult, metric_name: &str) -> String {
    let mut pts = r.points.clone();
    pts.sort_by(|a, b| a.coeff.abs().total_cmp(&b.coeff.abs()));
    let has_ctl = pts.iter().any(|p| p.control.is_some());
    let mut s = format!("{:>10} {:>7} {:>10} {:>10} {:>12}{}\n", "coeff", "stage", "KL mean", "KL max", metric_name, if has_ctl { format!(" {:>12}", "control") } else { String::new() });
    for p in &pts {
        let mark = if p.coeff == r.coeff { "  <- chosen" } else if !p.within_budget { "  (over budget)" } else { "" };
        let m = p.metric.map(|m| format!("{m:.4}")).unwrap_or_else(|| "-".into());
        let c = if has_ctl { format!(" {:>12}", p.control.map(|m| format!("{m:.4}")).unwrap_or_else(|| "-".into())) } else { String::new() };
        s += &format!("{:>10.4} {:>7} {:>10.4} {:>10.4} {:>12}{c}{mark}\n", p.coeff, p.stage, p.kl_mean, p.kl_max, m);
    }
    s
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
        assert!(r.kl_mean <= 2.0 && (r.coeff - 2f64.sqrt()).abs() < 0.03, "{r:?}");
        let [ok, bad] = r.bracket.unwrap();
        assert_eq!(ok, r.coeff);
        assert!(bad * bad > 2.0 && bad - ok <= 0.01 * 2.0 + 1e-9, "{ok} {bad}");
        // Negative side: mirror image.
        let r = search(&spec(2.0, (-5.0, 0.0)), &mut kl, &mut |c: f64| Ok((-c, None)), 1).unwrap();
        assert!((r.coeff + 2f64.sqrt()).abs() < 0.03, "{r:?}");
    }

    #[test]
    fn a_flat_metric_prefers_the_smaller_coefficient_and_unreachable_fails() {
        let mut kl = |c: f64| Ok((c, c));
        let r = search(&spec(3.0, (0.0, 5.0)), &mut kl, &mut |_| Ok((1.0, None)), 1).unwrap();
        assert_eq!(r.coeff, 0.0);
        let e = search(&spec(0.1, (1.0, 5.0)), &mut kl, &mut |_| Ok((1.0, None)), 7).unwrap_err().to_string();
        assert!(e.contains("budget unreachable") && e.contains("c = 1") && e.contains("7 prompts"), "{e}");
        // A budget that never binds: no bracket, the far end.
        let r = search(&spec(100.0, (0.0, 5.0)), &mut kl, &mut |c| Ok((c, None)), 1).unwrap();
        assert_eq!((r.coeff, r.bracket), (5.0, None));
        assert!(spec(1.0, (-1.0, 1.0)).validate().unwrap_err().to_string().contains("crosses 0"));
    }
}
