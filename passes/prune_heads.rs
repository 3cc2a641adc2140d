//! prune-heads: structured removal of attention query heads (q rows, o_proj columns) and of whole
//! kv groups (their k/v rows too) once all of a group's query heads go; GQA groups stay equal.
//! Optional mean-ablation compensation folded into the `o_proj` bias. Shared with
//! `prune-neurons`: `passes/common.rs` and `model::surgery`.

use std::collections::{BTreeMap, BTreeSet};

use rand::{seq::SliceRandom, Rng, SeedableRng};
use serde::Deserialize;

use super::common::{ablate_units, example_ids, layer_list, lowest, mean_over_doc, prune_options, summary, Compensate};
use super::{BuildCtx, Pass, PassInfo};
use crate::error::{Error, Result};
use crate::model::surgery::{add_zero_biases, folded, keep_cols, keep_rows, kept};
use crate::model::{Arch, Model, Proj};
use crate::runtime::{HookPoint, Hooks};

pub const INFO: PassInfo = PassInfo { name: "prune-heads", doc: DOC, build, example };

const DOC: &str = concat!(
    "Remove attention heads (query heads, and whole kv groups when all their heads go).

Query heads go as q_proj rows and o_proj columns; a whole kv group (its k_proj/v_proj rows too)
goes when all of its query heads go.

Options (explicit targets, or a built-in ranking):
  heads = [\"L3.H2\", \"L3.H5\"]  query heads to remove (layer and head index of the source model)
  select = { by = ID, lowest = 1, per_group = true }
                           or: heads chosen from the findings of the [[locate]] step `ID`
                           (head-importance: low = least important): lowest = N, highest = N or
                           fraction = F (from = \"lowest\" | \"highest\"); per_group = true counts
                           within each kv group (keeps GQA valid), per_layer = true within each
                           layer; layers = [..] restricts the candidates
  per_group = 1            or: remove this many query heads from every kv group ...
  layers = [0, 1]          ... in these layers (default: all) ...
  by = \"weight-magnitude\"  ... the lowest ‖W_q rows of the head‖·‖W_o columns of the head‖
  uniform = true           fail unless every layer ends with the same head counts (stock config)
  compensate = \"none\"      or \"mean\": add W_o · mean(z of the pruned heads) to o_proj's bias;
                           creates zero q/k/v/o biases and sets attention_bias = true if the model
                           has none (Llama; Qwen2 has no o_proj bias in HF, so it cannot)
", mean_over_doc!(), "
GQA stays valid: in every layer, the kv groups that keep any query head must keep the same
number of them (remove the same count from every group, and/or whole groups); other patterns
are refused. The same head counts in every layer update num_attention_heads and
num_key_value_heads (head_dim stays explicit): a stock checkpoint. Counts that differ between
layers are written as mechc_layer_num_attention_heads / mechc_layer_num_key_value_heads, which
our loader reads and stock transformers cannot load. Runtime twin: scale the pruned heads by 0
at blocks.L.attn.hook_z; with compensate = \"mean\", then add their mean z there (at every
position), i.e. mean ablation. Means are measured on the pass's source model.

Example (explicit heads; a kv group of three keeps two):
    [[pass]]
    name = \"prune-heads\"
    heads = [\"L3.H2\", \"L3.H5\", \"L3.H8\"]

Example (the smallest-weight head of every kv group, mean-compensated over a text):
    [[pass]]
    name = \"prune-heads\"
    per_group = 1
    by = \"weight-magnitude\"
    uniform = true
    compensate = \"mean\"
    mean_over_text = \"../../shared/data/text/wikitext2-test.raw\"
    tokens = 256

Example (located by FLAP: the least important head of each kv group in layers 4 to 7):
    [[locate]]
    id = \"hi\"
    method = \"head-importance\"
    text = \"../../shared/data/text/wikitext2-test.raw\"
    tokens = 1024
    [[pass]]
    name = \"prune-heads\"
    select = { by = \"hi\", lowest = 1, per_group = true, layers = [4, 5, 6, 7] }",
);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Opts {
    heads: Option<Vec<String>>,
    per_group: Option<usize>,
    layers: Option<Vec<usize>>,
    by: Option<String>,
    #[serde(default)]
    uniform: bool,
}

/// What happens to one layer.
struct LayerPlan {
    n_q: usize,
    n_kv: usize,
    /// Sorted query heads removed.
    pruned: Vec<usize>,
    keep_q: Vec<usize>,
    keep_kv: Vec<usize>,
    /// Mean z of each pruned head (head_dim values each, in `pruned` order), for compensate = "mean".
    means: Vec<f32>,
}

struct PruneHeads {
    layers: BTreeMap<usize, LayerPlan>,
    compensate: bool,
    head_dim: usize,
}

fn parse_head(s: &str) -> Option<(usize, usize)> {
    let (l, h) = s.trim().strip_prefix('L')?.split_once(".H")?;
    Some((l.parse().ok()?, h.parse().ok()?))
}

/// Check a layer's removal pattern against its GQA groups.
fn plan_layer(l: usize, n_q: usize, n_kv: usize, pruned: Vec<usize>) -> Result<LayerPlan> {
    let g = n_q / n_kv;
    let mut keep_kv = vec![];
    let mut sizes = BTreeSet::new();
    for j in 0..n_kv {
        let left = (j * g..(j + 1) * g).filter(|h| pruned.binary_search(h).is_err()).count();
        if left > 0 {
            keep_kv.push(j);
            sizes.insert(left);
        }
    }
    if keep_kv.is_empty() {
        return Err(Error::invalid(format!(
            "`heads`: removing all {n_q} heads of layer {l} leaves no attention"
        )));
    }
    if sizes.len() > 1 {
        let sizes: Vec<String> = sizes.iter().map(|s| s.to_string()).collect();
        return Err(Error::invalid(format!(
            "`heads`: layer {l} would keep uneven GQA groups ({} query heads per kv head; groups of {g}): remove the same number \
             of query heads from every kv group, or whole groups",
            sizes.join(" vs ")
        )));
    }
    let keep_q = kept(n_q, &pruned);
    Ok(LayerPlan {
        n_q,
        n_kv,
        pruned,
        keep_q,
        keep_kv,
        means: vec![],
    })
}

fn build(t: &toml::Table, cx: &BuildCtx) -> Result<Box<dyn Pass>> {
    let m = cx.source;
    let (o, mean): (Opts, _) = prune_options(t)?;
    let n = m.cfg.num_layers;
    let hd = m.cfg.head_dim;
    let counts = |l: usize| (m.blocks[l].q.out_features() / hd, m.blocks[l].k.out_features() / hd);
    if let Some(by) = &o.by {
        if by != "weight-magnitude" {
            return Err(Error::invalid(format!(
                "`by`: unknown ranking `{by}` (known: weight-magnitude)"
            )));
        }
    }
    let mut per_layer: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    match (&o.heads, o.per_group) {
        (Some(_), Some(_)) => return Err(Error::invalid("give `heads` or `per_group`, not both")),
        (Some(heads), None) => {
            if o.layers.is_some() || o.by.is_some() {
                return Err(Error::invalid("`heads` names the targets: drop `layers` and `by`"));
            }
            for s in heads {
                let (l, h) = parse_head(s).ok_or_else(|| {
                    Error::invalid(format!("`heads`: `{s}` is not of the form L<layer>.H<head> (e.g. \"L3.H2\")"))
                })?;
                if l >= n {
                    return Err(Error::invalid(format!(
                        "`heads`: {s}: layer {l} does not exist (the model has layers 0..{})",
                        n - 1
                    )));
                }
                let (n_q, _) = counts(l);
                if h >= n_q {
                    return Err(Error::invalid(format!(
                        "`heads`: {s}: head {h} does not exist (layer {l} has heads 0..{})",
                        n_q - 1
                    )));
                }
                per_layer.entry(l).or_default().push(h);
            }
        }
        (None, Some(k)) => {
            for l in layer_list(o.layers.as_deref(), n)? {
                let (n_q, n_kv) = counts(l);
                let g = n_q / n_kv;
                if k >= g {
                    return Err(Error::invalid(format!(
                        "`per_group`: {k} would empty layer {l}'s kv groups of {g} query heads (at most {})",
                        g - 1
                    )));
                }
                let scores = head_scores(m, l)?;
                let mut v = vec![];
                for j in 0..n_kv {
                    v.extend(lowest(&scores[j * g..(j + 1) * g], k).into_iter().map(|h| j * g + h));
                }
                if !v.is_empty() {
                    per_layer.insert(l, v);
                }
            }
        }
        (None, None) => return Err(Error::invalid("name the heads: `heads = [\"L3.H2\"]`, or `per_group = 1`")),
    }
    let mut layers = BTreeMap::new();
    for (l, mut v) in per_layer {
        v.sort_unstable();
        v.dedup();
        let (n_q, n_kv) = counts(l);
        layers.insert(l, plan_layer(l, n_q, n_kv, v)?);
    }
    if layers.is_empty() {
        return Err(Error::invalid("no heads selected: nothing to prune"));
    }
    if o.uniform {
        let shapes: BTreeSet<(usize, usize)> = (0..n)
            .map(|l| {
                layers
                    .get(&l)
                    .map_or(counts(l), |p: &LayerPlan| (p.keep_q.len(), p.keep_kv.len()))
            })
            .collect();
        if shapes.len() > 1 {
            return Err(Error::invalid(format!(
                "`uniform = true`, but the layers would end with different (query, kv) head counts: {shapes:?}"
            )));
        }
    }
    let points: Vec<HookPoint> = layers.keys().map(|&l| HookPoint::AttnZ(l)).collect();
    if let Some(avg) = mean.means(cx, "o_proj", &points)? {
        for (&l, p) in layers.iter_mut() {
            let z: Vec<Vec<f32>> = avg[&HookPoint::AttnZ(l)].to_vec2()?;
            p.means = p.pruned.iter().flat_map(|&h| z[h].iter().copied()).collect();
        }
    }
    Ok(Box::new(PruneHeads {
        layers,
        compensate: mean.compensate == Compensate::Mean,
        head_dim: hd,
    }))
}

/// ‖W_q rows of head h‖ · ‖W_o columns of head h‖ for every query head of layer `l`.
pub fn head_scores(m: &Model, l: usize) -> Result<Vec<f32>> {
    let (b, hd) = (&m.blocks[l], m.cfg.head_dim);
    let n_q = b.q.out_features() / hd;
    let q: Vec<f32> = b.q.w().sqr()?.sum(1)?.reshape((n_q, hd))?.sum(1)?.sqrt()?.to_vec1()?;
    let o: Vec<f32> = b.o.w().sqr()?.sum(0)?.reshape((n_q, hd))?.sum(1)?.sqrt()?.to_vec1()?;
    Ok(q.iter().zip(&o).map(|(a, b)| a * b).collect())
}

fn example(m: &Model, seed: u64) -> Option<toml::Table> {
    let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0x6865);
    let hd = m.cfg.head_dim;
    let mut heads = vec![];
    for (l, b) in m.blocks.iter().enumerate() {
        let (n_q, n_kv) = (b.q.out_features() / hd, b.k.out_features() / hd);
        let g = n_q / n_kv;
        if r.gen_bool(0.3) {
            continue;
        }
        // Remove `whole` kv groups and `each` query heads from every remaining group.
        let whole = r.gen_range(0..n_kv);
        let each = r.gen_range(0..g);
        let mut groups: Vec<usize> = (0..n_kv).collect();
        groups.shuffle(&mut r);
        for (i, &j) in groups.iter().enumerate() {
            let mut members: Vec<usize> = (j * g..(j + 1) * g).collect();
            members.shuffle(&mut r);
            let take = if i < whole { g } else { each };
            heads.extend(members[..take].iter().map(|h| format!("L{l}.H{h}")));
        }
    }
    if heads.is_empty() {
        return None;
    }
    let mut t = toml::Table::new();
    t.insert(
        "heads".into(),
        toml::Value::Array(heads.into_iter().map(toml::Value::String).collect()),
    );
    if m.cfg.arch == Arch::Llama && r.gen_bool(0.5) {
        t.insert("compensate".into(), "mean".into());
        t.insert("mean_over_ids".into(), example_ids(m, &mut r));
    }
    Some(t)
}

/// Row indices of whole heads.
fn head_rows(heads: &[usize], hd: usize) -> Vec<usize> {
    heads.iter().flat_map(|&h| h * hd..(h + 1) * hd).collect()
}

impl Pass for PruneHeads {
    fn run(&self, m: &mut Model) -> Result<String> {
        let hd = self.head_dim;
        for (&l, p) in &self.layers {
            let have = m.blocks.get(l).map(|b| (b.q.out_features() / hd, b.k.out_features() / hd));
            if have != Some((p.n_q, p.n_kv)) || m.cfg.head_dim != hd {
                return Err(Error::invalid(format!(
                    "prune-heads: layer {l} is not the layer of {} query / {} kv heads the pass was built for",
                    p.n_q, p.n_kv
                )));
            }
        }
        if self.compensate && !m.cfg.o_bias {
            // HF's attention_bias puts biases on q, k, v and o alike.
            add_zero_biases(m, &[Proj::Q, Proj::K, Proj::V, Proj::O])?;
            m.cfg.qkv_bias = true;
            m.cfg.o_bias = true;
        }
        let (mut q_removed, mut kv_removed) = (0, 0);
        for (&l, p) in &self.layers {
            let b = &mut m.blocks[l];
            let extra = if self.compensate {
                Some(folded(&b.o, &head_rows(&p.pruned, hd), &p.means)?)
            } else {
                None
            };
            let (q_rows, kv_rows) = (head_rows(&p.keep_q, hd), head_rows(&p.keep_kv, hd));
            b.q = keep_rows(&b.q, &q_rows)?;
            b.k = keep_rows(&b.k, &kv_rows)?;
            b.v = keep_rows(&b.v, &kv_rows)?;
            b.o = keep_cols(&b.o, &q_rows, extra.as_ref())?;
            q_removed += p.pruned.len();
            kv_removed += p.n_kv - p.keep_kv.len();
        }
        crate::model::sync_layer_config(m);
        let uniform = !m.cfg.raw.contains_key(crate::model::config::LAYER_HEADS_KEY)
            && !m.cfg.raw.contains_key(crate::model::config::LAYER_KV_HEADS_KEY);
        Ok(summary(
            &format!("{q_removed} query heads and {kv_removed} kv heads"),
            self.layers.len(),
            uniform.then(|| format!("{} query / {} kv heads in every layer", m.cfg.num_heads, m.cfg.num_kv_heads)),
            "head counts",
            "mechc_layer_*",
            self.compensate.then_some("o_proj"),
        ))
    }

    fn twin(&self, source: &Model) -> Result<Hooks> {
        let hd = self.head_dim;
        let mut h = Hooks::new();
        for (&l, p) in &self.layers {
            if source.blocks.get(l).map(|b| b.q.out_features() / hd) != Some(p.n_q) {
                return Err(Error::invalid(format!(
                    "prune-heads: layer {l} of this model does not have {} query heads",
                    p.n_q
                )));
            }
            let means = self.compensate.then_some(p.means.as_slice());
            ablate_units(&mut h, HookPoint::AttnZ(l), p.n_q, &[hd], &p.pruned, means)?;
        }
        Ok(h)
    }
}
