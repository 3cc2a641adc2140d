//! skip-layers: delete whole decoder blocks and renumber the rest.
//!
//! Options: `layers = [21, 22]` (block indices of the source model to delete; at least one block
//! stays) or `select = { by = ID, lowest = N }` (from findings). Examples in [`DOC`].
//!
//! The config's `num_hidden_layers` drops accordingly, and per-layer config arrays
//! (`layer_types`, `no_rope_layers`) lose the deleted entries. The result is a stock checkpoint
//! every runtime loads. Runtime twin: skip the same blocks (resid_post = resid_pre), exact.

use rand::{seq::SliceRandom, Rng, SeedableRng};
use serde::Deserialize;

use super::{options, BuildCtx, Pass, PassInfo};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::runtime::Hooks;

pub const INFO: PassInfo = PassInfo { name: "skip-layers", doc: DOC, build, example };

const DOC: &str = "Delete whole decoder blocks and renumber the rest.

Options (the blocks to delete, one of):
  layers = [21, 22]   block indices (0-based, of the source model); at least one block stays
  select = { by = ID, lowest = 1 }
                      blocks chosen from the findings of the [[locate]] step `ID` (e.g.
                      block-influence, where low = redundant): lowest = N or highest = N, or
                      fraction = F (of all blocks; from = \"lowest\" (default) | \"highest\");
                      layers = [..] restricts the candidates

num_hidden_layers and the per-layer config arrays (layer_types, no_rope_layers) are updated, so
the output is a stock checkpoint. Runtime twin: skip the same blocks (resid_post = resid_pre).

Example (delete two blocks by index):
    [[pass]]
    name = \"skip-layers\"
    layers = [21, 22]

Example (locate block influence, delete the lowest block; configs/smollm2-skip-layers.toml):
    [[locate]]
    id = \"bi\"
    method = \"block-influence\"
    text = \"../../shared/data/text/wikitext2-test.raw\"
    tokens = 2048
    [[pass]]
    name = \"skip-layers\"
    select = { by = \"bi\", lowest = 1 }

Example (the 3 most redundant of blocks 10 to 20):
    [[pass]]
    name = \"skip-layers\"
    select = { by = \"bi\", lowest = 3, layers = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20] }";

/// Config arrays with one entry per layer.
const PER_LAYER_KEYS: &[&str] = &["layer_types", "no_rope_layers"];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Opts {
    layers: Vec<usize>,
}

struct SkipLayers {
    /// Sorted, unique.
    layers: Vec<usize>,
}

fn build(t: &toml::Table, cx: &BuildCtx) -> Result<Box<dyn Pass>> {
    let m = cx.source;
    let o: Opts = options(t)?;
    let n = m.cfg.num_layers;
    let mut layers = o.layers;
    layers.sort_unstable();
    layers.dedup();
    if layers.is_empty() {
        return Err(Error::invalid("`layers` is empty: name at least one block to delete"));
    }
    if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
        return Err(Error::invalid(format!("layer {bad} does not exist (the model has layers 0..{})", n - 1)));
    }
    if layers.len() == n {
        return Err(Error::invalid(format!("deleting all {n} layers leaves no model")));
    }
    Ok(Box::new(SkipLayers { layers }))
}

fn example(m: &Model, seed: u64) -> Option<toml::Table> {
    let n = m.cfg.num_layers;
    if n < 2 {
        return None;
    }
    let mut r = rand::rngs::StdRng::seed_from_u64(seed);
    let mut all: Vec<usize> = (0..n).collect();
    all.shuffle(&mut r);
    let k = r.gen_range(1..n);
    let mut t = toml::Table::new();
    t.insert("layers".into(), toml::Value::Array(all[..k].iter().map(|&l| toml::Value::Integer(l as i64)).collect()));
    Some(t)
}

impl Pass for SkipLayers {
    fn run(&self, m: &mut Model) -> Result<String> {
        let before = m.blocks.len();
        for &l in self.layers.iter().rev() {
            m.blocks.remove(l);
        }
        m.cfg.num_layers = m.blocks.len();
        for key in PER_LAYER_KEYS {
            if let Some(serde_json::Value::Array(a)) = m.cfg.raw.get_mut(*key) {
                if a.len() == before {
                    for &l in self.layers.iter().rev() {
                        a.remove(l);
                    }
                }
            }
        }
        crate::model::sync_layer_config(m); // per-layer widths of pruned models lose the deleted layers too
        let list = self.layers.iter().map(|l| l.to_string()).collect::<Vec<_>>().join(", ");
        Ok(format!("deleted layers {list} ({before} → {} layers)", m.blocks.len()))
    }

    fn twin(&self, _source: &Model) -> Result<Hooks> {
        let mut h = Hooks::new();
        for &l in &self.layers {
            h.skip_block(l);
        }
        Ok(h)
    }
}
