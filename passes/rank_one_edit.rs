//! rank-one-edit: ROME knowledge edits (r-ROME-consistent keys) of one layer's `down_proj`,
//! applied sequentially, or MEMIT edits of a layer range, applied jointly. The algorithms are in
//! `src/rome/`; this file reads the options and the facts and runs them.

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;

use super::{options, BuildCtx, Pass, PassInfo};
use crate::data::RecordSet;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::rome::covariance::{self, Covariance};
use crate::rome::{self, memit, Fact, Hparams, KeyValue, RankOne};
use crate::runtime::Hooks;
use crate::tokenizer::Tok;

pub const INFO: PassInfo = PassInfo { name: "rank-one-edit", doc: DOC, build, example };

const DOC: &str = "ROME / MEMIT knowledge edits: rewrite facts in the MLP weights.

Make the model complete `prompt` (which names `subject`) with `target_new`. ROME (default): a rank-one change of one layer's down_proj per fact
(r-ROME-consistent keys; several facts are applied one after another, each computed on the model
with the earlier ones). MEMIT: all facts at once, spread over the down_projs of a layer range
(per layer ΔW = R Kᵀ(λC + KKᵀ)⁻¹, one rank-one term per fact and layer).

Options:
  facts = \"counterfact.json\"   CounterFact-style records (JSON list or JSONL) with `subject`,
                               `prompt` (containing the subject) and `target_new`; path
                               relative to the pipeline file
  ids = [0, 4]                 the records (by `case_id`) to apply, in this order ...
  limit = 10                   ... or the first `limit` records (default 10)
  method = \"rome\"              \"rome\" (sequential) or \"memit\" (joint, over `layers`)
  layer = 4                    ROME: the down_proj to edit (0-based; required: EasyEdit uses 5
                               for Llama-7B, ROME 17 of 48 for GPT-2 XL; pick by evaluating, not
                               by causal tracing)
  layers = [2, 3, 4, 5, 6]     MEMIT: the down_projs to edit, increasing (MEMIT: 3..8 of
                               GPT-J's 28; EasyEdit 4..8 of Llama's 32); the targets are set on
                               the residual after the last one
  mom2_weight = 15000          MEMIT's λ in (λC + KKᵀ): larger keeps more of what C's text
                               needs, smaller writes the facts harder (default 15000 with a
                               covariance text, as MEMIT; 15 with \"identity\", as EasyEdit)
  covariance = \"wiki.txt\"      text whose MLP inputs give C = E[k kᵀ] (cached on disk, keyed by
                               the weights, tokens and window; for MEMIT one per layer, collected
                               in one pass), or \"identity\" (C = I, EasyEdit's default for Llama)
  cov_tokens = 100000          tokens of the covariance text to use (default 100000)
  cov_seq_len = 512            window length for the covariance (default 512)
  ridge = 1e-4                 ROME: C + ridge·mean(diag C)·I before the Cholesky solve (default 1e-4)
  prefixes = 10                generated context prefixes for k* and v* (multiple of 5; default 10)
  prefix_tokens = 5            tokens per generated prefix (default 5; ROME uses 10 of 5 tokens
                               and 10 of 10: raise both for better paraphrase generalisation
                               at proportionally more time per edit)
  seed = 0                     seed of the prefix sampling (default 0)
  steps = 20                   Adam steps for v* (MEMIT: z) (ROME: 20; stops once the loss is below 0.05)
  lr = 0.5
  kl_factor = 0.0625           weight of KL(p_edit ‖ p_orig) on \"{subject} is a\"
  weight_decay = 0.001         weight of ‖δ‖/‖v₀‖² (EasyEdit's Llama value; ROME's GPT-2 XL 0.5
                               assumes its large MLP outputs and would never let the loss stop)
  clamp = 4.0                  ‖δ‖ ≤ clamp·‖v₀‖ (MEMIT: ‖δ‖ and the weight decay are relative to
                               the residual after the last layer, not the MLP output)

Needs the model's tokenizer. Runtime twin: a rank-k adapter beside the edited down_proj,
mlp_out += Σᵢ rᵢ (uᵢ·k) with k the layer's mlp.hook_post; exact, since W' = W + Σᵢ rᵢuᵢᵀ.
Targets are facts, not components: `select` does not apply.

Example (ROME, the first 20 CounterFact records into layer 4; configs/smollm2-rome-facts.toml):
    [[pass]]
    name = \"rank-one-edit\"
    facts = \"../../shared/data/prompts/counterfact/counterfact-edit.json\"
    limit = 20
    layer = 4
    covariance = \"../../shared/data/text/wikitext2-test.raw\"
    cov_tokens = 100000

Example (MEMIT over layers 2..6; configs/smollm2-memit-facts.toml):
    [[pass]]
    name = \"rank-one-edit\"
    method = \"memit\"
    facts = \"../../shared/data/prompts/counterfact/counterfact-edit.json\"
    limit = 20
    layers = [2, 3, 4, 5, 6]
    mom2_weight = 800
    covariance = \"../../shared/data/text/wikitext2-test.raw\"

Example (two chosen records, C = I, as EasyEdit does for Llama):
    [[pass]]
    name = \"rank-one-edit\"
    facts = \"../../shared/data/prompts/counterfact/counterfact-edit.json\"
    ids = [0, 4]
    layer = 4
    covariance = \"identity\"";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Opts {
    facts: String,
    #[serde(default)]
    ids: Vec<toml::Value>,
    limit: Option<usize>,
    #[serde(default)]
    method: Method,
    layer: Option<usize>,
    layers: Option<Vec<usize>>,
    mom2_weight: Option<f64>,
    covariance: String,
    #[serde(default = "d_cov_tokens")]
    cov_tokens: usize,
    #[serde(default = "d_cov_seq_len")]
    cov_seq_len: usize,
    ridge: Option<f64>,
    #[serde(default = "d_prefixes")]
    prefixes: usize,
    #[serde(default = "d_prefix_tokens")]
    prefix_tokens: usize,
    #[serde(default)]
    seed: u64,
    steps: Option<usize>,
    lr: Option<f64>,
    kl_factor: Option<f64>,
    weight_decay: Option<f64>,
    clamp: Option<f64>,
}

fn d_cov_tokens() -> usize {
    100_000
}
fn d_cov_seq_len() -> usize {
    512
}
fn d_prefixes() -> usize {
    10
}
fn d_prefix_tokens() -> usize {
    5
}

#[derive(Deserialize, Default, Debug, Clone, Copy, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Method {
    #[default]
    Rome,
    Memit,
}

/// Which down_projs are edited, and how.
#[derive(Debug, Clone)]
enum Edit {
    Rome { layer: usize, ridge: f64 },
    Memit { layers: Vec<usize>, lambda: f64 },
}

impl Edit {
    fn layers(&self) -> Vec<usize> {
        match self {
            Edit::Rome { layer, .. } => vec![*layer],
            Edit::Memit { layers, .. } => layers.clone(),
        }
    }
}

/// Where C comes from.
#[derive(Debug, Clone)]
enum CovSource {
    Identity,
    Text { path: PathBuf, tokens: usize, seq_len: usize },
}

struct RankOneEdit {
    facts: Vec<Fact>,
    edit: Edit,
    cov: CovSource,
    prefixes: usize,
    prefix_tokens: usize,
    seed: u64,
    hp: Hparams,
    tok: Tok,
    progress: bool,
    /// Computed on the first model the pass sees (see [`RankOneEdit::updates`]).
    done: OnceLock<Edits>,
}

struct Edits {
    updates: Vec<RankOne>,
    kvs: Vec<KeyValue>,
    cov_note: String,
}

fn build(t: &toml::Table, cx: &BuildCtx) -> Result<Box<dyn Pass>> {
    let m = cx.source;
    let o: Opts = options(t)?;
    let tok = cx.tok.ok_or_else(|| Error::invalid("rank-one-edit needs the model's tokenizer (tokenizer.json)"))?.clone();
    if o.prefixes % 5 != 0 {
        return Err(Error::invalid(format!("prefixes = {}: must be a multiple of 5", o.prefixes)));
    }
    let path = cx.path(&o.facts);
    if !o.ids.is_empty() && o.limit.is_some() {
        return Err(Error::invalid("give `ids` or `limit`, not both"));
    }
    let set = RecordSet::load(&path, if o.ids.is_empty() { o.limit.unwrap_or(10) } else { 0 })?;
    let ids: Vec<String> = o
        .ids
        .iter()
        .map(|v| match v {
            toml::Value::String(s) => Ok(s.clone()),
            toml::Value::Integer(i) => Ok(i.to_string()),
            other => Err(Error::invalid(format!("ids: {other} is not a record id (an integer or a string)"))),
        })
        .collect::<Result<_>>()?;
    let chosen = crate::verify::edit::select(&set, "case_id", (!ids.is_empty()).then_some(ids.as_slice()))?;
    let mut facts = vec![];
    for i in chosen {
        let f = Fact {
            subject: set.str_field(i, "subject")?.to_string(),
            prompt: set.str_field(i, "prompt")?.to_string(),
            target_new: set.str_field(i, "target_new")?.to_string(),
        };
        // Fail now (not after minutes of work) on a fact that cannot be tokenised.
        rome::request(&tok, &f, &[]).map_err(|e| Error::config(&path, "prompt", format!("record {i}: {e}")))?;
        facts.push(f);
    }
    let cov = match o.covariance.as_str() {
        "identity" => CovSource::Identity,
        p => {
            let path = cx.path(p);
            if !path.is_file() {
                return Err(Error::bad_file(&path, "covariance text: no such file (or write covariance = \"identity\")"));
            }
            if o.cov_tokens < 2 || o.cov_seq_len == 0 {
                return Err(Error::invalid("cov_tokens must be ≥ 2 and cov_seq_len > 0"));
            }
            CovSource::Text { path, tokens: o.cov_tokens, seq_len: o.cov_seq_len }
        }
    };
    let exists = |l: usize| {
        if l < m.cfg.num_layers {
            Ok(l)
        } else {
            Err(Error::invalid(format!("layer {l} does not exist (the model has layers 0..{})", m.cfg.num_layers - 1)))
        }
    };
    let edit = match o.method {
        Method::Rome => {
            if o.layers.is_some() || o.mom2_weight.is_some() {
                return Err(Error::invalid("`layers` and `mom2_weight` are MEMIT's options (method = \"memit\"); ROME edits one `layer`"));
            }
            let layer = exists(o.layer.ok_or_else(|| Error::invalid("give the `layer` to edit (or method = \"memit\" with `layers`)"))?)?;
            let ridge = o.ridge.unwrap_or(1e-4);
            if !(ridge >= 0.0 && ridge.is_finite()) {
                return Err(Error::invalid(format!("ridge = {ridge}: must be ≥ 0")));
            }
            Edit::Rome { layer, ridge }
        }
        Method::Memit => {
            if o.layer.is_some() || o.ridge.is_some() {
                return Err(Error::invalid("MEMIT edits a layer range: give `layers = [..]` (and `mom2_weight`), not `layer` or `ridge`"));
            }
            let layers = o.layers.ok_or_else(|| Error::invalid("method = \"memit\" needs `layers = [..]`, the down_projs to edit"))?;
            if layers.is_empty() || layers.windows(2).any(|w| w[0] >= w[1]) {
                return Err(Error::invalid(format!("layers = {layers:?}: give at least one layer, in increasing order")));
            }
            let layers = layers.into_iter().map(exists).collect::<Result<Vec<_>>>()?;
            let lambda = o.mom2_weight.unwrap_or(if matches!(cov, CovSource::Identity) { 15.0 } else { 15000.0 });
            if !(lambda >= 0.0 && lambda.is_finite()) {
                return Err(Error::invalid(format!("mom2_weight = {lambda}: must be ≥ 0")));
            }
            Edit::Memit { layers, lambda }
        }
    };
    let d = Hparams::default();
    let hp = Hparams {
        steps: o.steps.unwrap_or(d.steps),
        lr: o.lr.unwrap_or(d.lr),
        kl_factor: o.kl_factor.unwrap_or(d.kl_factor),
        weight_decay: o.weight_decay.unwrap_or(d.weight_decay),
        clamp: o.clamp.unwrap_or(d.clamp),
        stop_loss: d.stop_loss,
    };
    if hp.steps == 0 || !(hp.lr > 0.0) || !(hp.clamp > 0.0) {
        return Err(Error::invalid("steps, lr and clamp must be positive"));
    }
    Ok(Box::new(RankOneEdit {
        facts,
        edit,
        cov,
        prefixes: o.prefixes,
        prefix_tokens: o.prefix_tokens,
        seed: o.seed,
        hp,
        tok,
        progress: cx.progress,
        done: OnceLock::new(),
    }))
}

/// Random models have no tokenizer, so the registry's generic twin test cannot build this pass;
/// `tests/rome.rs` holds its update and its twin to their properties instead.
fn example(_: &Model, _: u64) -> Option<toml::Table> {
    None
}

impl RankOneEdit {
    /// The updates, computed once, on the first model asked about: the model this pass
    /// rewrites in a compile (after the passes before it), or the source for its twin.
    fn edits(&self, model: &Model) -> Result<&Edits> {
        if let Some(e) = self.done.get() {
            return Ok(e);
        }
        let e = self.compute(model)?;
        Ok(self.done.get_or_init(|| e))
    }

    fn compute(&self, model: &Model) -> Result<Edits> {
        let layers = self.edit.layers();
        let (covs, cov_note) = match &self.cov {
            CovSource::Identity => {
                let covs = layers.iter().map(|&l| Ok(Covariance::identity(l, model.blocks[l].down.w().dim(1)?))).collect::<Result<Vec<_>>>()?;
                (covs, "C = I".to_string())
            }
            CovSource::Text { path, tokens, seq_len } => covariance::from_text(model, &self.tok, &layers, path, *tokens, *seq_len, self.progress)?,
        };
        let prefixes = rome::context_prefixes(model, &self.tok, self.prefixes, self.prefix_tokens, self.seed)?;
        let reqs = self.facts.iter().map(|f| rome::request(&self.tok, f, &prefixes)).collect::<Result<Vec<_>>>()?;
        let (mut updates, mut kvs) = (vec![], vec![]);
        match &self.edit {
            Edit::Rome { layer, ridge } => {
                let mut work = model.clone();
                let bar = crate::progress::bar(reqs.len() as u64, "edits", self.progress);
                for req in &reqs {
                    let kv = rome::key_value(&work, *layer, req, &self.hp, rome::Anchor::MlpOut)?;
                    let u = rome::rank_one(&work, &kv, &covs[0].solve(&kv.k, *ridge)?)?;
                    u.apply(&mut work)?;
                    updates.push(u);
                    kvs.push(kv);
                    bar.inc(1);
                }
                bar.finish_and_clear();
            }
            Edit::Memit { layers, lambda } => {
                let last = *layers.last().expect("build checked: at least one layer");
                let bar = crate::progress::bar((reqs.len() + layers.len()) as u64, "targets, then layers", self.progress);
                for req in &reqs {
                    kvs.push(rome::key_value(model, last, req, &self.hp, rome::Anchor::Resid)?);
                    bar.inc(1);
                }
                let zs: Vec<Vec<f32>> = kvs.iter().map(|kv| kv.v.clone()).collect();
                updates = memit::updates(model, layers, &reqs, &zs, &covs, *lambda, |_| bar.inc(1))?;
                bar.finish_and_clear();
            }
        }
        Ok(Edits { updates, kvs, cov_note })
    }
}

impl Pass for RankOneEdit {
    fn run(&self, m: &mut Model) -> Result<String> {
        let e = self.edits(m)?;
        rome::apply(&e.updates, m)?;
        let n = e.kvs.len() as f64;
        let mean = |f: &dyn Fn(&KeyValue) -> f64| e.kvs.iter().map(f).sum::<f64>() / n;
        let (what, v0, per) = match &self.edit {
            Edit::Rome { layer, .. } => (format!("into L{layer}.mlp down_proj"), "v₀", "per edit"),
            Edit::Memit { layers, lambda } => {
                let ls = layers.iter().map(|l| format!("L{l}")).collect::<Vec<_>>().join(",");
                (format!("jointly into the down_proj of {ls} (MEMIT, λ = {lambda})"), "h", "per target z")
            }
        };
        Ok(format!(
            "{} facts {what} ({}); target NLL {:.2} → {:.2} (mean), ‖δ‖/‖{v0}‖ {:.2}, {:.1} Adam steps, {:.2} s {per}",
            e.kvs.len(),
            e.cov_note,
            mean(&|k| k.nll_first),
            mean(&|k| k.nll_last),
            mean(&|k| k.delta_norm / k.v0_norm),
            mean(&|k| k.steps as f64),
            mean(&|k| k.seconds),
        ))
    }

    fn twin(&self, source: &Model) -> Result<Hooks> {
        rome::twin(&self.edits(source)?.updates)
    }
}
