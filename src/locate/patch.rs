//! Activation patching (e.g. Wang et al. 2022; Heimersheim & Nanda 2024, "How to use and
//! interpret activation patching"): run a clean and a corrupted prompt of the same token length,
//! patch one clean activation into the corrupted run, and measure how much of the clean
//! behaviour comes back.
//!
//! Sites: `resid` (`blocks.{l}.hook_resid_pre` at one position), `mlp` (`hook_mlp_out` at one
//! position), `head` (one head's `attn.hook_z` at every position). Metric at the last position:
//! the logit difference logit(answer) − logit(wrong), or p(answer); reported normalised as
//! (m_patched − m_corrupt) / (m_clean − m_corrupt): 0 = no effect, 1 = the clean value.
//!
//! Every patch of one layer and site runs as one batch (a row per position or head), from that
//! layer on ([`Model::forward_from`]) with the corrupted run's residual stream entering it.

use std::sync::Arc;

use candle_core::{IndexOp, Tensor};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ir::{Component, Findings, Source};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::{Batch, HookPoint, Hooks, Op};

pub const METHOD: &str = "patch";

/// Where clean activations are patched in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PatchSite {
    /// The residual stream entering the block (`hook_resid_pre`), one position at a time.
    Resid,
    /// The MLP output (`hook_mlp_out`), one position at a time.
    Mlp,
    /// One attention head's output (`attn.hook_z`) at every position.
    Head,
}

impl PatchSite {
    pub const ALL: [PatchSite; 3] = [PatchSite::Resid, PatchSite::Mlp, PatchSite::Head];

    pub fn name(self) -> &'static str {
        match self {
            PatchSite::Resid => "resid",
            PatchSite::Mlp => "mlp",
            PatchSite::Head => "head",
        }
    }
}

/// What is measured at the last position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Metric {
    /// logit(answer) − logit(wrong).
    LogitDiff,
    /// p(answer).
    Prob,
}

#[derive(Debug, Clone, Serialize)]
pub struct Patching {
    pub answer: u32,
    pub wrong: Option<u32>,
    pub metric: Metric,
    pub m_clean: f64,
    pub m_corrupt: f64,
    /// Per site (in the order asked), the normalised effect: `[position][layer]` for resid and
    /// mlp, `[head][layer]` for head (NaN where a pruned layer has fewer heads).
    pub grids: Vec<(PatchSite, Vec<Vec<f64>>)>,
}

/// The metric of every row of `logits` [rows, t, vocab] at the last position.
pub(crate) fn metric(logits: &Tensor, m: Metric, answer: u32, wrong: Option<u32>) -> Result<Vec<f64>> {
    let t = logits.dim(1)?;
    let last = logits.i((.., t - 1, ..))?.contiguous()?;
    let col = |x: &Tensor, id: u32| -> Result<Vec<f64>> { Ok(x.i((.., id as usize))?.to_vec1::<f32>()?.into_iter().map(f64::from).collect()) };
    match (m, wrong) {
        (Metric::Prob, _) => col(&candle_nn::ops::softmax_last_dim(&last)?, answer),
        (Metric::LogitDiff, Some(w)) => Ok(col(&last, answer)?.iter().zip(col(&last, w)?).map(|(a, b)| a - b).collect()),
        (Metric::LogitDiff, None) => Err(Error::invalid("patch: the logit difference needs a wrong answer")),
    }
}

fn captured(hooks: &Hooks, p: HookPoint) -> Result<Tensor> {
    hooks.captured.get(&p).cloned().ok_or_else(|| Error::invalid(format!("patch: {p} was not captured")))
}

/// One run of `ids`, capturing resid_pre, mlp_out and hook_z of every layer.
fn run(model: &Model, ids: &[u32]) -> Result<(Hooks, Tensor)> {
    let mut hooks = Hooks::new();
    for l in 0..model.blocks.len() {
        hooks.capture(HookPoint::ResidPre(l)).capture(HookPoint::MlpOut(l)).capture(HookPoint::AttnZ(l));
    }
    let logits = model.forward(&Batch::single(ids), None, &mut hooks, Fwd { last_only: true, ..Fwd::default() })?;
    Ok((hooks, logits))
}

/// `x` with, in row r, the entries where `mask` (broadcast to x) is 1 taken from `value`.
fn select(mask: Vec<u8>, mask_shape: &[usize], value: &Tensor, x: &Tensor) -> candle_core::Result<Tensor> {
    let m = Tensor::from_vec(mask, mask_shape, x.device())?.broadcast_as(x.shape())?;
    m.where_cond(&value.broadcast_as(x.shape())?, x)
}

/// The metric for every patch of `site` at layer `l`: one per position, or one per head.
fn patch_layer(model: &Model, site: PatchSite, l: usize, clean: &Hooks, corrupt: &Hooks, m: (Metric, u32, Option<u32>)) -> Result<Vec<f64>> {
    let layers = model.blocks.len();
    let x = captured(corrupt, HookPoint::ResidPre(l))?; // [1, t, d]
    let t = x.dim(1)?;
    let mut hooks = Hooks::new();
    let (rows, state) = match site {
        PatchSite::Resid => {
            let mask: Vec<u8> = (0..t * t).map(|i| (i / t == i % t) as u8).collect();
            let value = captured(clean, HookPoint::ResidPre(l))?;
            (t, select(mask, &[t, t, 1], &value, &x.repeat((t, 1, 1))?)?)
        }
        PatchSite::Mlp => {
            let value = captured(clean, HookPoint::MlpOut(l))?;
            let f = move |y: &Tensor| {
                let t = y.dim(1)?;
                select((0..t * t).map(|i| (i / t == i % t) as u8).collect(), &[t, t, 1], &value, y)
            };
            hooks.intervene(HookPoint::MlpOut(l), Op::Func(Arc::new(f)));
            (t, x.repeat((t, 1, 1))?)
        }
        PatchSite::Head => {
            let value = captured(clean, HookPoint::AttnZ(l))?; // [1, t, heads, hd]
            let h = value.dim(2)?;
            let f = move |z: &Tensor| select((0..h * h).map(|i| (i / h == i % h) as u8).collect(), &[h, 1, h, 1], &value, z);
            hooks.intervene(HookPoint::AttnZ(l), Op::Func(Arc::new(f)));
            (h, x.repeat((h, 1, 1))?)
        }
    };
    let y = model.forward_from(state, l..layers, 0, None, &mut hooks, Fwd::default())?;
    let logits = model.unembed(y, &mut Hooks::new(), Fwd { last_only: true, ..Fwd::default() })?;
    let v = metric(&logits, m.0, m.1, m.2)?;
    debug_assert_eq!(v.len(), rows);
    Ok(v)
}

/// The two captured runs and the resolved metric, shared by [`patch`] and [`patch_heads`].
struct Prepared {
    clean: Hooks,
    corrupt: Hooks,
    answer: u32,
    wrong: Option<u32>,
    m_clean: f64,
    m_corrupt: f64,
}

/// Refuse prompts of different (or zero) token lengths and answer ids outside the vocabulary.
/// `method` names the caller in the message.
pub(crate) fn check_pair(method: &str, model: &Model, clean_ids: &[u32], corrupt_ids: &[u32], answer: Option<u32>, wrong: Option<u32>) -> Result<()> {
    if clean_ids.is_empty() || clean_ids.len() != corrupt_ids.len() {
        return Err(Error::invalid(format!(
            "{method}: the clean prompt has {} tokens and the corrupted one {}; activation patching needs prompts of the same (non-zero) length",
            clean_ids.len(),
            corrupt_ids.len()
        )));
    }
    let vocab = model.cfg.vocab_size as u32;
    if let Some(bad) = [answer, wrong].into_iter().flatten().find(|&id| id >= vocab) {
        return Err(Error::invalid(format!("{method}: token id {bad} is outside the vocabulary ({vocab})")));
    }
    Ok(())
}

/// The answer (default: greedy on the clean run) and the wrong answer (logit difference only;
/// default: greedy on the corrupted run), from last-position logits [1, 1, vocab].
pub(crate) fn resolve_answers(
    method: &str,
    m: Metric,
    answer: Option<u32>,
    wrong: Option<u32>,
    clean_logits: &Tensor,
    corrupt_logits: &Tensor,
) -> Result<(u32, Option<u32>)> {
    let greedy = |x: &Tensor| -> Result<u32> { Ok(x.flatten_all()?.argmax(0)?.to_scalar::<u32>()?) };
    let answer = match answer {
        Some(a) => a,
        None => greedy(clean_logits)?,
    };
    let wrong = match (m, wrong) {
        (Metric::Prob, w) => w,
        (Metric::LogitDiff, Some(w)) => Some(w),
        (Metric::LogitDiff, None) => Some(greedy(corrupt_logits)?),
    };
    if m == Metric::LogitDiff && wrong == Some(answer) {
        return Err(Error::invalid(format!(
            "{method}: the answer and the wrong answer are the same token ({answer}); name them with --answer / --wrong"
        )));
    }
    Ok((answer, wrong))
}

/// Refuse a pair whose clean and corrupted metrics are equal (nothing to normalise by).
pub(crate) fn check_gap(method: &str, m_clean: f64, m_corrupt: f64) -> Result<()> {
    if (m_clean - m_corrupt).abs() < 1e-9 {
        return Err(Error::invalid(format!(
            "{method}: the clean and corrupted prompts give the same metric ({m_clean}); there is nothing to restore"
        )));
    }
    Ok(())
}

fn prepare(model: &Model, clean_ids: &[u32], corrupt_ids: &[u32], answer: Option<u32>, wrong: Option<u32>, m: Metric) -> Result<Prepared> {
    check_pair(METHOD, model, clean_ids, corrupt_ids, answer, wrong)?;
    let (clean, clean_logits) = run(model, clean_ids)?;
    let (corrupt, corrupt_logits) = run(model, corrupt_ids)?;
    let (answer, wrong) = resolve_answers(METHOD, m, answer, wrong, &clean_logits, &corrupt_logits)?;
    let m_clean = metric(&clean_logits, m, answer, wrong)?[0];
    let m_corrupt = metric(&corrupt_logits, m, answer, wrong)?[0];
    check_gap(METHOD, m_clean, m_corrupt)?;
    Ok(Prepared { clean, corrupt, answer, wrong, m_clean, m_corrupt })
}

/// Patch every site of `sites` at every layer. `answer` / `wrong` default to the greedy tokens
/// of the clean / corrupted prompts. `progress(done, total)` counts layers × sites.
#[allow(clippy::too_many_arguments)]
pub fn patch(
    model: &Model,
    clean_ids: &[u32],
    corrupt_ids: &[u32],
    answer: Option<u32>,
    wrong: Option<u32>,
    m: Metric,
    sites: &[PatchSite],
    mut progress: impl FnMut(usize, usize),
) -> Result<Patching> {
    let p = prepare(model, clean_ids, corrupt_ids, answer, wrong, m)?;
    let (m_clean, m_corrupt) = (p.m_clean, p.m_corrupt);
    let spec = (m, p.answer, p.wrong);
    let layers = model.blocks.len();
    let total = layers * sites.len();
    let mut grids = vec![];
    for (n, &site) in sites.iter().enumerate() {
        let mut cols = vec![];
        for l in 0..layers {
            progress(n * layers + l, total);
            let v = patch_layer(model, site, l, &p.clean, &p.corrupt, spec)?;
            cols.push(v.iter().map(|x| (x - m_corrupt) / (m_clean - m_corrupt)).collect::<Vec<f64>>());
        }
        let rows = cols.iter().map(Vec::len).max().unwrap_or(0);
        let grid = (0..rows).map(|r| cols.iter().map(|c| c.get(r).copied().unwrap_or(f64::NAN)).collect()).collect();
        grids.push((site, grid));
    }
    progress(total, total);
    Ok(Patching { answer: p.answer, wrong: p.wrong, metric: m, m_clean, m_corrupt, grids })
}

/// The normalised patching effect of each head in `heads` (`(layer, head)`, any order), as
/// [`patch`] computes it for the `head` site, running only the layers that hold one of them.
/// For checking cheaper estimates (attribution patching) against the real thing.
pub fn patch_heads(
    model: &Model,
    clean_ids: &[u32],
    corrupt_ids: &[u32],
    answer: Option<u32>,
    wrong: Option<u32>,
    m: Metric,
    heads: &[(usize, usize)],
) -> Result<Vec<f64>> {
    if let Some(&(l, h)) = heads.iter().find(|&&(l, h)| l >= model.blocks.len() || h >= model.blocks[l].q.out_features() / model.cfg.head_dim) {
        return Err(Error::invalid(format!("patch: the model has no head L{l}.H{h}")));
    }
    let p = prepare(model, clean_ids, corrupt_ids, answer, wrong, m)?;
    let mut by_layer: std::collections::BTreeMap<usize, Vec<f64>> = Default::default();
    for &(l, _) in heads {
        if !by_layer.contains_key(&l) {
            let v = patch_layer(model, PatchSite::Head, l, &p.clean, &p.corrupt, (m, p.answer, p.wrong))?;
            by_layer.insert(l, v);
        }
    }
    Ok(heads.iter().map(|&(l, h)| (by_layer[&l][h] - p.m_corrupt) / (p.m_clean - p.m_corrupt)).collect())
}

/// Findings: `L{l}` (resid) and `L{l}.mlp` with score = the largest normalised effect over
/// positions (extra: that position), `L{l}.H{h}` with score = the head's normalised effect.
/// Summary: the metric's clean and corrupted values and the full grids.
pub fn findings(p: &Patching, options: serde_json::Value, model: Source, data: Vec<Source>) -> Findings {
    let meaning = "normalised patching effect (m_patched − m_corrupt) / (m_clean − m_corrupt): 1 = the clean value";
    let mut f = Findings::new(METHOD, meaning, options, model, data);
    for (site, grid) in &p.grids {
        let layers = grid.first().map_or(0, Vec::len);
        for l in 0..layers {
            match site {
                PatchSite::Head => {
                    for (h, row) in grid.iter().enumerate() {
                        if row[l].is_finite() {
                            f.push(Component::Head { layer: l, head: h }, row[l]);
                        }
                    }
                }
                _ => {
                    let best = (0..grid.len()).max_by(|&a, &b| grid[a][l].total_cmp(&grid[b][l])).unwrap_or(0);
                    let c = if *site == PatchSite::Resid { Component::Block(l) } else { Component::Mlp(l) };
                    let s = f.push(c, grid[best][l]);
                    s.extra.insert("position".into(), best.into());
                }
            }
        }
    }
    f.summary.insert("m_clean".into(), serde_json::json!(p.m_clean));
    f.summary.insert("m_corrupt".into(), serde_json::json!(p.m_corrupt));
    let grids: serde_json::Map<String, serde_json::Value> =
        p.grids.iter().map(|(s, g)| (s.name().to_string(), serde_json::json!(g))).collect();
    f.summary.insert("grids".into(), grids.into());
    f
}

/// The prompt pair and metric that `patch` and `attribute` share.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct PairSpec {
    /// The clean prompt (its activations are patched in).
    #[arg(long)]
    pub clean: String,
    /// The corrupted prompt (patched; attribution takes its gradient here); must have as many
    /// tokens as --clean.
    #[arg(long)]
    pub corrupted: String,
    /// Wrap the prompts in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// The answer (first token counts; mind the leading space). Default: the greedy next token
    /// on the clean prompt.
    #[arg(long)]
    pub answer: Option<String>,
    /// The wrong answer of the logit difference. Default: the greedy next token on the
    /// corrupted prompt.
    #[arg(long)]
    pub wrong: Option<String>,
    /// The metric at the last position.
    #[arg(long, value_enum, default_value_t = Metric::LogitDiff)]
    pub metric: Metric,
}

/// A tokenized [`PairSpec`]: both prompts' ids (equal lengths) and the answer tokens given.
pub struct Pair {
    pub clean: Vec<u32>,
    pub corrupt: Vec<u32>,
    pub answer: Option<u32>,
    pub wrong: Option<u32>,
}

impl PairSpec {
    /// Tokenize the pair; `method` names what needs equal lengths.
    pub fn tokenize(&self, tok: &crate::tokenizer::Tok, method: &str) -> Result<Pair> {
        let clean = tok.prompt_ids(&self.clean, self.chat)?;
        let corrupt = tok.prompt_ids(&self.corrupted, self.chat)?;
        if clean.len() != corrupt.len() {
            return Err(Error::invalid(format!(
                "--clean has {} tokens and --corrupted {}: {method} needs prompts of the same token length",
                clean.len(),
                corrupt.len()
            )));
        }
        let answer = self.answer.as_deref().map(|t| super::first_token(tok, "--answer", t)).transpose()?;
        let wrong = self.wrong.as_deref().map(|t| super::first_token(tok, "--wrong", t)).transpose()?;
        Ok(Pair { clean, corrupt, answer, wrong })
    }

    /// The options a finding records: the pair, and the answer tokens as resolved.
    pub fn options(&self, tok: &crate::tokenizer::Tok, answer: u32, wrong: Option<u32>) -> serde_json::Value {
        let decode = |id: u32| tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
        serde_json::json!({
            "clean": self.clean, "corrupted": self.corrupted, "chat": self.chat, "metric": self.metric,
            "answer_id": answer, "answer": decode(answer), "wrong_id": wrong, "wrong": wrong.map(decode),
        })
    }

    pub fn sources(&self) -> Vec<Source> {
        vec![Source::inline(&self.clean), Source::inline(&self.corrupted)]
    }
}

impl Pair {
    /// Row labels of a positions × layers plot: the token, or `clean/corrupted` where they differ.
    pub fn rows(&self, tok: &crate::tokenizer::Tok) -> Vec<String> {
        let decode = |id: u32| tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
        self.clean.iter().zip(&self.corrupt).map(|(&c, &x)| if c == x { decode(c) } else { format!("{}/{}", decode(c), decode(x)) }).collect()
    }
}

/// Activation patching per layer × position (residual, MLP) and per head.
///
/// Run a clean and a corrupted prompt of the same token length (e.g. "The Eiffel Tower is in" /
/// "The Colosseum is in"), patch one clean activation at a time into the corrupted run, and
/// measure the normalised effect (m_patched − m_corrupt) / (m_clean − m_corrupt) on the metric at
/// the last position: the logit difference between the answer and the wrong answer, or
/// p(answer). Sites: the residual stream entering each block and each MLP's output per position,
/// and each attention head's output (`attn.hook_z`, all positions).
///
/// Findings: `L{l}` (resid) and `L{l}.mlp` with score = the largest effect over positions;
/// `L{l}.H{h}` with score = the head's effect. The summary holds the full grids.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Spec {
    #[command(flatten)]
    #[serde(flatten)]
    pub pair: PairSpec,
    /// Sites to patch (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = PatchSite::ALL.to_vec())]
    pub sites: Vec<PatchSite>,
}

impl super::Method for Spec {
    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        let tok = cx.tok()?;
        let pair = self.pair.tokenize(tok, "activation patching")?;
        let bar = super::bar("layers", cx.progress);
        let p = patch(cx.model(), &pair.clean, &pair.corrupt, pair.answer, pair.wrong, self.pair.metric, &self.sites, super::tick(&bar))?;
        bar.finish_and_clear();
        let mut options = self.pair.options(tok, p.answer, p.wrong);
        options["sites"] = serde_json::json!(self.sites.iter().map(|s| s.name()).collect::<Vec<_>>());
        let mut out = super::Located::new(findings(&p, options, cx.source.clone(), self.pair.sources()));
        out.hide = &["grids"];
        if cx.plot {
            use crate::report::{heatmaps_svg, Heatmap};
            let rows = pair.rows(tok);
            let panels: Vec<Heatmap> = p
                .grids
                .iter()
                .map(|(site, grid)| Heatmap {
                    title: site.name().to_string(),
                    rows: if *site == PatchSite::Head { (0..grid.len()).map(|h| format!("H{h}")).collect() } else { rows.clone() },
                    values: grid.clone(),
                    color: plotters::style::RGBColor(8, 69, 148),
                    x_label: "layer".into(),
                })
                .collect();
            let title = format!("Activation patching, normalised {:?} (clean {:.3}, corrupted {:.3})", self.pair.metric, p.m_clean, p.m_corrupt);
            out.plot = Some(heatmaps_svg(&panels, &title)?);
        }
        Ok(out)
    }
}
