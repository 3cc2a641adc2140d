//! Not a pass: the `direction` option that `bake-steering` and `conditional-steer` share
//! (at the end), and what `prune-neurons` and `prune-heads` share besides the model surgery (which is
//! in `model::surgery`): the `compensate = "mean"` options and their calibration tokens, the
//! mean activations measured on them, the lowest-score ranking, the `layers` option, and the
//! runtime twin of removing units (zero them, or replace them by their means).

use std::collections::BTreeMap;

use candle_core::{Device, Tensor};
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Deserialize;

use super::{options, BuildCtx};
use crate::data::SetSpec;
use crate::error::{Error, Result};
use crate::model::decoder::Fwd;
use crate::model::{Arch, Model};
use crate::runtime::{Batch, HookPoint, Hooks, Op};

#[derive(Deserialize, Default, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
pub enum Compensate {
    #[default]
    None,
    Mean,
}

/// The options of mean compensation, the same in both prune passes (see their docs).
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct MeanOpts {
    #[serde(default)]
    pub compensate: Compensate,
    mean_over: Option<String>,
    mean_over_ids: Option<Vec<u32>>,
    mean_over_text: Option<String>,
    mean_over_skip: Option<usize>,
    tokens: Option<usize>,
}

/// The help text of the calibration options, for both prune passes' `DOC` (a macro because
/// `concat!` takes literals).
macro_rules! mean_over_doc {
    () => {
        "  mean_over = \"ids.json\"   with compensate = \"mean\": token ids to average over (a list, or a
                           list of lists, as `mechc tokenize --file` prints), path relative to
                           the pipeline file ...
  mean_over_ids = [1, 2]   ... or the token ids inline ...
  mean_over_text = \"t.raw\" ... or the first tokens of a text file (tokenized by the model's tokenizer)
  mean_over_skip = 4096    ... after skipping this many (e.g. text the [verify] perplexity reads)
  tokens = 512             at most this many calibration tokens (default 512)
"
    };
}
pub(crate) use mean_over_doc;

/// The keys of [`MeanOpts`].
const MEAN_KEYS: [&str; 6] = ["compensate", "mean_over", "mean_over_ids", "mean_over_text", "mean_over_skip", "tokens"];

/// A prune pass's options: its own (`T`, unknown keys rejected) and the compensation options.
pub fn prune_options<T: DeserializeOwned>(t: &toml::Table) -> Result<(T, MeanOpts)> {
    let (mean, own): (toml::Table, toml::Table) =
        t.clone().into_iter().partition(|(k, _)| MEAN_KEYS.contains(&k.as_str()));
    let mean: MeanOpts = options(&mean)?;
    let own = T::deserialize(toml::Value::Table(own)).map_err(|e| {
        let msg = e.message();
        if msg.starts_with("unknown field") {
            // serde lists the pass's own fields; the compensation options are valid too.
            let more: Vec<String> = MEAN_KEYS.iter().map(|k| format!("`{k}`")).collect();
            Error::invalid(format!("{msg}, {}", more.join(", ")))
        } else {
            Error::invalid(msg.to_string())
        }
    })?;
    Ok((own, mean))
}

impl MeanOpts {
    /// With compensate = "mean": the mean activation at each of `points` over the calibration
    /// tokens, on the source model (None with compensate = "none"). `bias` names the bias the
    /// means are folded into, for the error on architectures that have none.
    pub fn means(&self, cx: &BuildCtx, bias: &str, points: &[HookPoint]) -> Result<Option<BTreeMap<HookPoint, Tensor>>> {
        let m = cx.source;
        if self.compensate == Compensate::Mean && m.cfg.arch == Arch::Qwen2 {
            return Err(Error::invalid(format!(
                "compensate = \"mean\" needs a {bias} bias, which HF's Qwen2 does not have (use compensate = \"none\")"
            )));
        }
        match self.calibration(cx)? {
            None => Ok(None),
            Some(seqs) => Ok(Some(mean_activations(m, &seqs, points)?)),
        }
    }

    /// The calibration sequences for compensate = "mean" (None without compensation).
    fn calibration(&self, cx: &BuildCtx) -> Result<Option<Vec<Vec<u32>>>> {
        let m = cx.source;
        let MeanOpts { compensate, mean_over: file, mean_over_ids: inline, mean_over_text: text, mean_over_skip: skip, tokens } = self;
        let (skip, tokens) = (*skip, *tokens);
        if *compensate == Compensate::None {
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
            return Err(Error::invalid(format!("`{option}`: token id {bad} is outside the vocabulary ({vocab})")));
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
}

/// Mean of each hook's activation over every position of every sequence (shape without [b, t]).
pub fn mean_activations(m: &Model, seqs: &[Vec<u32>], points: &[HookPoint]) -> Result<BTreeMap<HookPoint, Tensor>> {
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

/// The `layers` option of a ranking: sorted, unique, every layer present (default: all `n`).
pub fn layer_list(layers: Option<&[usize]>, n: usize) -> Result<Vec<usize>> {
    let Some(ls) = layers else { return Ok((0..n).collect()) };
    let mut ls = ls.to_vec();
    ls.sort_unstable();
    ls.dedup();
    if let Some(&bad) = ls.iter().find(|&&l| l >= n) {
        return Err(Error::invalid(format!(
            "`layers`: layer {bad} does not exist (the model has layers 0..{})",
            n - 1
        )));
    }
    Ok(ls)
}

/// Indices of the `k` lowest scores (ties: lower index first), sorted.
pub fn lowest(scores: &[f32], k: usize) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..scores.len()).collect();
    idx.sort_by(|&a, &b| scores[a].total_cmp(&scores[b]).then(a.cmp(&b)));
    let mut v = idx[..k.min(idx.len())].to_vec();
    v.sort_unstable();
    v
}

/// The runtime twin of removing `units` (sorted) of the `n` units at `point`, each of shape
/// `unit` (`[]` for a neuron at `mlp.hook_post`, `[d_head]` for a head at `attn.hook_z`): scale
/// them by 0; with `means` (a unit's worth of values per removed unit, in order), then add
/// those back: mean ablation.
pub fn ablate_units(h: &mut Hooks, point: HookPoint, n: usize, unit: &[usize], units: &[usize], means: Option<&[f32]>) -> Result<()> {
    let mut scale = vec![1f32; n];
    for &i in units {
        scale[i] = 0.0;
    }
    h.intervene(point, Op::Scale(scale));
    if let Some(means) = means {
        let width: usize = unit.iter().product();
        let mut add = vec![0f32; n * width];
        for (&i, mean) in units.iter().zip(means.chunks(width)) {
            add[i * width..(i + 1) * width].copy_from_slice(mean);
        }
        let shape: Vec<usize> = std::iter::once(n).chain(unit.iter().copied()).collect();
        h.intervene(point, Op::Add(Tensor::from_vec(add, shape, &Device::Cpu)?));
    }
    Ok(())
}

/// A prune pass's summary line: what it `removed` in how many `layers`; the shape left, either
/// the same in every layer (`uniform`, described) or per layer (`what` differs, written under
/// config `keys` that stock transformers cannot load); and the bias the means went into, if any.
pub fn summary(removed: &str, layers: usize, uniform: Option<String>, what: &str, keys: &str, bias: Option<&str>) -> String {
    let shape = uniform.unwrap_or_else(|| format!("per-layer {what} ({keys}: not loadable by stock transformers)"));
    let comp = bias.map_or(String::new(), |b| format!(", mean folded into {b} bias"));
    format!("removed {removed} in {layers} layers; {shape}{comp}")
}

/// Random calibration ids for the examples (the property tests need no files).
pub fn example_ids(m: &Model, r: &mut impl Rng) -> toml::Value {
    let n = r.gen_range(1..=12);
    toml::Value::Array((0..n).map(|_| toml::Value::Integer(r.gen_range(0..m.cfg.vocab_size) as i64)).collect())
}

// The steering direction option (`direction` = file, inline array, or a resolved `{ by }`) of
// `bake-steering` and `conditional-steer`.

/// The direction from a file spec or an inline array, as f32 [d_model].
pub fn direction(v: &toml::Value, d: usize, cx: &BuildCtx) -> Result<Tensor> {
    match v {
        toml::Value::String(s) => {
            let mut spec = SetSpec::parse(s);
            spec.path = cx.path(&spec.path.to_string_lossy());
            if spec.field.is_none() && !spec.path.exists() {
                // `SetSpec::parse` only splits FILE:TENSOR when FILE:TENSOR is not itself a file.
                return Err(Error::invalid(format!("`direction`: no such file {}", spec.path.display())));
            }
            crate::verify::steer::load_direction(&spec, d).map_err(|e| Error::invalid(format!("`direction`: {e}")))
        }
        toml::Value::Array(a) => {
            let xs: Vec<f32> = a
                .iter()
                .map(|x| match x {
                    toml::Value::Float(f) => Ok(*f as f32),
                    toml::Value::Integer(i) => Ok(*i as f32),
                    other => Err(Error::invalid(format!("`direction`: expected numbers, found {other}"))),
                })
                .collect::<Result<_>>()?;
            if xs.len() != d {
                return Err(Error::invalid(format!(
                    "`direction` has {} values; the model needs {d} (d_model)",
                    xs.len()
                )));
            }
            if xs.iter().any(|x| !x.is_finite()) {
                return Err(Error::invalid("`direction` has non-finite values"));
            }
            if xs.iter().all(|&x| x == 0.0) {
                return Err(Error::invalid("`direction` is all zeros"));
            }
            Ok(Tensor::from_vec(xs, d, &Device::Cpu)?)
        }
        other => Err(Error::invalid(format!(
            "`direction` must be a file path or an array of numbers, found {other}"
        ))),
    }
}

pub fn unit(v: &Tensor) -> Result<Tensor> {
    let n = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    if !(n > 0.0 && n.is_finite()) {
        return Err(Error::invalid("`direction` has no usable length"));
    }
    Ok((v / n as f64)?)
}

/// The vector `bake-steering` mode add (and `conditional-steer`) adds per unit of `coeff`: the direction, unit length if `normalize`
/// (default true). For searches over `coeff` (the `projection` metric projects on it).
pub fn steering_vector(options: &toml::Table, cx: &BuildCtx) -> Result<Tensor> {
    let dir = options.get("direction").ok_or_else(|| Error::invalid("missing field `direction`"))?;
    let normalize = match options.get("normalize") {
        None => true,
        Some(toml::Value::Boolean(b)) => *b,
        Some(other) => return Err(Error::invalid(format!("`normalize` must be true or false, found {other}"))),
    };
    vector(dir, normalize, cx)
}

pub fn vector(dir: &toml::Value, normalize: bool, cx: &BuildCtx) -> Result<Tensor> {
    let v = direction(dir, cx.source.cfg.hidden_size, cx)?;
    if normalize { unit(&v) } else { Ok(v) }
}
