//! Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT"; as
//! kmeng01/rome `experiments/causal_trace.py` does it).
//!
//! 1. A clean run of the prompt gives p_clean = p(target) at the last position (the target is
//!    the model's own greedy top-1 unless given) and every clean activation.
//! 2. A corrupted run adds Gaussian noise N(0, σ²) to the subject tokens' embeddings
//!    (`hook_embed`), `samples` times with different noise, as one batch: p_corrupt is the mean
//!    over samples of p(target). σ defaults to 3× the standard deviation of the embedding
//!    matrix's entries (ROME: 3× the std of the subject tokens' embeddings over its fact set).
//!    The noise comes from a seeded RNG and is the same for every restoration, as in ROME.
//! 3. For each token position i and layer l, the corrupted runs are repeated with one clean state
//!    restored at position i, and p(target) (mean over samples) is recorded:
//!    - `resid`: the output of block l (`blocks.{l}.hook_resid_post`);
//!    - `mlp` / `attn`: the MLP / attention output (`hook_mlp_out` / `hook_attn_out`) of the
//!      `window` layers l − ⌊w/2⌋ .. l + ⌈w/2⌉ − 1 (clipped to the model), centred as ROME does.
//!
//! The indirect effect of a state is p_restored − p_corrupt.
//!
//! Cost: nothing before position i changes when a state at position i is restored (attention
//! is causal), so each restoration reruns only positions i.. from the first block it changes,
//! with the corrupted run's cached keys and values for the earlier positions. For one position,
//! every layer's restoration runs in one batch that grows as the layers' runs join it (a
//! restoration at layer l joins at block l + 1, or at the start of its window). Positions
//! before the subject are clean in the corrupted run too: restoring them changes nothing, and
//! their rows are p_corrupt without a forward.

use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, IndexOp, Tensor};
use rand::{rngs::StdRng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::ir::{Component, Findings, Source};
use crate::model::decoder::Fwd;
use crate::model::random::rand_distr_shim::normal;
use crate::model::Model;
use crate::runtime::{Batch, HookPoint, Hooks, KvCache, Op};
use crate::tokenizer::Tok;

pub const METHOD: &str = "causal-trace";

/// What is restored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TraceKind {
    /// The residual stream after the block (`hook_resid_post`), one layer.
    Resid,
    /// The MLP output (`hook_mlp_out`) over a window of layers.
    Mlp,
    /// The attention output (`hook_attn_out`) over a window of layers.
    Attn,
}

impl TraceKind {
    pub const ALL: [TraceKind; 3] = [TraceKind::Resid, TraceKind::Mlp, TraceKind::Attn];

    pub fn name(self) -> &'static str {
        match self {
            TraceKind::Resid => "resid",
            TraceKind::Mlp => "mlp",
            TraceKind::Attn => "attn",
        }
    }

    /// The component a heatmap column of this kind scores.
    pub fn component(self, layer: usize) -> Component {
        match self {
            TraceKind::Resid => Component::Block(layer),
            TraceKind::Mlp => Component::Mlp(layer),
            TraceKind::Attn => Component::Attn(layer),
        }
    }

    /// The layers restored for heatmap column `l` (ROME's `trace_important_window`).
    pub fn layers(self, l: usize, window: usize, n_layers: usize) -> Range<usize> {
        match self {
            TraceKind::Resid => l..l + 1,
            _ => l.saturating_sub(window / 2)..(l + window.div_ceil(2)).min(n_layers),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Options {
    /// Corrupted runs (noise samples).
    pub samples: usize,
    /// Standard deviation of the noise added to the subject's embeddings.
    pub noise: f64,
    /// Layers restored together for the `mlp` and `attn` kinds.
    pub window: usize,
    pub seed: u64,
    pub kinds: Vec<TraceKind>,
}

/// The trace of one prompt.
#[derive(Debug, Clone, Serialize)]
pub struct Trace {
    pub ids: Vec<u32>,
    /// The subject's token positions.
    pub subject: Range<usize>,
    pub target: u32,
    pub p_clean: f64,
    pub p_corrupt: f64,
    /// Per kind (in the order asked): p(target) with the state restored, `[position][layer]`.
    pub grids: Vec<(TraceKind, Vec<Vec<f64>>)>,
}

impl Trace {
    pub fn grid(&self, kind: TraceKind) -> Option<&Vec<Vec<f64>>> {
        self.grids.iter().find(|(k, _)| *k == kind).map(|(_, g)| g)
    }
}

/// 3× the standard deviation of the embedding matrix's entries: the default noise.
pub fn default_noise(model: &Model) -> Result<f64> {
    let e = model.embed.to_dtype(DType::F64)?.flatten_all()?;
    let n = e.dim(0)? as f64;
    let mean = e.sum_all()?.to_scalar::<f64>()? / n;
    let var = e.affine(1.0, -mean)?.sqr()?.sum_all()?.to_scalar::<f64>()? / n;
    Ok(3.0 * var.sqrt())
}

/// The token positions of `subject` in the prompt `ids` (its last occurrence in the decoded
/// prompt, so a chat template's system text cannot capture it): the tokens that overlap it.
pub fn subject_range(tok: &Tok, ids: &[u32], subject: &str) -> Result<Range<usize>> {
    let text = tok.decode(ids, false)?;
    let not_found = || Error::invalid(format!("subject {subject:?} is not in the prompt {text:?}"));
    if subject.is_empty() {
        return Err(Error::invalid("the subject is empty"));
    }
    let start = text.rfind(subject).ok_or_else(not_found)?;
    let end = start + subject.len();
    let (mut first, mut last) = (None, None);
    for k in 0..ids.len() {
        let upto = tok.decode(&ids[..=k], false)?.len();
        if first.is_none() && upto > start {
            first = Some(k);
        }
        if upto >= end {
            last = Some(k);
            break;
        }
    }
    match (first, last) {
        (Some(a), Some(b)) if a <= b => Ok(a..b + 1),
        _ => Err(not_found()),
    }
}

/// p(target) at the last position of every row of `logits` [rows, t, vocab].
fn target_probs(logits: &Tensor, target: u32) -> Result<Vec<f64>> {
    let t = logits.dim(1)?;
    let last = logits.i((.., t - 1, ..))?.contiguous()?;
    let p = candle_nn::ops::softmax_last_dim(&last)?.i((.., target as usize))?;
    Ok(p.to_vec1::<f32>()?.into_iter().map(f64::from).collect())
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The clean run's activations at every layer: `[1, t, d]` each.
struct Clean {
    resid_post: Vec<Tensor>,
    mlp_out: Vec<Tensor>,
    attn_out: Vec<Tensor>,
}

/// The corrupted runs: the residual stream entering and leaving each block `[samples, t, d]`,
/// and every layer's keys and values.
struct Corrupt {
    resid_pre: Vec<Tensor>,
    resid_post: Vec<Tensor>,
    cache: KvCache,
}

fn captured(hooks: &Hooks, p: HookPoint) -> Result<Tensor> {
    hooks.captured.get(&p).cloned().ok_or_else(|| Error::invalid(format!("causal-trace: {p} was not captured")))
}

fn check(model: &Model, ids: &[u32], subject: &Range<usize>, opt: &Options) -> Result<()> {
    if ids.is_empty() {
        return Err(Error::invalid("causal-trace: the prompt has no tokens"));
    }
    if subject.is_empty() || subject.end > ids.len() {
        return Err(Error::invalid(format!(
            "causal-trace: subject tokens {subject:?} are not inside the prompt ({} tokens)",
            ids.len()
        )));
    }
    if opt.samples == 0 || opt.window == 0 {
        return Err(Error::invalid("causal-trace: --samples and --window must be at least 1"));
    }
    if !opt.noise.is_finite() || opt.noise < 0.0 {
        return Err(Error::invalid(format!("causal-trace: --noise must be a finite number ≥ 0, got {}", opt.noise)));
    }
    if model.blocks.is_empty() {
        return Err(Error::invalid("causal-trace: the model has no blocks"));
    }
    Ok(())
}

/// The clean run; returns its activations, its logits at the last position.
fn clean_run(model: &Model, ids: &[u32]) -> Result<(Clean, Tensor)> {
    let layers = model.blocks.len();
    let mut hooks = Hooks::new();
    for l in 0..layers {
        hooks.capture(HookPoint::ResidPost(l)).capture(HookPoint::MlpOut(l)).capture(HookPoint::AttnOut(l));
    }
    let fwd = Fwd { last_only: true, ..Fwd::default() };
    let logits = model.forward(&Batch::single(ids), None, &mut hooks, fwd)?;
    let get = |p: fn(usize) -> HookPoint| (0..layers).map(|l| captured(&hooks, p(l))).collect::<Result<Vec<_>>>();
    let clean = Clean { resid_post: get(HookPoint::ResidPost)?, mlp_out: get(HookPoint::MlpOut)?, attn_out: get(HookPoint::AttnOut)? };
    Ok((clean, logits))
}

/// The noise added to the embeddings, `[samples, t, d]`, zero outside the subject.
pub fn noise_tensor(model: &Model, t: usize, subject: &Range<usize>, opt: &Options) -> Result<Tensor> {
    let d = model.cfg.hidden_size;
    let mut rng = StdRng::seed_from_u64(opt.seed);
    let mut v = vec![0f32; opt.samples * t * d];
    for s in 0..opt.samples {
        for p in subject.clone() {
            for x in &mut v[(s * t + p) * d..(s * t + p + 1) * d] {
                *x = (opt.noise * normal(&mut rng) as f64) as f32;
            }
        }
    }
    Ok(Tensor::from_vec(v, (opt.samples, t, d), &model.device)?)
}

/// The corrupted runs (one batch of `samples` rows); returns them and p(target) per row.
fn corrupt_run(model: &Model, ids: &[u32], subject: &Range<usize>, target: u32, opt: &Options) -> Result<(Corrupt, Vec<f64>)> {
    let layers = model.blocks.len();
    let mut hooks = Hooks::new();
    hooks.intervene(HookPoint::Embed, Op::Add(noise_tensor(model, ids.len(), subject, opt)?));
    for l in 0..layers {
        hooks.capture(HookPoint::ResidPre(l)).capture(HookPoint::ResidPost(l));
    }
    let mut cache = KvCache::new(layers);
    let batch = Batch { ids: vec![ids.to_vec(); opt.samples], valid: vec![vec![true; ids.len()]; opt.samples] };
    let fwd = Fwd { last_only: true, ..Fwd::default() };
    let logits = model.forward(&batch, Some(&mut cache), &mut hooks, fwd)?;
    let get = |p: fn(usize) -> HookPoint| (0..layers).map(|l| captured(&hooks, p(l))).collect::<Result<Vec<_>>>();
    let corrupt = Corrupt { resid_pre: get(HookPoint::ResidPre)?, resid_post: get(HookPoint::ResidPost)?, cache };
    Ok((corrupt, target_probs(&logits, target)?))
}

/// Rows `0..rows` of `x` [rows, t, d] with position 0 replaced by `value` [1, 1, d] in the rows
/// where `active` is true.
fn replace_first(x: &Tensor, value: &Tensor, active: &[bool]) -> candle_core::Result<Tensor> {
    let (r, t, d) = x.dims3()?;
    let mut m = vec![0u8; r * t];
    for (row, &a) in active.iter().enumerate() {
        m[row * t] = a as u8;
    }
    let m = Tensor::from_vec(m, (r, t, 1), x.device())?.broadcast_as((r, t, d))?;
    m.where_cond(&value.broadcast_as((r, t, d))?, x)
}

/// p(target) for every layer's restoration of `kind` at position `i` (mean over samples).
fn restore_position(
    model: &Model,
    kind: TraceKind,
    i: usize,
    clean: &Clean,
    corrupt: &Corrupt,
    target: u32,
    opt: &Options,
) -> Result<Vec<f64>> {
    let layers = model.blocks.len();
    let s = opt.samples;
    let t = corrupt.resid_pre[0].dim(1)?;
    let tail = |x: &Tensor| x.narrow(1, i, t - i);
    // Column l's run joins the batch before block `entry(l)` (== layers: at the unembedding).
    let entry = |l: usize| match kind {
        TraceKind::Resid => l + 1,
        _ => kind.layers(l, opt.window, layers).start,
    };
    let mut x: Option<Tensor> = None;
    let mut joined = 0usize;
    for k in 0..=layers {
        let mut parts: Vec<Tensor> = x.take().into_iter().collect();
        while joined < layers && entry(joined) == k {
            parts.push(match kind {
                TraceKind::Resid => {
                    let state = tail(&corrupt.resid_post[joined])?;
                    let value = clean.resid_post[joined].narrow(1, i, 1)?;
                    replace_first(&state, &value, &vec![true; s])?
                }
                _ => tail(&corrupt.resid_pre[k])?,
            });
            joined += 1;
        }
        if parts.is_empty() {
            continue;
        }
        let state = Tensor::cat(&parts, 0)?;
        if k == layers {
            x = Some(state);
            break;
        }
        let groups = joined;
        let mut hooks = Hooks::new();
        if kind != TraceKind::Resid {
            let active: Vec<bool> =
                (0..groups * s).map(|row| kind.layers(row / s, opt.window, layers).contains(&k)).collect();
            if active.iter().any(|&a| a) {
                let (point, value) = match kind {
                    TraceKind::Mlp => (HookPoint::MlpOut(k), clean.mlp_out[k].narrow(1, i, 1)?),
                    _ => (HookPoint::AttnOut(k), clean.attn_out[k].narrow(1, i, 1)?),
                };
                let f = move |y: &Tensor| replace_first(y, &value, &active);
                hooks.intervene(point, Op::Func(Arc::new(f)));
            }
        }
        let mut cache = KvCache::new(layers);
        if i > 0 {
            let (pk, pv) = corrupt.cache.layers[k]
                .as_ref()
                .ok_or_else(|| Error::invalid("causal-trace: the corrupted run cached no keys"))?;
            let rep = |x: &Tensor| -> Result<Tensor> {
                let x = x.narrow(2, 0, i)?;
                Ok(Tensor::cat(&vec![&x; groups], 0)?)
            };
            cache.layers[k] = Some((rep(pk)?, rep(pv)?));
        }
        x = Some(model.forward_from(state, k..k + 1, i, Some(&mut cache), &mut hooks, Fwd::default())?);
    }
    let x = x.ok_or_else(|| Error::invalid("causal-trace: nothing was restored"))?;
    let logits = model.unembed(x, &mut Hooks::new(), Fwd { last_only: true, ..Fwd::default() })?;
    let p = target_probs(&logits, target)?;
    Ok(p.chunks(s).map(mean).collect())
}

/// Trace one prompt. `target` = None follows the model's greedy top-1 on the clean prompt.
/// `progress(done, total)` counts restored positions.
pub fn causal_trace(
    model: &Model,
    ids: &[u32],
    subject: Range<usize>,
    target: Option<u32>,
    opt: &Options,
    mut progress: impl FnMut(usize, usize),
) -> Result<Trace> {
    check(model, ids, &subject, opt)?;
    let (clean, logits) = clean_run(model, ids)?;
    let target = match target {
        Some(t) if t as usize >= model.cfg.vocab_size => {
            return Err(Error::invalid(format!("causal-trace: target id {t} is outside the vocabulary")))
        }
        Some(t) => t,
        None => logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?,
    };
    let p_clean = target_probs(&logits, target)?[0];
    let (corrupt, p) = corrupt_run(model, ids, &subject, target, opt)?;
    let p_corrupt = mean(&p);
    let (t, layers) = (ids.len(), model.blocks.len());
    let total = opt.kinds.len() * (t - subject.start);
    let mut grids = vec![];
    for (n, &kind) in opt.kinds.iter().enumerate() {
        let mut grid = vec![vec![p_corrupt; layers]; t];
        for (i, row) in grid.iter_mut().enumerate().skip(subject.start) {
            progress(n * (t - subject.start) + i - subject.start, total);
            *row = restore_position(model, kind, i, &clean, &corrupt, target, opt)?;
        }
        grids.push((kind, grid));
    }
    progress(total, total);
    Ok(Trace { ids: ids.to_vec(), subject, target, p_clean, p_corrupt, grids })
}

/// Greedy next token after `ids`.
pub fn greedy(model: &Model, ids: &[u32]) -> Result<u32> {
    let fwd = Fwd { last_only: true, ..Fwd::default() };
    let logits = model.forward(&Batch::single(ids), None, &mut Hooks::new(), fwd)?;
    Ok(logits.flatten_all()?.argmax(0)?.to_scalar::<u32>()?)
}

/// Token classes of ROME's average over facts.
pub const CLASSES: [&str; 6] =
    ["first subject token", "middle subject tokens", "last subject token", "first subsequent token", "further tokens", "last token"];

/// The positions of each of [`CLASSES`] in a prompt of `t` tokens (empty where a prompt has none).
pub fn class_positions(subject: &Range<usize>, t: usize) -> [Range<usize>; 6] {
    let (a, b) = (subject.start, subject.end);
    let after = (b + 1).min(t.saturating_sub(1));
    [
        a..a + 1,
        (a + 1).min(b - 1)..b - 1,
        b - 1..b,
        if b < t - 1 { b..b + 1 } else { b..b },
        if b + 1 < t - 1 { after..t - 1 } else { after..after },
        t - 1..t,
    ]
}

/// Mean over facts of the indirect effect (p_restored − p_corrupt) per class and layer, for one
/// kind: `[class][layer]` (NaN for a class no fact has), and how many facts have each class.
pub fn class_effects(traces: &[Trace], kind: TraceKind) -> (Vec<Vec<f64>>, Vec<usize>) {
    let layers = traces.iter().find_map(|t| t.grid(kind)).map_or(0, |g| g[0].len());
    let mut sum = vec![vec![0f64; layers]; CLASSES.len()];
    let mut count = vec![0usize; CLASSES.len()];
    for tr in traces {
        let Some(g) = tr.grid(kind) else { continue };
        for (c, pos) in class_positions(&tr.subject, tr.ids.len()).into_iter().enumerate() {
            if pos.is_empty() {
                continue;
            }
            count[c] += 1;
            for (l, s) in sum[c].iter_mut().enumerate() {
                *s += pos.clone().map(|p| g[p][l] - tr.p_corrupt).sum::<f64>() / pos.len() as f64;
            }
        }
    }
    let avg = sum.iter().zip(&count).map(|(row, &n)| row.iter().map(|s| if n == 0 { f64::NAN } else { s / n as f64 }).collect()).collect();
    (avg, count)
}

/// Findings over one or more traced facts. Score of `L{l}` (resid), `L{l}.mlp`, `L{l}.attn`:
/// the mean over facts of the indirect effect at the last subject token with column l restored;
/// extra: the same mean at each of [`CLASSES`]. Summary: p_clean / p_corrupt means, the best
/// layer per kind, and per fact its tokens, subject positions, target and full grids.
pub fn findings(
    traces: &[Trace],
    decode: impl Fn(u32) -> String,
    options: serde_json::Value,
    model: Source,
    data: Vec<Source>,
) -> Findings {
    let meaning = "indirect effect p(target | corrupted subject, state restored) − p(target | corrupted) \
                   at the last subject token, mean over facts";
    let mut f = Findings::new(METHOD, meaning, options, model, data);
    let kinds: Vec<TraceKind> = traces.first().map(|t| t.grids.iter().map(|(k, _)| *k).collect()).unwrap_or_default();
    let mut best = serde_json::Map::new();
    for &kind in &kinds {
        let (avg, count) = class_effects(traces, kind);
        let last_subject = &avg[2];
        for (l, &score) in last_subject.iter().enumerate() {
            let s = f.push(kind.component(l), score);
            let classes: serde_json::Map<String, serde_json::Value> =
                CLASSES.iter().zip(&avg).map(|(c, row)| (c.to_string(), serde_json::json!(finite(row[l])))).collect();
            s.extra.insert("classes".into(), classes.into());
        }
        let top = (0..last_subject.len()).max_by(|&a, &b| last_subject[a].total_cmp(&last_subject[b]));
        best.insert(kind.name().into(), serde_json::json!(top.map(|l| kind.component(l).to_string())));
        f.summary.insert(format!("{}_class_counts", kind.name()), serde_json::json!(count));
    }
    let n = traces.len().max(1) as f64;
    f.summary.insert("facts_traced".into(), traces.len().into());
    f.summary.insert("p_clean_mean".into(), serde_json::json!(traces.iter().map(|t| t.p_clean).sum::<f64>() / n));
    f.summary.insert("p_corrupt_mean".into(), serde_json::json!(traces.iter().map(|t| t.p_corrupt).sum::<f64>() / n));
    f.summary.insert("best_at_last_subject_token".into(), best.into());
    let facts: Vec<serde_json::Value> = traces.iter().map(|t| fact_json(t, &decode)).collect();
    f.summary.insert("facts".into(), facts.into());
    f
}

fn finite(x: f64) -> Option<f64> {
    x.is_finite().then_some(x)
}

fn fact_json(t: &Trace, decode: &impl Fn(u32) -> String) -> serde_json::Value {
    let grids: serde_json::Map<String, serde_json::Value> =
        t.grids.iter().map(|(k, g)| (k.name().to_string(), serde_json::json!(g))).collect();
    serde_json::json!({
        "tokens": t.ids.iter().map(|&id| decode(id)).collect::<Vec<_>>(),
        "subject_tokens": [t.subject.start, t.subject.end],
        "target_id": t.target,
        "target": decode(t.target),
        "p_clean": t.p_clean,
        "p_corrupt": t.p_corrupt,
        "grids": grids,
    })
}

/// Causal tracing (ROME): which states restore a fact when the subject is corrupted.
///
/// Corrupt the subject's token embeddings with Gaussian noise, then restore one clean state at a
/// time and measure how much of p(answer) comes back. Each (token position, layer) is restored
/// for three kinds: the residual stream after the block (`resid`), and the MLP / attention
/// outputs over a window of layers centred on the layer (`mlp`, `attn`). The answer is the
/// model's greedy next token on the clean prompt unless --target names one.
///
/// Input: --prompt with --subject, or --facts (known_1000 format: `prompt`, `subject`,
/// `attribute`, `known_id`), of which only the facts the model gets right are traced (greedy
/// first token = the attribute's first token) unless --include-wrong.
///
/// Findings: `L{l}` (resid), `L{l}.mlp`, `L{l}.attn` with score = the indirect effect
/// p(restored) − p(corrupted) at the last subject token, mean over facts; extra = the same at
/// each token class (first / middle / last subject token, first subsequent, further, last
/// token). The summary holds every fact's full tokens × layers grids of p(restored).
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Spec {
    /// The prompt (with --subject).
    #[arg(long, requires = "subject", conflicts_with = "facts")]
    pub prompt: Option<String>,
    /// The subject: text in --prompt whose tokens are corrupted (its last occurrence).
    #[arg(long, requires = "prompt")]
    pub subject: Option<String>,
    /// Facts file (JSON list of objects with `prompt`, `subject`, `attribute`, `known_id`),
    /// e.g. ../shared/data/prompts/facts/known_1000.json.
    #[arg(long)]
    pub facts: Option<std::path::PathBuf>,
    /// Trace only the facts with these `known_id`s (comma-separated).
    #[arg(long, value_delimiter = ',', requires = "facts")]
    pub ids: Vec<u64>,
    /// Trace at most this many facts (after filtering; 0 = all).
    #[arg(long, default_value_t = 0, requires = "facts")]
    pub limit: usize,
    /// Also trace facts whose greedy answer is not the attribute (the answer traced is still the
    /// model's own greedy token).
    #[arg(long, requires = "facts")]
    pub include_wrong: bool,
    /// Wrap the prompts in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// The answer whose probability is traced; its first token counts (mind the leading space:
    /// " Paris"). Default: the model's greedy next token on the clean prompt.
    #[arg(long, conflicts_with = "facts")]
    pub target: Option<String>,
    /// Kinds of state restored (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = TraceKind::ALL.to_vec())]
    pub kinds: Vec<TraceKind>,
    /// Corrupted runs (noise samples), run as one batch.
    #[arg(long, default_value_t = 10)]
    pub samples: usize,
    /// Standard deviation of the noise added to the subject's embeddings. Default: 3× the
    /// standard deviation of the embedding matrix's entries.
    #[arg(long)]
    pub noise: Option<f64>,
    /// Layers restored together for the mlp and attn kinds (centred on the layer, as ROME).
    #[arg(long, default_value_t = 10)]
    pub window: usize,
    /// Seed of the noise.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// One prompt to trace.
struct Fact {
    label: String,
    ids: Vec<u32>,
    subject: Range<usize>,
}

impl super::Method for Spec {
    fn check(&self) -> Result<()> {
        if self.prompt.is_none() && self.facts.is_none() {
            return Err(Error::invalid("give --prompt with --subject, or --facts"));
        }
        self.facts.as_deref().map_or(Ok(()), super::require_file)
    }

    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        let (model, tok) = (cx.model(), cx.tok()?);
        let noise = match self.noise {
            Some(n) => n,
            None => default_noise(model)?,
        };
        let opt = Options { samples: self.samples, noise, window: self.window, seed: self.seed, kinds: self.kinds.clone() };
        let (facts, target, data, skipped) = match (&self.prompt, &self.subject, &self.facts) {
            (Some(p), Some(s), _) => {
                let ids = tok.prompt_ids(p, self.chat)?;
                let subject = subject_range(tok, &ids, s)?;
                let target = self.target.as_deref().map(|t| super::first_token(tok, "--target", t)).transpose()?;
                (vec![Fact { label: p.clone(), ids, subject }], target, vec![Source::inline(p)], serde_json::json!({}))
            }
            (_, _, Some(path)) => {
                let (facts, skipped) = self.select_facts(model, tok, path, cx.progress)?;
                (facts, None, vec![Source::file(path)?], skipped)
            }
            _ => return Err(Error::invalid("--prompt needs --subject")),
        };
        if facts.is_empty() {
            return Err(Error::invalid(format!("no facts to trace (skipped: {skipped})")));
        }
        let start = std::time::Instant::now();
        let traces = trace_all(model, &facts, target, &opt, cx.progress)?;
        let secs = start.elapsed().as_secs_f64();
        let decode = |id: u32| tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
        let options = serde_json::json!({
            "samples": self.samples, "noise": noise, "noise_default": self.noise.is_none(), "window": self.window,
            "seed": self.seed, "kinds": self.kinds.iter().map(|k| k.name()).collect::<Vec<_>>(), "chat": self.chat,
            "prompt": self.prompt, "subject": self.subject, "target": self.target, "ids": self.ids, "limit": self.limit,
            "include_wrong": self.include_wrong, "skipped": skipped,
        });
        let mut f = findings(&traces, decode, options, cx.source.clone(), data);
        if let Some(serde_json::Value::Array(list)) = f.summary.get_mut("facts") {
            for (entry, fact) in list.iter_mut().zip(&facts) {
                if let Some(o) = entry.as_object_mut() {
                    o.insert("fact".into(), fact.label.clone().into());
                }
            }
        }
        let mut out = super::Located::new(f);
        out.report = format!("traced {} fact(s) in {secs:.1} s ({:.1} s per fact)\n", traces.len(), secs / traces.len() as f64);
        // The per-fact grids are in the file; the terminal gets the scores.
        out.hide = &["facts"];
        if cx.plot {
            out.plot = Some(if traces.len() == 1 { plot::fact(&traces[0], tok, self.window)? } else { plot::aggregate(&traces, self.window)? });
        }
        Ok(out)
    }
}

impl Spec {
    /// The facts of --facts to trace: those asked for by --ids, that the model gets right (unless
    /// --include-wrong), up to --limit; and the counts of facts passed over, by reason.
    fn select_facts(&self, model: &Model, tok: &Tok, path: &std::path::Path, progress: bool) -> Result<(Vec<Fact>, serde_json::Value)> {
        let set = crate::data::RecordSet::load(path, 0)?;
        let (mut wrong, mut no_subject) = (0usize, 0usize);
        let mut facts = vec![];
        let bar = crate::progress::bar(set.records.len() as u64, "facts", progress);
        for i in 0..set.records.len() {
            bar.set_position(i as u64);
            if self.limit > 0 && facts.len() == self.limit {
                break;
            }
            let id = set.records[i].get("known_id").and_then(|v| v.as_u64());
            if !self.ids.is_empty() && !id.is_some_and(|id| self.ids.contains(&id)) {
                continue;
            }
            let (prompt, subject) = (set.str_field(i, "prompt")?, set.str_field(i, "subject")?);
            let ids = tok.prompt_ids(prompt, self.chat)?;
            let Ok(range) = subject_range(tok, &ids, subject) else {
                no_subject += 1;
                continue;
            };
            if !self.include_wrong {
                let answer = super::first_token(tok, "attribute", &format!(" {}", set.str_field(i, "attribute")?))?;
                if greedy(model, &ids)? != answer {
                    wrong += 1;
                    continue;
                }
            }
            let label = id.map_or(format!("record {i}"), |id| format!("known_id {id}"));
            facts.push(Fact { label, ids, subject: range });
        }
        bar.finish_and_clear();
        if !self.ids.is_empty() && facts.is_empty() && wrong + no_subject == 0 {
            return Err(Error::invalid(format!("{}: no fact has a known_id in --ids {:?}", path.display(), self.ids)));
        }
        Ok((facts, serde_json::json!({"wrong_answer": wrong, "subject_not_in_prompt": no_subject})))
    }
}

fn trace_all(model: &Model, facts: &[Fact], target: Option<u32>, opt: &Options, progress: bool) -> Result<Vec<Trace>> {
    let several = facts.len() > 1;
    let bar = crate::progress::bar(facts.len() as u64, if several { "facts" } else { "positions" }, progress);
    let mut traces = vec![];
    for (n, f) in facts.iter().enumerate() {
        bar.set_message(f.label.clone());
        let t = causal_trace(model, &f.ids, f.subject.clone(), target, opt, |i, total| {
            if !several {
                bar.set_length(total as u64);
                bar.set_position(i as u64);
            }
        })
        .map_err(|e| Error::invalid(format!("{}: {e}", f.label)))?;
        if several {
            bar.set_position(n as u64 + 1);
        }
        traces.push(t);
    }
    bar.finish_and_clear();
    Ok(traces)
}

/// The figures in ROME's style.
mod plot {
    use super::{class_effects, Trace, TraceKind, CLASSES};
    use crate::error::Result;
    use crate::report::{heatmaps_svg, Heatmap};
    use crate::tokenizer::Tok;

    /// ROME's colours: purple for the residual stream, green for MLPs, red for attention.
    fn color(kind: TraceKind) -> plotters::style::RGBColor {
        match kind {
            TraceKind::Resid => plotters::style::RGBColor(84, 39, 143),
            TraceKind::Mlp => plotters::style::RGBColor(0, 109, 44),
            TraceKind::Attn => plotters::style::RGBColor(165, 15, 21),
        }
    }

    fn panel_title(kind: TraceKind, window: usize) -> String {
        match kind {
            TraceKind::Resid => "single restored layer".into(),
            TraceKind::Mlp => format!("restored MLP, window {window}"),
            TraceKind::Attn => format!("restored attention, window {window}"),
        }
    }

    /// One fact: p(answer) per kind, tokens × layers, subject tokens marked `*`.
    pub fn fact(t: &Trace, tok: &Tok, window: usize) -> Result<String> {
        let rows: Vec<String> = t
            .ids
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let s = tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
                if t.subject.contains(&i) { format!("{s}*") } else { s }
            })
            .collect();
        let panels: Vec<Heatmap> = t
            .grids
            .iter()
            .map(|(k, g)| Heatmap { title: panel_title(*k, window), rows: rows.clone(), values: g.clone(), color: color(*k), x_label: "layer".into() })
            .collect();
        let answer = tok.decode(&[t.target], false).unwrap_or_default();
        heatmaps_svg(&panels, &format!("p({answer:?}): clean {:.3}, corrupted {:.3}", t.p_clean, t.p_corrupt))
    }

    /// Several facts: the mean indirect effect per token class × layer, per kind.
    pub fn aggregate(traces: &[Trace], window: usize) -> Result<String> {
        let rows: Vec<String> = CLASSES.iter().map(|c| c.to_string()).collect();
        let panels: Vec<Heatmap> = traces[0]
            .grids
            .iter()
            .map(|&(k, _)| Heatmap {
                title: format!("AIE, {}", panel_title(k, window)),
                rows: rows.clone(),
                values: class_effects(traces, k).0,
                color: color(k),
                x_label: "layer".into(),
            })
            .collect();
        heatmaps_svg(&panels, &format!("Average indirect effect over {} facts", traces.len()))
    }
}
