//! prune-neurons: structured MLP width reduction (rows of gate/up, columns of down), uniform or
//! per layer, with optional FLAP-style mean compensation folded into the `down_proj` bias.
//! What it shares with `prune-heads` is in `passes/common.rs` (options, calibration, means, the
//! twin) and `model::surgery` (slicing projections, folding means into biases).

use std::collections::{BTreeMap, BTreeSet};

use rand::{seq::SliceRandom, Rng, SeedableRng};
use serde::Deserialize;

use super::common::{ablate_units, example_ids, layer_list, mean_over_doc, prune_options, summary};
pub use super::common::lowest;
use super::{BuildCtx, Pass, PassInfo};
use crate::error::{Error, Result};
use crate::model::surgery::{add_zero_biases, folded, keep_cols, keep_rows, kept};
use crate::model::{Arch, Model, Proj};
use crate::runtime::{HookPoint, Hooks};

pub const INFO: PassInfo = PassInfo { name: "prune-neurons", doc: DOC, build, example };

const DOC: &str = concat!(
    "Remove MLP neurons: rows of gate_proj/up_proj, columns of down_proj.

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
", mean_over_doc!(), "
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
    tokens = 512",
);

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
    seed: Option<u64>,
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
    let (o, mean): (Opts, _) = prune_options(t)?;
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
            for l in layer_list(o.layers.as_deref(), n)? {
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
    let points: Vec<HookPoint> = layers.keys().map(|&l| HookPoint::MlpPost(l)).collect();
    let means = match mean.means(cx, "down_proj", &points)? {
        None => None,
        Some(avg) => {
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
        Ok(summary(
            &format!("{removed} neurons"),
            self.layers.len(),
            (widths.len() == 1).then(|| format!("d_ff {} in every layer", m.cfg.intermediate_size)),
            "d_ff",
            "mechc_layer_intermediate_size",
            self.means.is_some().then_some("down_proj"),
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
            let means = self.means.as_ref().map(|means| means[&l].as_slice());
            ablate_units(&mut h, HookPoint::MlpPost(l), *f, &[], list, means)?;
        }
        Ok(h)
    }
}
