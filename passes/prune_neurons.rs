//! prune-neurons: structured MLP width reduction (rows of gate/up, columns of down), uniform or
//! per layer, with optional FLAP-style mean compensation folded into the `down_proj` bias.
//!
//! Also holds what `prune-heads` shares with it: calibration data for mean ablation, the means
//! themselves, index selection on projections, and zero biases for a config flag.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::{Device, Tensor};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use serde::Deserialize;

use super::{options, BuildCtx, Pass, PassInfo};
use crate::error::{Error, Result};
use crate::model::decoder::Fwd;
use crate::model::{Arch, Linear, Model, Proj};
use crate::runtime::{Batch, HookPoint, Hooks, Op};

pub const INFO: PassInfo = PassInfo {
    name: "prune-neurons",
    doc: DOC,
    build,
    example,
};

const DOC: &str = "Remove MLP neurons: rows of gate_proj/up_proj, columns of down_proj.

Options (explicit targets, or a built-in ranking):
  neurons = { \"3\" = [1, 5, 9], \"L4\" = [0] }   neurons to remove, by layer (\"3\" or \"L3\")
  select = { by = ID, fraction = 0.2, per_layer = true }
                           or: neurons chosen from the findings of the [[locate]] step `ID`
                           (neuron-importance: low = least important): lowest = N, highest = N
                           or fraction = F (from = \"lowest\" | \"highest\"), per_layer = true to
                           count within each layer, layers = [..] to restrict the candidates
  layers = [0, 1]          with count/fraction: the layers to prune (default: all)
  count = 256              remove this many neurons per layer ...
  fraction = 0.2           ... or this fraction of each layer's d_ff (rounded)
  by = \"weight-magnitude\"  ranking for count/fraction: the lowest ‖gate_n‖·‖up_n‖·‖down_:,n‖ go;
                           or \"random\" (a baseline; `seed = 0`). Located targets come from
                           findings instead: select = { by = ID, fraction = 0.2, per_layer = true }
  uniform = true           fail unless every layer ends with the same d_ff (a stock HF config)
  compensate = \"none\"      or \"mean\": add down_proj · mean(pruned activations) to down_proj's
                           bias (FLAP-style); creates zero gate/up/down biases in every layer and
                           sets mlp_bias = true if the model has none (Llama; Qwen2 cannot)
  mean_over = \"ids.json\"   with compensate = \"mean\": token ids to average over (a list, or a
                           list of lists, as `mechc tokenize --file` prints), path relative to
                           the pipeline file ...
  mean_over_ids = [1, 2]   ... or the token ids inline ...
  mean_over_text = \"t.raw\" ... or the first tokens of a text file (tokenized by the model's tokenizer)
  mean_over_skip = 4096    ... after skipping this many (e.g. text the [verify] perplexity reads)
  tokens = 512             at most this many calibration tokens (default 512)

The same d_ff in every layer keeps HF's intermediate_size (stock checkpoint). Different widths
per layer are written as `mechc_layer_intermediate_size` in config.json, which our loader reads
and stock transformers cannot load. Runtime twin: scale the pruned neurons by 0 at
blocks.L.mlp.hook_post; with compensate = \"mean\", then add their mean activation there (at
every position), i.e. mean ablation. Means are measured on the pass's source model.

Example (explicit neurons):
    [[pass]]
    name = \"prune-neurons\"
    neurons = { \"3\" = [1, 5, 9], \"L4\" = [0] }

Example (the 20% of each layer with the smallest weights, a stock config):
    [[pass]]
    name = \"prune-neurons\"
    fraction = 0.2
    by = \"weight-magnitude\"
    uniform = true

Example (random baseline, 256 per layer in layers 0 and 1, with mean compensation):
    [[pass]]
    name = \"prune-neurons\"
    count = 256
    layers = [0, 1]
    by = \"random\"
    seed = 0
    compensate = \"mean\"
    mean_over_ids = [1, 2, 3, 4, 5, 6, 7, 8]

Example (located by FLAP, 35% per layer, mean-compensated; configs/smollm2-compress.toml):
    [[locate]]
    id = \"flap\"
    method = \"neuron-importance\"
    by = \"flap\"
    text = \"../../shared/data/text/wikitext2-test.raw\"
    skip = 4096
    tokens = 4096
    [[pass]]
    name = \"prune-neurons\"
    select = { by = \"flap\", fraction = 0.35, per_layer = true }
    uniform = true
    compensate = \"mean\"
    mean_over_text = \"../../shared/data/text/wikitext2-test.raw\"
    mean_over_skip = 4096
    tokens = 512";

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub(super) enum Compensate {
    #[default]
    None,
    Mean,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Opts {
    neurons: Option<BTreeMap<String, Vec<usize>>>,
    layers: Option<Vec<usize>>,
    count: Option<usize>,
    fraction: Option<f64>,
    by: Option<String>,
    #[serde(default)]
    uniform: bool,
    #[serde(default)]
    compensate: Compensate,
    mean_over: Option<String>,
    mean_over_ids: Option<Vec<u32>>,
    mean_over_text: Option<String>,
    mean_over_skip: Option<usize>,
    tokens: Option<usize>,
    seed: Option<u64>,
}

impl Opts {
    fn mean_over(&self) -> MeanOver<'_> {
        MeanOver {
            file: self.mean_over.as_deref(),
            ids: self.mean_over_ids.as_deref(),
            text: self.mean_over_text.as_deref(),
            skip: self.mean_over_skip,
            tokens: self.tokens,
        }
    }
}

struct PruneNeurons {
    /// Layer → (d_ff of the source layer, sorted unique neurons to remove).
    layers: BTreeMap<usize, (usize, Vec<usize>)>,
    /// Layer → mean activation of each pruned neuron (aligned with its list), for compensate = "mean".
    means: Option<BTreeMap<usize, Vec<f32>>>,
}

/// Parse a layer key of a per-layer table: "3" or "L3".
fn layer_key(k: &str, n_layers: usize, option: &str) -> Result<usize> {
    let l: usize = k
        .strip_prefix('L')
        .unwrap_or(k)
        .parse()
        .map_err(|_| Error::invalid(format!("`{option}`: key `{k}` is not a layer (write \"3\" or \"L3\")")))?;
    if l >= n_layers {
        return Err(Error::invalid(format!(
            "`{option}`: layer {l} does not exist (the model has layers 0..{})",
            n_layers - 1
        )));
    }
    Ok(l)
}

fn build(t: &toml::Table, cx: &BuildCtx) -> Result<Box<dyn Pass>> {
    let m = cx.source;
    let o: Opts = options(t)?;
    let n = m.cfg.num_layers;
    let d_ff = |l: usize| m.blocks[l].gate.out_features();
    let mut layers: BTreeMap<usize, (usize, Vec<usize>)> = BTreeMap::new();
    if let Some(by) = &o.by {
        if by != "weight-magnitude" && by != "random" {
            return Err(Error::invalid(format!(
                "`by`: unknown ranking `{by}` (known: weight-magnitude, random)"
            )));
        }
    }
    if o.seed.is_some() && o.by.as_deref() != Some("random") {
        return Err(Error::invalid("`seed` is for by = \"random\""));
    }
    match &o.neurons {
        Some(explicit) => {
            if o.layers.is_some() || o.count.is_some() || o.fraction.is_some() || o.by.is_some() {
                return Err(Error::invalid(
                    "`neurons` names the targets: drop `layers`, `count`, `fraction` and `by`",
                ));
            }
            for (k, list) in explicit {
                let l = layer_key(k, n, "neurons")?;
                let mut list = list.clone();
                list.sort_unstable();
                list.dedup();
                if let Some(&bad) = list.iter().find(|&&i| i >= d_ff(l)) {
                    return Err(Error::invalid(format!(
                        "`neurons`: neuron {bad} of layer {l} does not exist (d_ff = {})",
                        d_ff(l)
                    )));
                }
                if !list.is_empty() {
                    layers.entry(l).or_insert((d_ff(l), vec![])).1.extend(list);
                }
            }
            for (_, list) in layers.values_mut() {
                list.sort_unstable();
                list.dedup();
            }
        }
        None => {
            let which = match &o.layers {
                Some(ls) => {
                    let mut ls = ls.clone();
                    ls.sort_unstable();
                    ls.dedup();
                    if let Some(&bad) = ls.iter().find(|&&l| l >= n) {
                        return Err(Error::invalid(format!(
                            "`layers`: layer {bad} does not exist (the model has layers 0..{})",
                            n - 1
                        )));
                    }
                    ls
                }
                None => (0..n).collect(),
            };
            for l in which {
                let f = d_ff(l);
                let k = match (o.count, o.fraction) {
                    (Some(c), None) => c,
                    (None, Some(fr)) if (0.0..1.0).contains(&fr) => (fr * f as f64).round() as usize,
                    (None, Some(fr)) => return Err(Error::invalid(format!("`fraction`: {fr} is not in [0, 1)"))),
                    (Some(_), Some(_)) => return Err(Error::invalid("give `count` or `fraction`, not both")),
                    (None, None) => {
                        return Err(Error::invalid(
                            "name the neurons: `neurons = {\"3\" = [1, 5]}`, or `count`/`fraction`",
                        ))
                    }
                };
                if k > 0 {
                    let chosen = if o.by.as_deref() == Some("random") {
                        let mut rng = rand::rngs::StdRng::seed_from_u64(o.seed.unwrap_or(0).wrapping_add(l as u64));
                        let mut all: Vec<usize> = (0..f).collect();
                        all.shuffle(&mut rng);
                        all.truncate(k);
                        all.sort_unstable();
                        all
                    } else {
                        lowest(&neuron_scores(m, l)?, k)
                    };
                    layers.insert(l, (f, chosen));
                }
            }
        }
    }
    for (l, (f, list)) in &layers {
        if list.len() >= *f {
            return Err(Error::invalid(format!(
                "removing {} of layer {l}'s {f} neurons leaves none",
                list.len()
            )));
        }
    }
    if layers.is_empty() {
        return Err(Error::invalid("no neurons selected: nothing to prune"));
    }
    if o.uniform {
        let widths: BTreeSet<usize> = (0..n).map(|l| d_ff(l) - layers.get(&l).map_or(0, |(_, v)| v.len())).collect();
        if widths.len() > 1 {
            return Err(Error::invalid(format!(
                "`uniform = true`, but the layers would end with different d_ff: {widths:?}"
            )));
        }
    }
    check_bias_support(m, o.compensate, "down_proj")?;
    let calib = calibration(o.compensate, o.mean_over(), cx)?;
    let means = match calib {
        None => None,
        Some(seqs) => {
            let points: Vec<HookPoint> = layers.keys().map(|&l| HookPoint::MlpPost(l)).collect();
            let avg = mean_activations(m, &seqs, &points)?;
            let mut means = BTreeMap::new();
            for (&l, (_, list)) in &layers {
                let v: Vec<f32> = avg[&HookPoint::MlpPost(l)].to_vec1()?;
                means.insert(l, list.iter().map(|&i| v[i]).collect());
            }
            Some(means)
        }
    };
    Ok(Box::new(PruneNeurons { layers, means }))
}

/// ‖gate_n‖ · ‖up_n‖ · ‖down_:,n‖ for every neuron of layer `l`.
pub fn neuron_scores(m: &Model, l: usize) -> Result<Vec<f32>> {
    let b = &m.blocks[l];
    let g = b.gate.w().sqr()?.sum(1)?.sqrt()?;
    let u = b.up.w().sqr()?.sum(1)?.sqrt()?;
    let d = b.down.w().sqr()?.sum(0)?.sqrt()?;
    Ok(((g * u)? * d)?.to_vec1()?)
}

/// Indices of the `k` lowest scores (ties: lower index first), sorted.
pub fn lowest(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut v = idx[..k.min(idx.len())].to_vec();
    v.sort_unstable();
    v
}

/// The calibration sequences for compensate = "mean" (None without compensation).
/// Where compensate = "mean" takes its calibration tokens from (the options of both prune passes).
pub(super) struct MeanOver<'a> {
    pub file: Option<&'a str>,
    pub ids: Option<&'a [u32]>,
    pub text: Option<&'a str>,
    pub skip: Option<usize>,
    pub tokens: Option<usize>,
}

pub(super) fn calibration(c: Compensate, o: MeanOver, cx: &BuildCtx) -> Result<Option<Vec<Vec<u32>>>> {
    let m = cx.source;
    let MeanOver { file, ids: inline, text, skip, tokens } = o;
    if c == Compensate::None {
        if file.is_some() || inline.is_some() || text.is_some() || skip.is_some() || tokens.is_some() {
            return Err(Error::invalid(
                "`mean_over`/`mean_over_ids`/`mean_over_text`/`mean_over_skip`/`tokens` are only used with compensate = \"mean\"",
            ));
        }
        return Ok(None);
    }
    if skip.is_some() && text.is_none() {
        return Err(Error::invalid("`mean_over_skip` applies to `mean_over_text`"));
    }
    let seqs: Vec<Vec<u32>> = match (file, inline, text) {
        (None, None, None) => {
            return Err(Error::invalid(
                "compensate = \"mean\" needs calibration tokens: `mean_over = \"ids.json\"`, `mean_over_ids` or `mean_over_text = \"text.raw\"`",
            ))
        }
        (None, Some(ids), None) => vec![ids.to_vec()],
        (None, None, Some(path)) => {
            let tok = cx.tok.ok_or_else(|| Error::invalid("`mean_over_text` needs the model's tokenizer (this model has none)"))?;
            let skip = skip.unwrap_or(0);
            let mut ids = crate::locate::text_ids(tok, &cx.path(path), skip + tokens.unwrap_or(512))?;
            if skip >= ids.len() {
                return Err(Error::invalid(format!("`mean_over_skip` = {skip}: {path} has only {} tokens", ids.len())));
            }
            ids.drain(..skip);
            vec![ids]
        }
        (Some(path), None, None) => {
            let bad = |msg: String| Error::invalid(format!("`mean_over`: {path}: {msg}"));
            let text = std::fs::read_to_string(cx.path(path)).map_err(|e| bad(e.to_string()))?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
            let ids = |v: &serde_json::Value| -> Option<Vec<u32>> {
                v.as_array()?
                    .iter()
                    .map(|x| x.as_u64().filter(|&i| i <= u32::MAX as u64).map(|i| i as u32))
                    .collect()
            };
            match v.as_array() {
                Some(a) if a.iter().all(|x| x.is_array()) => a.iter().map(ids).collect::<Option<_>>(),
                _ => ids(&v).map(|s| vec![s]),
            }
            .ok_or_else(|| bad("expected a list of token ids or a list of such lists".into()))?
        }
        _ => return Err(Error::invalid("give one of `mean_over`, `mean_over_ids`, `mean_over_text`, not several")),
    };
    let option = if file.is_some() { "mean_over" } else if text.is_some() { "mean_over_text" } else { "mean_over_ids" };
    let vocab = m.cfg.vocab_size as u32;
    if let Some(&bad) = seqs.iter().flatten().find(|&&i| i >= vocab) {
        return Err(Error::invalid(format!(
            "`{option}`: token id {bad} is outside the vocabulary ({vocab})"
        )));
    }
    let mut budget = tokens.unwrap_or(512);
    if budget == 0 {
        return Err(Error::invalid("`tokens` must be positive"));
    }
    let mut out = vec![];
    for s in seqs {
        if budget == 0 {
            break;
        }
        let take = s.len().min(budget);
        budget -= take;
        // Chunks of at most 256 tokens keep the attention matrices small.
        out.extend(s[..take].chunks(256).map(|c| c.to_vec()));
    }
    out.retain(|s| !s.is_empty());
    if out.is_empty() {
        return Err(Error::invalid(format!("`{option}`: no calibration tokens")));
    }
    Ok(Some(out))
}

/// Mean of each hook's activation over every position of every sequence (shape without [b, t]).
pub(super) fn mean_activations(m: &Model, seqs: &[Vec<u32>], points: &[HookPoint]) -> Result<BTreeMap<HookPoint, Tensor>> {
    let mut sums: BTreeMap<HookPoint, Tensor> = BTreeMap::new();
    let mut n = 0usize;
    for s in seqs {
        let mut h = Hooks::new();
        for &p in points {
            h.capture(p);
        }
        m.forward(&Batch::single(s), None, &mut h, Fwd::default())?;
        n += s.len();
        for &p in points {
            let a = h.captured[&p].sum(0)?.sum(0)?;
            let acc = match sums.remove(&p) {
                Some(prev) => (prev + a)?,
                None => a,
            };
            sums.insert(p, acc);
        }
    }
    sums.into_iter().map(|(p, s)| Ok((p, (s / n as f64)?))).collect()
}

/// Keep these rows (output features) of a projection, bias included.
pub(super) fn keep_rows(lin: &Linear, keep: &[usize]) -> Result<Linear> {
    let idx = index(keep)?;
    let b = lin.b.as_ref().map(|b| b.index_select(&idx, 0)).transpose()?;
    Linear::new(&lin.w().index_select(&idx, 0)?, b)
}

/// Keep these columns (input features) of a projection; add `extra` to its bias (created if absent).
pub(super) fn keep_cols(lin: &Linear, keep: &[usize], extra: Option<&Tensor>) -> Result<Linear> {
    let w = lin.w().index_select(&index(keep)?, 1)?;
    let b = match (&lin.b, extra) {
        (b, None) => b.clone(),
        (Some(b), Some(e)) => Some((b + e)?),
        (None, Some(e)) => Some(e.clone()),
    };
    Linear::new(&w, b)
}

/// W[:, cols] · values: what the removed input features `cols`, held at `values`, contribute.
pub(super) fn folded(lin: &Linear, cols: &[usize], values: &[f32]) -> Result<Tensor> {
    let w = lin.w().index_select(&index(cols)?, 1)?;
    let v = Tensor::from_slice(values, (values.len(), 1), &Device::Cpu)?;
    Ok(w.matmul(&v)?.squeeze(1)?)
}

pub(super) fn index(v: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        v.iter().map(|&i| i as u32).collect::<Vec<u32>>(),
        v.len(),
        &Device::Cpu,
    )?)
}

/// Complement of sorted `removed` in 0..n.
pub(super) fn kept(n: usize, removed: &[usize]) -> Vec<usize> {
    (0..n).filter(|i| removed.binary_search(i).is_err()).collect()
}

/// Give every projection in `projs` of every layer a zero bias where it has none (so a config
/// flag such as `mlp_bias` can be switched on and the checkpoint stays consistent).
pub(super) fn add_zero_biases(m: &mut Model, projs: &[Proj]) -> Result<()> {
    for b in &mut m.blocks {
        for &p in projs {
            let lin = b.proj_mut(p);
            if lin.b.is_none() {
                lin.b = Some(Tensor::zeros(lin.out_features(), candle_core::DType::F32, &Device::Cpu)?);
            }
        }
    }
    Ok(())
}

/// Check that compensation has a bias to go into under this architecture's HF config.
pub(super) fn check_bias_support(m: &Model, c: Compensate, what: &str) -> Result<()> {
    if c == Compensate::Mean && m.cfg.arch == Arch::Qwen2 {
        return Err(Error::invalid(format!(
            "compensate = \"mean\" needs a {what} bias, which HF's Qwen2 does not have (use compensate = \"none\")"
        )));
    }
    Ok(())
}

/// Random calibration ids for the examples (the property tests need no files).
pub(super) fn example_ids(m: &Model, r: &mut impl Rng) -> toml::Value {
    let n = r.gen_range(1..=12);
    toml::Value::Array(
        (0..n)
            .map(|_| toml::Value::Integer(r.gen_range(0..m.cfg.vocab_size) as i64))
            .collect(),
    )
}

fn example(m: &Model, seed: u64) -> Option<toml::Table> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6e75);
    let mut t = toml::Table::new();
    if r.gen_bool(0.5) {
        let mut per = toml::Table::new();
        for l in 0..m.cfg.num_layers {
            let f = m.blocks[l].gate.out_features();
            if f < 2 || r.gen_bool(0.3) {
                continue;
            }
            let mut all: Vec<usize> = (0..f).collect();
            all.shuffle(&mut r);
            let k = r.gen_range(1..f);
            per.insert(
                l.to_string(),
                toml::Value::Array(all[..k].iter().map(|&i| toml::Value::Integer(i as i64)).collect()),
            );
        }
        if per.is_empty() {
            return None;
        }
        t.insert("neurons".into(), toml::Value::Table(per));
    } else {
        let min_f = m.blocks.iter().map(|b| b.gate.out_features()).min()?;
        let fr = [0.1, 0.25, 0.5][r.gen_range(0..3)];
        if min_f < 4 {
            return None;
        }
        if (fr * min_f as f64).round() >= 1.0 {
            t.insert("fraction".into(), toml::Value::Float(fr));
        } else {
            t.insert("count".into(), toml::Value::Integer(1));
        }
    }
    if m.cfg.arch == Arch::Llama && r.gen_bool(0.5) {
        t.insert("compensate".into(), "mean".into());
        t.insert("mean_over_ids".into(), example_ids(m, &mut r));
    }
    Some(t)
}

impl Pass for PruneNeurons {
    fn run(&self, m: &mut Model) -> Result<String> {
        for (&l, (f, _)) in &self.layers {
            let have = m.blocks.get(l).map(|b| b.gate.out_features());
            if have != Some(*f) {
                return Err(Error::invalid(format!(
                    "prune-neurons: layer {l} is not the layer of {f} neurons the pass was built for"
                )));
            }
        }
        if self.means.is_some() && !m.cfg.mlp_bias {
            add_zero_biases(m, &[Proj::Gate, Proj::Up, Proj::Down])?;
            m.cfg.mlp_bias = true;
        }
        let mut removed = 0;
        for (&l, (f, list)) in &self.layers {
            let keep = kept(*f, list);
            let b = &mut m.blocks[l];
            let extra = match &self.means {
                Some(means) => Some(folded(&b.down, list, &means[&l])?),
                None => None,
            };
            b.gate = keep_rows(&b.gate, &keep)?;
            b.up = keep_rows(&b.up, &keep)?;
            b.down = keep_cols(&b.down, &keep, extra.as_ref())?;
            removed += list.len();
        }
        crate::model::sync_layer_config(m);
        let widths: BTreeSet<usize> = m.blocks.iter().map(|b| b.gate.out_features()).collect();
        let shape = if widths.len() == 1 {
            format!("d_ff {} in every layer", m.cfg.intermediate_size)
        } else {
            "per-layer d_ff (mechc_layer_intermediate_size: not loadable by stock transformers)".to_string()
        };
        let comp = if self.means.is_some() {
            ", mean folded into down_proj bias"
        } else {
            ""
        };
        Ok(format!(
            "removed {removed} neurons in {} layers; {shape}{comp}",
            self.layers.len()
        ))
    }

    fn twin(&self, source: &Model) -> Result<Hooks> {
        let mut h = Hooks::new();
        for (&l, (f, list)) in &self.layers {
            if source.blocks.get(l).map(|b| b.gate.out_features()) != Some(*f) {
                return Err(Error::invalid(format!(
                    "prune-neurons: layer {l} of this model does not have {f} neurons"
                )));
            }
            let mut scale = vec![1f32; *f];
            for &i in list {
                scale[i] = 0.0;
            }
            h.intervene(HookPoint::MlpPost(l), Op::Scale(scale));
            if let Some(means) = &self.means {
                let mut add = vec![0f32; *f];
                for (&i, &v) in list.iter().zip(&means[&l]) {
                    add[i] = v;
                }
                h.intervene(HookPoint::MlpPost(l), Op::Add(Tensor::from_vec(add, *f, &Device::Cpu)?));
            }
        }
        Ok(h)
    }
}
