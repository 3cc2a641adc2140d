//! Attribution patching (Nanda 2023; Syed et al. 2023, "Attribution Patching Outperforms
//! Automated Circuit Discovery"): the first-order estimate of every activation patch at once.
//! For a site with activation a, patching the clean value into the corrupted run changes the
//! metric M by about (a_clean − a_corrupt) · ∂M/∂a, the gradient taken on the corrupted run.
//! One clean forward (captures), one corrupted forward and one backward give every site.
//!
//! The prompt pair, the metric (logit difference or p(answer) at the last position) and the
//! normalisation by (m_clean − m_corrupt) are those of [`super::patch`], so the numbers are
//! directly comparable: 0 = no effect, 1 = restores the clean value. Sites: every head
//! (`attn.hook_z`, all positions and d_head summed per head), every MLP neuron (`mlp.hook_post`,
//! summed over positions), the residual stream entering each block (`hook_resid_pre`) and each
//! MLP's output (`hook_mlp_out`) per layer × position.
//!
//! ∂M/∂a comes from a zero [`Var`] added at every site in the gradient mode ([`Fwd::grad`]):
//! composed ops only, and frozen weights get no gradient. Both runs use the gradient mode, so
//! an activation that is the same in both runs (e.g. at positions before the first differing
//! token) has a difference of exactly 0 and so an attribution of exactly 0.
//!
//! It is a linear estimate: it is known to be poor for large components (whole MLP outputs, the
//! residual stream) and where attention saturates; check the top candidates with real patching
//! ([`super::patch::patch_heads`]; the CLI's `--verify-top`).

use std::sync::Arc;

use candle_core::{IndexOp, Tensor, Var, D};
use serde::Serialize;

use super::patch::{self, Metric};
use crate::error::{Error, Result};
use crate::ir::{Component, Findings, Source};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::{Batch, HookPoint, Hooks, Op};

pub const METHOD: &str = "attribute";

/// Normalised attributions of every site.
#[derive(Debug, Clone, Serialize)]
pub struct Attribution {
    pub answer: u32,
    pub wrong: Option<u32>,
    pub metric: Metric,
    pub m_clean: f64,
    pub m_corrupt: f64,
    /// `[head][layer]` (NaN where a pruned layer has fewer heads), as patch's `head` grid.
    pub heads: Vec<Vec<f64>>,
    /// `[layer][neuron]`.
    pub neurons: Vec<Vec<f64>>,
    /// `[position][layer]`, as patch's `resid` grid.
    pub resid: Vec<Vec<f64>>,
    /// `[position][layer]`, as patch's `mlp` grid.
    pub mlp: Vec<Vec<f64>>,
}

/// The metric of a [1, t, vocab] or [1, 1, vocab] logits tensor at its last position, as a
/// differentiable scalar (composed softmax for p(answer)).
fn metric_tensor(logits: &Tensor, m: Metric, answer: u32, wrong: Option<u32>) -> Result<Tensor> {
    let t = logits.dim(1)?;
    let last = logits.i((0, t - 1))?; // [vocab]
    Ok(match (m, wrong) {
        (Metric::Prob, _) => candle_nn::ops::softmax(&last, D::Minus1)?.i(answer as usize)?,
        (Metric::LogitDiff, Some(w)) => (last.i(answer as usize)? - last.i(w as usize)?)?,
        (Metric::LogitDiff, None) => return Err(Error::invalid("attribute: the logit difference needs a wrong answer")),
    })
}

/// The sites attributed, per layer.
fn sites(l: usize) -> [HookPoint; 4] {
    [HookPoint::AttnZ(l), HookPoint::MlpPost(l), HookPoint::ResidPre(l), HookPoint::MlpOut(l)]
}

fn captured(hooks: &Hooks, p: HookPoint) -> Result<Tensor> {
    hooks.captured.get(&p).cloned().ok_or_else(|| Error::invalid(format!("attribute: {p} was not captured")))
}

/// Flattened f32 values of a tensor.
fn flat(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?)
}

/// Attribute every site. `answer` / `wrong` default as in [`patch::patch`] (greedy tokens of
/// the clean / corrupted prompts). Errors as patch does: prompts of different token lengths,
/// ids outside the vocabulary, answer = wrong, equal clean and corrupted metrics.
pub fn attribute(
    model: &Model,
    clean_ids: &[u32],
    corrupt_ids: &[u32],
    answer: Option<u32>,
    wrong: Option<u32>,
    m: Metric,
) -> Result<Attribution> {
    patch::check_pair(METHOD, model, clean_ids, corrupt_ids, answer, wrong)?;
    let layers = model.blocks.len();
    let t = clean_ids.len();
    let grad = Fwd { grad: true, last_only: true, ..Fwd::default() };

    // Clean run: captures only (no backward), in the gradient mode so that equal activations
    // are bitwise equal to the corrupted run's.
    let mut clean = Hooks::new();
    for l in 0..layers {
        for p in sites(l) {
            clean.capture(p);
        }
    }
    let clean_logits = model.forward(&Batch::single(clean_ids), None, &mut clean, grad)?.detach();

    // Corrupted run: a zero variable added at every site; its gradient is ∂M/∂a there.
    let mut corrupt = Hooks::new();
    let mut vars: Vec<(HookPoint, Var)> = vec![];
    for l in 0..layers {
        for p in sites(l) {
            let shape = captured(&clean, p)?.dims().to_vec();
            let var = Var::zeros(shape, candle_core::DType::F32, &model.device)?;
            let v = var.as_tensor().clone();
            corrupt.intervene(p, Op::Func(Arc::new(move |x: &Tensor| x.broadcast_add(&v))));
            corrupt.capture(p);
            vars.push((p, var));
        }
    }
    let corrupt_logits = model.forward(&Batch::single(corrupt_ids), None, &mut corrupt, grad)?;
    let (answer, wrong) = patch::resolve_answers(METHOD, m, answer, wrong, &clean_logits, &corrupt_logits.detach())?;
    let m_clean = patch::metric(&clean_logits, m, answer, wrong)?[0];
    let mt = metric_tensor(&corrupt_logits, m, answer, wrong)?;
    // Computed from the logits as m_clean is (not from `mt`, which rounds the difference in f32).
    let m_corrupt = patch::metric(&corrupt_logits.detach(), m, answer, wrong)?[0];
    patch::check_gap(METHOD, m_clean, m_corrupt)?;
    let grads = mt.backward()?;
    let norm = m_clean - m_corrupt;

    let nan_grid = |rows: usize| vec![vec![f64::NAN; layers]; rows];
    let max_heads = model.blocks.iter().map(|b| b.q.out_features() / model.cfg.head_dim).max().unwrap_or(0);
    let mut out = Attribution {
        answer,
        wrong,
        metric: m,
        m_clean,
        m_corrupt,
        heads: nan_grid(max_heads),
        neurons: vec![],
        resid: nan_grid(t),
        mlp: nan_grid(t),
    };
    for (p, var) in &vars {
        let a_clean = captured(&clean, *p)?;
        let a_corrupt = captured(&corrupt, *p)?;
        let dims = a_clean.dims().to_vec(); // [1, t, ...]
        // Sites the metric does not depend on (none in a plain forward) have no gradient.
        let g = match grads.get(var.as_tensor()) {
            Some(g) => flat(g)?,
            None => vec![0.0; a_clean.elem_count()],
        };
        let (c, x) = (flat(&a_clean)?, flat(&a_corrupt)?);
        let term = |i: usize| (f64::from(c[i]) - f64::from(x[i])) * f64::from(g[i]);
        let l = p.layer().expect("per-layer site");
        match p {
            HookPoint::AttnZ(_) => {
                let (heads, hd) = (dims[2], dims[3]);
                for h in 0..heads {
                    let s: f64 = (0..t).flat_map(|q| (0..hd).map(move |k| (q * heads + h) * hd + k)).map(term).sum();
                    out.heads[h][l] = s / norm;
                }
            }
            HookPoint::MlpPost(_) => {
                let n = dims[2];
                out.neurons.push((0..n).map(|j| (0..t).map(|q| term(q * n + j)).sum::<f64>() / norm).collect());
            }
            HookPoint::ResidPre(_) | HookPoint::MlpOut(_) => {
                let d = dims[2];
                let grid = if matches!(p, HookPoint::ResidPre(_)) { &mut out.resid } else { &mut out.mlp };
                for (q, row) in grid.iter_mut().enumerate() {
                    row[l] = (0..d).map(|k| term(q * d + k)).sum::<f64>() / norm;
                }
            }
            _ => unreachable!("only the sites above are attributed"),
        }
    }
    Ok(out)
}

/// Spearman's rank correlation (Pearson's r of the ranks, ties given their mean rank); NaN for
/// fewer than two pairs or a constant side.
pub fn spearman(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "spearman: lengths differ");
    fn ranks(v: &[f64]) -> Vec<f64> {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&i, &j| v[i].total_cmp(&v[j]));
        let mut r = vec![0.0; v.len()];
        let mut i = 0;
        while i < idx.len() {
            let mut j = i;
            while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
                j += 1;
            }
            let mean = (i + j) as f64 / 2.0;
            for &k in &idx[i..=j] {
                r[k] = mean;
            }
            i = j + 1;
        }
        r
    }
    let n = a.len();
    if n < 2 {
        return f64::NAN;
    }
    let (ra, rb) = (ranks(a), ranks(b));
    let mean = (n - 1) as f64 / 2.0;
    let (mut sab, mut saa, mut sbb) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (x, y) = (ra[i] - mean, rb[i] - mean);
        sab += x * y;
        saa += x * x;
        sbb += y * y;
    }
    sab / (saa * sbb).sqrt()
}

/// The heads with the `k` largest |attribution|, ties in (layer, head) order.
pub fn top_heads(a: &Attribution, k: usize) -> Vec<(usize, usize)> {
    let mut v: Vec<(usize, usize, f64)> = vec![];
    for (h, row) in a.heads.iter().enumerate() {
        for (l, &x) in row.iter().enumerate() {
            if x.is_finite() {
                v.push((l, h, x.abs()));
            }
        }
    }
    v.sort_by(|x, y| y.2.total_cmp(&x.2).then((x.0, x.1).cmp(&(y.0, y.1))));
    v.into_iter().take(k).map(|(l, h, _)| (l, h)).collect()
}

/// Findings: `L{l}.H{h}` (every head), `L{l}.N{n}` (the `neurons` neurons of largest
/// |attribution| over all layers, in layer order; 0 = all), and `L{l}` (resid) and `L{l}.mlp`
/// with score = the largest value over positions (extra: that position), as patch reports them.
/// Summary: the metric's clean and corrupted values and the head, resid and mlp grids.
pub fn findings(a: &Attribution, neurons: usize, options: serde_json::Value, model: Source, data: Vec<Source>) -> Findings {
    let meaning = "normalised attribution (a_clean − a_corrupt)·∂M/∂a / (m_clean − m_corrupt): a linear estimate of patch's effect";
    let mut f = Findings::new(METHOD, meaning, options, model, data);
    let layers = a.neurons.len();
    for l in 0..layers {
        for (h, row) in a.heads.iter().enumerate() {
            if row[l].is_finite() {
                f.push(Component::Head { layer: l, head: h }, row[l]);
            }
        }
    }
    let mut all: Vec<(usize, usize, f64)> =
        a.neurons.iter().enumerate().flat_map(|(l, row)| row.iter().enumerate().map(move |(n, &x)| (l, n, x))).collect();
    if neurons > 0 && neurons < all.len() {
        all.sort_by(|x, y| y.2.abs().total_cmp(&x.2.abs()).then((x.0, x.1).cmp(&(y.0, y.1))));
        all.truncate(neurons);
        all.sort_by_key(|x| (x.0, x.1));
    }
    for (l, n, x) in all {
        f.push(Component::Neuron { layer: l, n }, x);
    }
    for (grid, mlp) in [(&a.resid, false), (&a.mlp, true)] {
        for l in 0..layers {
            let best = (0..grid.len()).max_by(|&p, &q| grid[p][l].total_cmp(&grid[q][l])).unwrap_or(0);
            let c = if mlp { Component::Mlp(l) } else { Component::Block(l) };
            let s = f.push(c, grid[best][l]);
            s.extra.insert("position".into(), best.into());
        }
    }
    f.summary.insert("m_clean".into(), serde_json::json!(a.m_clean));
    f.summary.insert("m_corrupt".into(), serde_json::json!(a.m_corrupt));
    f.summary.insert("grids".into(), serde_json::json!({ "head": a.heads, "resid": a.resid, "mlp": a.mlp }));
    f
}

/// Attribution patching: the linear estimate of every patch from one forward/backward.
///
/// The first-order estimate of every activation patch at once, from one clean forward and one
/// corrupted forward + backward. For each site, (a_clean − a_corrupt) · ∂M/∂a on the corrupted
/// run, normalised as `locate patch` normalises, by (m_clean − m_corrupt): 0 = no effect, 1 =
/// restores the clean value. Same prompt pair, metric and defaults as `locate patch`.
///
/// Sites: every attention head (`attn.hook_z`, all positions), every MLP neuron
/// (`mlp.hook_post`, all positions), and per layer × position the residual stream entering each
/// block (`hook_resid_pre`) and each MLP's output (`hook_mlp_out`).
///
/// Findings: `L{l}.H{h}` (every head), `L{l}.N{i}` (the --neurons largest by |score|), `L{l}`
/// (resid) and `L{l}.mlp` with score = the largest value over positions. The summary holds the
/// head, resid and mlp grids, and with --verify-top the real patching effects of the top heads
/// and their Spearman rank correlation with the attributions.
///
/// A linear estimate: poor for large components and saturated attention. Verify what you use.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Spec {
    #[command(flatten)]
    #[serde(flatten)]
    pub pair: patch::PairSpec,
    /// Keep this many neurons in the findings, those of largest |attribution| over all layers
    /// (0 = every neuron).
    #[arg(long, default_value_t = 200)]
    pub neurons: usize,
    /// Run real activation patching for the K heads of largest |attribution| and report their
    /// effects and the Spearman rank correlation with the attributions (summary key `verify`,
    /// and on stderr). 0 = skip.
    #[arg(long, value_name = "K", default_value_t = 10)]
    pub verify_top: usize,
}

impl super::Method for Spec {
    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        let (model, tok) = (cx.model(), cx.tok()?);
        let pair = self.pair.tokenize(tok, "attribution patching")?;
        let started = std::time::Instant::now();
        let r = attribute(model, &pair.clean, &pair.corrupt, pair.answer, pair.wrong, self.pair.metric)?;
        let seconds = started.elapsed().as_secs_f64();
        let mut options = self.pair.options(tok, r.answer, r.wrong);
        options["neurons"] = self.neurons.into();
        options["verify_top"] = self.verify_top.into();
        let mut f = findings(&r, self.neurons, options, cx.source.clone(), self.pair.sources());
        let mut report = format!("attribution: {seconds:.2} s for every head, neuron, resid and mlp site\n");
        if self.verify_top > 0 {
            let top = top_heads(&r, self.verify_top);
            let real = patch::patch_heads(model, &pair.clean, &pair.corrupt, Some(r.answer), r.wrong, self.pair.metric, &top)?;
            let est: Vec<f64> = top.iter().map(|&(l, h)| r.heads[h][l]).collect();
            let rho = spearman(&est, &real);
            report += &format!("verify: top {} heads by |attribution|, Spearman ρ = {rho:.3} against real patching\n", top.len());
            let mut rows = vec![];
            for (&(l, h), (&e, &p)) in top.iter().zip(est.iter().zip(&real)) {
                report += &format!("  {:<8} attribution {e:>8.4}  patch {p:>8.4}\n", format!("L{l}.H{h}"));
                rows.push(serde_json::json!({ "head": format!("L{l}.H{h}"), "attribution": e, "patch": p }));
            }
            f.summary.insert("verify".into(), serde_json::json!({ "k": top.len(), "spearman": rho, "heads": rows }));
        }
        let mut out = super::Located::new(f);
        out.report = report;
        out.hide = &["grids"];
        if cx.plot {
            use crate::report::{heatmaps_svg, Heatmap};
            let color = plotters::style::RGBColor(8, 69, 148);
            let panel = |title: &str, rows: Vec<String>, values: &Vec<Vec<f64>>| Heatmap { title: title.into(), rows, values: values.clone(), color, x_label: "layer".into() };
            let rows = pair.rows(tok);
            let panels = [
                panel("resid", rows.clone(), &r.resid),
                panel("mlp", rows, &r.mlp),
                panel("head", (0..r.heads.len()).map(|h| format!("H{h}")).collect(), &r.heads),
            ];
            let title = format!("Attribution patching, normalised {:?} (clean {:.3}, corrupted {:.3})", self.pair.metric, r.m_clean, r.m_corrupt);
            out.plot = Some(heatmaps_svg(&panels, &title)?);
        }
        Ok(out)
    }
}
