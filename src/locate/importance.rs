//! Head and neuron importance: one score per query head `L{l}.H{h}` (at `attn.hook_z`) or per MLP
//! neuron `L{l}.N{n}` (at `mlp.hook_post`), over calibration text cut into disjoint windows.
//! Low score = least important (the first to prune). Methods (`--by`):
//!
//! - `ablation-zero` / `ablation-mean`: increase of the LM loss L (mean NLL over every predicted
//!   token of every window) when the unit is zeroed / replaced by its mean over the calibration
//!   tokens. Exact but costly: one extra row per unit, run from the unit's layer on
//!   ([`Model::forward_from`] on the clean residual stream entering that layer).
//! - `gradient` (Michel et al. 2019): |∂L_w/∂ξ_u| for a mask ξ_u = 1 on the unit's output, i.e.
//!   |Σ_tokens a·∂L_w/∂a| (a = the head's hook_z slice / the neuron's hook_post), per window w,
//!   averaged over windows (weighted by predicted tokens), then divided per layer by the L2 norm
//!   of the layer's scores as Michel et al. do (`raw` keeps the value before that).
//! - `flap` (An et al. 2024, "fluctuation"): sample variance over tokens of each input channel of
//!   the output projection × the squared norm of its weight column; a neuron is one channel of
//!   `down_proj`, a head is the sum over its d_head channels of `o_proj`.
//! - `wanda` (structured Wanda, Sun et al. 2024): ‖X_j‖₂ over tokens × Σ_i |W_ij| over the same
//!   channels/columns.
//!
//! `flap`, `wanda` and the means of `ablation-mean` share one statistics pass
//! ([`channel_stats`]): per channel, the sum and sum of squares in f64 over every token.

use std::sync::Arc;

use candle_core::{DType, Device, IndexOp, Tensor, Var, D};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ir::{Component, Findings, Source};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::{Batch, HookPoint, Hooks, Op};

pub const HEAD_METHOD: &str = "head-importance";
pub const NEURON_METHOD: &str = "neuron-importance";

/// What is scored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Unit {
    /// Query heads, at `blocks.{l}.attn.hook_z` (input of `o_proj`, d_head channels each).
    Heads,
    /// MLP neurons, at `blocks.{l}.mlp.hook_post` (input of `down_proj`, one channel each).
    Neurons,
}

impl Unit {
    pub fn point(self, l: usize) -> HookPoint {
        match self {
            Unit::Heads => HookPoint::AttnZ(l),
            Unit::Neurons => HookPoint::MlpPost(l),
        }
    }
    pub fn method(self) -> &'static str {
        match self {
            Unit::Heads => HEAD_METHOD,
            Unit::Neurons => NEURON_METHOD,
        }
    }
    pub fn component(self, layer: usize, i: usize) -> Component {
        match self {
            Unit::Heads => Component::Head { layer, head: i },
            Unit::Neurons => Component::Neuron { layer, n: i },
        }
    }
    /// (units, channels per unit) of layer `l`.
    pub fn shape(self, m: &Model, l: usize) -> (usize, usize) {
        let b = &m.blocks[l];
        match self {
            Unit::Heads => (b.q.out_features() / m.cfg.head_dim, m.cfg.head_dim),
            Unit::Neurons => (b.gate.out_features(), 1),
        }
    }
    /// The output projection whose input channels the units are: `o_proj` / `down_proj`.
    fn out_weight(self, m: &Model, l: usize) -> &Tensor {
        match self {
            Unit::Heads => m.blocks[l].o.w(),
            Unit::Neurons => m.blocks[l].down.w(),
        }
    }
}

/// The ranking method.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum By {
    /// Loss increase when the unit is zeroed.
    AblationZero,
    /// Loss increase when the unit is replaced by its mean over the calibration tokens.
    AblationMean,
    /// Michel et al.: |∂L/∂mask| per window, averaged, normalised per layer.
    Gradient,
    /// FLAP fluctuation: var(channel) · ‖weight column‖², summed over a head's channels.
    Flap,
    /// Structured Wanda: ‖channel‖₂ · Σ|weight column|, summed over a head's channels.
    Wanda,
}

impl By {
    pub fn name(self) -> &'static str {
        match self {
            By::AblationZero => "ablation-zero",
            By::AblationMean => "ablation-mean",
            By::Gradient => "gradient",
            By::Flap => "flap",
            By::Wanda => "wanda",
        }
    }
    pub fn meaning(self) -> &'static str {
        match self {
            By::AblationZero => "increase of the mean NLL when the unit is zeroed; lowest = least important",
            By::AblationMean => {
                "increase of the mean NLL when the unit is replaced by its calibration mean; lowest = least important"
            }
            By::Gradient => {
                "Michel et al. |dL/d mask| per window, averaged over windows, divided by the layer's L2 norm (extra raw = before); lowest = least important"
            }
            By::Flap => "FLAP fluctuation: sample variance of the input channel × squared norm of its output-projection column (summed over a head's channels); lowest = least important",
            By::Wanda => "structured Wanda: L2 norm of the input channel over tokens × sum of |output-projection column| (summed over a head's channels); lowest = least important",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Options {
    pub by: By,
    /// Window length in tokens (the text is cut into disjoint windows).
    pub seq_len: usize,
    /// Layers to score (empty = all).
    pub layers: Vec<usize>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Importance {
    pub unit: Unit,
    pub by: By,
    /// The layers scored, in order; `scores[i]` belongs to `layers[i]`.
    pub layers: Vec<usize>,
    /// Per layer, per unit.
    pub scores: Vec<Vec<f64>>,
    /// `gradient`: the scores before the per-layer normalisation.
    pub raw: Option<Vec<Vec<f64>>>,
    /// The clean mean NLL over the calibration windows (ablation methods).
    pub base_loss: Option<f64>,
    /// Per layer, the mean of each channel (when the method measured it): [units·channels].
    #[serde(skip)]
    pub means: Option<Vec<Vec<f32>>>,
    pub windows: usize,
    pub tokens: usize,
}

/// Per layer, per channel (a head has d_head channels), the f64 sums over tokens.
#[derive(Debug, Clone)]
pub struct ChannelStats {
    pub count: usize,
    pub sum: Vec<Vec<f64>>,
    pub sumsq: Vec<Vec<f64>>,
}

impl ChannelStats {
    pub fn mean(&self, i: usize) -> Vec<f64> {
        self.sum[i].iter().map(|s| s / self.count as f64).collect()
    }
    /// Sample variance (n − 1), as FLAP's running estimate converges to.
    pub fn var(&self, i: usize) -> Vec<f64> {
        let n = self.count as f64;
        self.sum[i]
            .iter()
            .zip(&self.sumsq[i])
            .map(|(s, q)| ((q - s * s / n) / (n - 1.0).max(1.0)).max(0.0))
            .collect()
    }
    /// ‖X_j‖₂ over tokens.
    pub fn norm(&self, i: usize) -> Vec<f64> {
        self.sumsq[i].iter().map(|q| q.sqrt()).collect()
    }
}

/// The windows of `ids` that have something to predict.
pub fn windows(ids: &[u32], seq_len: usize) -> Vec<&[u32]> {
    ids.chunks(seq_len).filter(|w| w.len() >= 2).collect()
}

/// Channel sums over every token of every window at the units' hook sites of `layers`.
pub fn channel_stats(
    m: &Model,
    wins: &[&[u32]],
    unit: Unit,
    layers: &[usize],
    mut progress: impl FnMut(usize, usize),
) -> Result<ChannelStats> {
    let widths: Vec<usize> = layers.iter().map(|&l| unit.shape(m, l)).map(|(u, c)| u * c).collect();
    let mut st = ChannelStats {
        count: 0,
        sum: widths.iter().map(|&w| vec![0.0; w]).collect(),
        sumsq: widths.iter().map(|&w| vec![0.0; w]).collect(),
    };
    for (w, win) in wins.iter().enumerate() {
        progress(w, wins.len());
        let mut h = Hooks::new();
        for &l in layers {
            h.capture(unit.point(l));
        }
        m.forward(&Batch::single(win), None, &mut h, Fwd::default())?;
        for (i, &l) in layers.iter().enumerate() {
            let a = h.captured[&unit.point(l)].i(0)?.reshape((win.len(), widths[i]))?.to_vec2::<f32>()?;
            for row in &a {
                for (j, &x) in row.iter().enumerate() {
                    let x = x as f64;
                    st.sum[i][j] += x;
                    st.sumsq[i][j] += x * x;
                }
            }
        }
        st.count += win.len();
    }
    progress(wins.len(), wins.len());
    Ok(st)
}

/// Mean NLL of each row's next tokens: `logits` [rows, t, V], targets `ids[1..]` (same for all rows).
fn row_nll_sums(logits: &Tensor, ids: &[u32]) -> Result<Vec<f64>> {
    let (rows, t, _) = logits.dims3()?;
    let lp = candle_nn::ops::log_softmax(&logits.narrow(1, 0, t - 1)?, D::Minus1)?;
    let tgt = Tensor::from_vec(ids[1..].to_vec(), (1, t - 1, 1), logits.device())?.broadcast_as((rows, t - 1, 1))?.contiguous()?;
    let nll = lp.gather(&tgt, 2)?.squeeze(2)?.to_dtype(DType::F64)?.sum(1)?.neg()?;
    Ok(nll.to_vec1()?)
}

/// Σ_u |columns of W for u's channels| combined with per-channel statistics into per-unit scores.
fn weight_times_stat(w: &Tensor, stat: &[f64], units: usize, ch: usize, squared_norm: bool) -> Result<Vec<f64>> {
    let col: Vec<f32> = if squared_norm { w.sqr()?.sum(0)?.to_vec1()? } else { w.abs()?.sum(0)?.to_vec1()? };
    Ok((0..units)
        .map(|u| (u * ch..(u + 1) * ch).map(|j| stat[j] * col[j] as f64).sum())
        .collect())
}

fn check(m: &Model, ids: &[u32], opt: &Options, unit: Unit) -> Result<Vec<usize>> {
    let name = unit.method();
    let n = m.blocks.len();
    if n == 0 {
        return Err(Error::invalid(format!("{name}: the model has no blocks")));
    }
    if opt.seq_len < 2 {
        return Err(Error::invalid(format!("{name}: --seq-len must be at least 2, got {}", opt.seq_len)));
    }
    if ids.len() < 2 {
        return Err(Error::invalid(format!("{name}: need at least 2 calibration tokens")));
    }
    let mut layers = if opt.layers.is_empty() { (0..n).collect() } else { opt.layers.clone() };
    layers.sort_unstable();
    layers.dedup();
    if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
        return Err(Error::invalid(format!(
            "{name}: --layers: layer {bad} does not exist (the model has layers 0..{})",
            n - 1
        )));
    }
    Ok(layers)
}

/// Score every unit of the chosen layers. `progress(stage, done, total)`.
pub fn importance(
    m: &Model,
    ids: &[u32],
    unit: Unit,
    opt: &Options,
    mut progress: impl FnMut(&str, usize, usize),
) -> Result<Importance> {
    let layers = check(m, ids, opt, unit)?;
    let wins = windows(ids, opt.seq_len);
    let tokens: usize = wins.iter().map(|w| w.len()).sum();
    let mut r = Importance {
        unit,
        by: opt.by,
        layers: layers.clone(),
        scores: vec![],
        raw: None,
        base_loss: None,
        means: None,
        windows: wins.len(),
        tokens,
    };
    match opt.by {
        By::Flap | By::Wanda => {
            let st = channel_stats(m, &wins, unit, &layers, |i, n| progress("statistics", i, n))?;
            for (i, &l) in layers.iter().enumerate() {
                let (units, ch) = unit.shape(m, l);
                let w = unit.out_weight(m, l);
                r.scores.push(if opt.by == By::Flap {
                    weight_times_stat(w, &st.var(i), units, ch, true)?
                } else {
                    weight_times_stat(w, &st.norm(i), units, ch, false)?
                });
            }
            r.means = Some((0..layers.len()).map(|i| st.mean(i).iter().map(|&x| x as f32).collect()).collect());
        }
        By::Gradient => {
            let raw = gradient_scores(m, &wins, unit, &layers, |i, n| progress("gradients", i, n))?;
            r.scores = raw
                .iter()
                .map(|v| {
                    let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
                    v.iter().map(|x| x / (norm + 1e-20)).collect()
                })
                .collect();
            r.raw = Some(raw);
        }
        By::AblationZero | By::AblationMean => {
            let means = if opt.by == By::AblationMean {
                let st = channel_stats(m, &wins, unit, &layers, |i, n| progress("means", i, n))?;
                Some((0..layers.len()).map(|i| st.mean(i).iter().map(|&x| x as f32).collect::<Vec<f32>>()).collect::<Vec<_>>())
            } else {
                None
            };
            let (scores, base) = ablation_scores(m, &wins, unit, &layers, means.as_deref(), |i, n| progress("ablations", i, n))?;
            r.scores = scores;
            r.base_loss = Some(base);
            r.means = means;
        }
    }
    Ok(r)
}

/// Michel et al.: per window, the gradient of the window's mean NLL with respect to a mask of ones
/// on every unit; |·| per window, averaged over windows weighted by their predicted tokens.
pub fn gradient_scores(
    m: &Model,
    wins: &[&[u32]],
    unit: Unit,
    layers: &[usize],
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<Vec<f64>>> {
    let total: usize = wins.iter().map(|w| w.len() - 1).sum();
    let mut acc: Vec<Vec<f64>> = layers.iter().map(|&l| vec![0.0; unit.shape(m, l).0]).collect();
    for (w, win) in wins.iter().enumerate() {
        progress(w, wins.len());
        let mut h = Hooks::new();
        let mut vars = Vec::with_capacity(layers.len());
        for &l in layers {
            let (units, _) = unit.shape(m, l);
            let var = Var::ones(units, DType::F32, &m.device)?;
            let shape: Vec<usize> = match unit {
                Unit::Heads => vec![1, 1, units, 1],
                Unit::Neurons => vec![1, 1, units],
            };
            let mask = var.as_tensor().reshape(shape)?;
            h.intervene(unit.point(l), Op::Func(Arc::new(move |x: &Tensor| x.broadcast_mul(&mask))));
            vars.push(var);
        }
        let logits = m.forward(&Batch::single(win), None, &mut h, Fwd { grad: true, ..Fwd::default() })?;
        let t = win.len();
        let lp = candle_nn::ops::log_softmax(&logits.i(0)?.narrow(0, 0, t - 1)?, D::Minus1)?;
        let tgt = Tensor::from_vec(win[1..].to_vec(), (t - 1, 1), &m.device)?;
        let loss = lp.gather(&tgt, 1)?.mean_all()?.neg()?;
        let grads = loss.backward()?;
        let weight = (t - 1) as f64 / total as f64;
        for (i, var) in vars.iter().enumerate() {
            let g: Vec<f32> = match grads.get(var.as_tensor()) {
                Some(g) => g.to_vec1()?,
                None => vec![0.0; acc[i].len()],
            };
            for (a, g) in acc[i].iter_mut().zip(g) {
                *a += weight * (g as f64).abs();
            }
        }
    }
    progress(wins.len(), wins.len());
    Ok(acc)
}

/// At most this many logits per batch of ablation rows (memory of the unembedding).
const LOGIT_BUDGET: usize = 1 << 25;

/// Ablation: per window, the clean loss and the residual stream entering each scored layer; then
/// per layer, rows of the same input with one unit ablated each, run from that layer on.
/// Returns (per layer per unit: loss increase, clean loss).
pub fn ablation_scores(
    m: &Model,
    wins: &[&[u32]],
    unit: Unit,
    layers: &[usize],
    means: Option<&[Vec<f32>]>,
    mut progress: impl FnMut(usize, usize),
) -> Result<(Vec<Vec<f64>>, f64)> {
    let n_layers = m.blocks.len();
    let total: usize = wins.iter().map(|w| w.len() - 1).sum();
    let mut sums: Vec<Vec<f64>> = layers.iter().map(|&l| vec![0.0; unit.shape(m, l).0]).collect();
    let mut base = 0f64;
    let steps: usize = wins.len() * layers.iter().map(|&l| unit.shape(m, l).0).sum::<usize>();
    let mut done = 0;
    for win in wins {
        let t = win.len();
        let mut h = Hooks::new();
        for &l in layers {
            h.capture(HookPoint::ResidPre(l));
        }
        let logits = m.forward(&Batch::single(win), None, &mut h, Fwd::default())?;
        let clean = row_nll_sums(&logits, win)?[0];
        base += clean;
        let chunk = (LOGIT_BUDGET / (t * m.cfg.vocab_size)).max(1);
        for (i, &l) in layers.iter().enumerate() {
            let (units, ch) = unit.shape(m, l);
            let x = &h.captured[&HookPoint::ResidPre(l)];
            let mean = match means {
                Some(ms) => Some(Tensor::from_slice(&ms[i], ms[i].len(), &m.device)?),
                None => None,
            };
            for start in (0..units).step_by(chunk) {
                progress(done, steps);
                let rows = chunk.min(units - start);
                // keep[r, u] = 0 where row r ablates unit start + r.
                let mut keep = vec![1f32; rows * units];
                for r in 0..rows {
                    keep[r * units + start + r] = 0.0;
                }
                let (keep, mean) = match unit {
                    Unit::Heads => (
                        Tensor::from_vec(keep, (rows, 1, units, 1), &m.device)?,
                        mean.as_ref().map(|v| v.reshape((1, 1, units, ch))).transpose()?,
                    ),
                    Unit::Neurons => (
                        Tensor::from_vec(keep, (rows, 1, units), &m.device)?,
                        mean.as_ref().map(|v| v.reshape((1, 1, units))).transpose()?,
                    ),
                };
                // Mean ablation adds mean · (1 − keep) to the kept activations.
                let add = mean.as_ref().map(|mu| mu.broadcast_mul(&keep.affine(-1.0, 1.0)?)).transpose()?;
                let f = move |a: &Tensor| -> candle_core::Result<Tensor> {
                    let kept = a.broadcast_mul(&keep)?;
                    match &add {
                        None => Ok(kept),
                        Some(add) => kept.broadcast_add(add),
                    }
                };
                let mut hr = Hooks::new();
                hr.intervene(unit.point(l), Op::Func(Arc::new(f)));
                let xs = x.broadcast_as((rows, t, m.cfg.hidden_size))?.contiguous()?;
                let y = m.forward_from(xs, l..n_layers, 0, None, &mut hr, Fwd::default())?;
                let logits = m.unembed(y, &mut hr, Fwd::default())?;
                for (r, nll) in row_nll_sums(&logits, win)?.into_iter().enumerate() {
                    sums[i][start + r] += nll - clean;
                }
                done += rows;
            }
        }
    }
    progress(steps, steps);
    let scores = sums.iter().map(|v| v.iter().map(|s| s / total as f64).collect()).collect();
    Ok((scores, base / total as f64))
}

/// Findings on `L{l}.H{h}` / `L{l}.N{n}`; with `gradient` each score carries `raw` (before the
/// per-layer normalisation).
pub fn findings(r: &Importance, options: serde_json::Value, model: Source, data: Vec<Source>) -> Findings {
    let mut f = Findings::new(r.unit.method(), r.by.meaning(), options, model, data);
    for (i, &l) in r.layers.iter().enumerate() {
        for (u, &s) in r.scores[i].iter().enumerate() {
            let sc = f.push(r.unit.component(l, u), s);
            if let Some(raw) = &r.raw {
                sc.extra.insert("raw".into(), serde_json::json!(raw[i][u]));
            }
        }
    }
    f.summary.insert("by".into(), r.by.name().into());
    f.summary.insert("windows".into(), r.windows.into());
    f.summary.insert("tokens".into(), r.tokens.into());
    if let Some(b) = r.base_loss {
        f.summary.insert("base_loss".into(), serde_json::json!(b));
    }
    f
}

/// Add to `h` the runtime interventions that zero (or, with `means`, mean-ablate)
/// the given units of layer `l` (`means`: the layer's channel means, [units·channels]).
pub fn ablate_hooks(h: &mut Hooks, m: &Model, unit: Unit, l: usize, units: &[usize], means: Option<&[f32]>) -> Result<()> {
    let (n, ch) = unit.shape(m, l);
    let mut scale = vec![1f32; n];
    for &u in units {
        scale[u] = 0.0;
    }
    h.intervene(unit.point(l), Op::Scale(scale));
    if let Some(mu) = means {
        let mut add = vec![0f32; n * ch];
        for &u in units {
            add[u * ch..(u + 1) * ch].copy_from_slice(&mu[u * ch..(u + 1) * ch]);
        }
        let t = match unit {
            Unit::Heads => Tensor::from_vec(add, (n, ch), &Device::Cpu)?,
            Unit::Neurons => Tensor::from_vec(add, n, &Device::Cpu)?,
        };
        h.intervene(unit.point(l), Op::Add(t));
    }
    Ok(())
}

/// The calibration options head and neuron importance share.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct CommonSpec {
    /// Calibration text (plain text, e.g. WikiText-2's wiki.test.raw).
    #[arg(long)]
    pub text: std::path::PathBuf,
    /// Calibration tokens taken from the start of --text, after --skip (0 = all).
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Skip this many tokens at the start of --text first (hold them out, e.g. for the
    /// perplexity a compile's [verify] measures on the same file).
    #[arg(long, default_value_t = 0)]
    pub skip: usize,
    /// Window length: the text is cut into disjoint windows of this many tokens.
    #[arg(long, default_value_t = 256)]
    pub seq_len: usize,
    /// Score only these layers (comma-separated; default: all).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
}

/// Score every query head `L{l}.H{h}` over calibration text; low = least important
///
/// The first to prune with `prune-heads`. A head is its slice of `blocks.{l}.attn.hook_z`, i.e.
/// its d_head input channels of `o_proj`.
///
/// --by:
///   flap           (default) FLAP fluctuation: Σ over the head's channels of the sample variance of
///                  z over tokens × ‖o_proj column‖²; one forward per window
///   wanda          structured Wanda: Σ over the head's channels of ‖z_j‖₂ over tokens × Σ_i |o_proj_ij|
///   gradient       Michel et al. 2019: |∂L/∂ξ_h| for a mask ξ_h = 1 on the head's output (=|Σ_t z·∂L/∂z|),
///                  per window, averaged, then divided by the layer's L2 norm as Michel et al. do
///                  (findings keep the unnormalised value as `raw`); one forward + backward per window
///   ablation-zero  increase of the mean NLL when the head is zeroed; exact, costs about
///                  heads × (layers − l) extra block passes per layer l and window (SmolLM2: ~140 forwards per window)
///   ablation-mean  the same, with the head replaced by its calibration mean (prune-heads' compensate = "mean")
///
/// Findings: `L{l}.H{h}` with the score; summary: by, windows, tokens (and base_loss for ablations).
#[derive(clap::Args, Debug, Clone, Serialize)]
#[command(verbatim_doc_comment)]
pub struct HeadSpec {
    /// Ranking method (see above).
    #[arg(long, value_enum, default_value_t = By::Flap)]
    pub by: By,
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonSpec,
}

/// Score every MLP neuron (e.g. `L3.N17`) over calibration text; low = least important
///
/// The first to prune with `prune-neurons`. A neuron is channel n of `blocks.{l}.mlp.hook_post`,
/// the input of `down_proj`.
///
/// --by:
///   flap           (default, FLAP's choice) sample variance of the neuron over tokens × ‖down_proj[:, n]‖²;
///                  one forward per window
///   wanda          structured Wanda: ‖a_n‖₂ over tokens × Σ_i |down_proj[i, n]|
///   gradient       Taylor / Michel et al.: |Σ_t a_n·∂L/∂a_n| per window (the gradient of a mask on the
///                  neuron), averaged, divided by the layer's L2 norm (`raw` keeps the value before)
///   ablation-zero  increase of the mean NLL when the neuron is zeroed. COSTLY: one extra row per
///                  neuron run from its layer on (SmolLM2: 46k rows per window, hours on a CPU);
///                  restrict it with --layers
///   ablation-mean  the same, with the neuron replaced by its calibration mean (FLAP's compensation)
///
/// Findings: `L{l}.N{i}` with the score; summary: by, windows, tokens (and base_loss for ablations).
#[derive(clap::Args, Debug, Clone, Serialize)]
#[command(verbatim_doc_comment)]
pub struct NeuronSpec {
    /// Ranking method (see above).
    #[arg(long, value_enum, default_value_t = By::Flap)]
    pub by: By,
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonSpec,
}

impl super::Method for HeadSpec {
    fn check(&self) -> Result<()> {
        super::require_file(&self.common.text)
    }
    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        self.common.run(self.by, Unit::Heads, cx)
    }
}

impl super::Method for NeuronSpec {
    fn check(&self) -> Result<()> {
        super::require_file(&self.common.text)
    }
    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        self.common.run(self.by, Unit::Neurons, cx)
    }
}

impl CommonSpec {
    fn run(&self, by: By, unit: Unit, cx: &super::Ctx) -> Result<super::Located> {
        let n = cx.model().blocks.len();
        if let Some(&bad) = self.layers.iter().find(|&&l| l >= n) {
            return Err(Error::invalid(format!("--layers: layer {bad} does not exist (the model has layers 0..{})", n - 1)));
        }
        let want = if self.tokens == 0 { 0 } else { self.skip + self.tokens };
        let mut ids = super::text_ids(cx.tok()?, &self.text, want)?;
        if self.skip >= ids.len() {
            return Err(Error::invalid(format!("--skip {}: the text has only {} tokens", self.skip, ids.len())));
        }
        ids.drain(..self.skip);
        let opt = Options { by, seq_len: self.seq_len, layers: self.layers.clone() };
        let bar = super::bar(by.name(), cx.progress);
        let r = importance(cx.model(), &ids, unit, &opt, |stage, i, n| {
            bar.set_message(stage.to_string());
            bar.set_length(n as u64);
            bar.set_position(i as u64);
        })?;
        bar.finish_and_clear();
        let options = serde_json::json!({
            "by": by.name(), "tokens": r.tokens, "skip": self.skip, "seq_len": self.seq_len,
            "windows": r.windows, "layers": r.layers,
        });
        Ok(super::Located::new(findings(&r, options, cx.source.clone(), vec![Source::file(&self.text)?])))
    }
}
