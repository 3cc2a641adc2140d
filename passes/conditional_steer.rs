//! conditional-steer: a steering vector written into one MLP so that it is added only where a
//! concept is present (ROME's rank-one machinery with a concept key, `src/rome/concept.rs`).
//! The help text is [`DOC`].

use std::path::PathBuf;
use std::sync::OnceLock;

use serde::Deserialize;

use super::common::vector;
use super::{options, BuildCtx, Pass, PassInfo};
use crate::data::{SetSpec, TextSet};
use crate::error::{Error, Result};
use crate::model::Model;
use crate::rome::concept::{self, ConceptKey, HeldOut};
use crate::rome::covariance::{self, Covariance};
use crate::rome::{self, RankOne};
use crate::runtime::Hooks;
use crate::tokenizer::Tok;

pub const INFO: PassInfo = PassInfo { name: "conditional-steer", doc: DOC, build, example };

const DOC: &str = r#"Add a steering direction only where a concept is present (a rank-one down_proj write).

A rank-one write into one layer's down_proj, ΔW = c·v uᵀ, whose key u fires (uᵀk ≈ 1) on the positive prompts' MLP inputs
and stays silent (≈ 0) on the negative prompts' and on running text. E.g. refuse harmful
requests only: v = a refusal direction, positive = harmful prompts, negative = harmless ones.
(`bake-steering` mode add adds c·v at every position of every prompt instead.)

Options:
  layer = 11              block whose MLP gets the write (its mlp.hook_post is the key's input;
                          c·v joins the residual stream after it)
  direction = "dir.safetensors[:tensor]" | [..d_model numbers..] | { by = ID [, layer = L] }
                          the value v, as in bake-steering
  normalize = true        scale v to unit length first (default true)
  coeff = 1.0             c: the vector added where the key fires fully (uᵀk = 1); or
                          coeff = "auto" with an `auto` table, exactly as bake-steering mode add
                          (the KL budget, metric = "refusal", control_prompts, ...)
  positive = "harmful.json:instruction"    prompts where v is to be added (required)
  negative = "harmless.json:instruction"   prompts where it must not be (required)
  limit = 128, skip = 0   the prompts of each set used: after the first `skip`, the next `limit`
                          (0 = all)
  chat = true             wrap the prompts in the chat template (default true)
  last = 0                key positions: the last N tokens of every prompt (0, the default: the
                          chat template's tokens after the instruction, e.g. the assistant
                          header, where the model decides how to answer; 1 without chat)
  covariance = "wiki.txt" text whose MLP inputs give C = E[kkᵀ], as rank-one-edit (cached), or
                          "identity"
  cov_tokens = 100000, cov_seq_len = 512
  quiet = 1.0             weight of the silence on running text: u minimises
                          Σ (uᵀkᵢ − yᵢ)² + quiet·n·uᵀCu over the n keys (y = 1 positive, 0
                          negative); larger: less firing on ordinary text and weaker on the
                          positives
  batch = 16              prompts per forward pass

u = (KKᵀ + quiet·n·C)⁻¹ K y (Cholesky, f64). The pass prints how u fires: mean ± sd of uᵀk over
the positive and the negative keys, its root-mean-square √(uᵀCu) on the text, and (with 4 or
more prompts per set) on every fourth prompt of each set when fitted without them: how the
key generalises. A lower `quiet` fits the prompts' keys more closely but fires more on other
text (on SmolLM2 the model's own answers then drift); 1.0 refused most selectively there.

Runtime twin: mlp_out += c·(uᵀ hook_post)·v at the layer, every position: ROME's rank-one twin.
Where the key is absent (uᵀk = 0) the layer's output is unchanged exactly, up to rounding.
Works for every architecture (no bias is needed, unlike bake-steering mode add).

Example (refuse harmful requests only; v from a [[locate]] direction step):
    [[pass]]
    name = "conditional-steer"
    layer = 11
    direction = { by = "refusal-responses", layer = 12 }
    normalize = false
    coeff = 1.0
    positive = "harmful.json:instruction"
    negative = "harmless.json:instruction"
    covariance = "../../shared/data/text/wikitext2-test.raw"

Example (the coefficient searched under a first-token KL budget):
    [[pass]]
    name = "conditional-steer"
    layer = 11
    direction = "refusal_dir.safetensors:v"
    coeff = "auto"
    auto = { max_kl = 0.2, range = [0.0, 8.0], metric = "refusal", kl_prompts = "harmless.json:instruction", metric_prompts = "harmful.json:instruction", control_prompts = "harmless.json:instruction" }
    positive = "harmful.json:instruction"
    negative = "harmless.json:instruction"
    covariance = "identity""#;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Opts {
    layer: usize,
    direction: toml::Value,
    normalize: Option<bool>,
    coeff: toml::Value,
    positive: String,
    negative: String,
    #[serde(default = "d_limit")]
    limit: usize,
    #[serde(default)]
    skip: usize,
    #[serde(default = "d_true")]
    chat: bool,
    #[serde(default)]
    last: usize,
    covariance: String,
    #[serde(default = "d_cov_tokens")]
    cov_tokens: usize,
    #[serde(default = "d_cov_seq_len")]
    cov_seq_len: usize,
    #[serde(default = "d_quiet")]
    quiet: f64,
    #[serde(default = "d_batch")]
    batch: usize,
}

fn d_limit() -> usize {
    128
}
fn d_true() -> bool {
    true
}
fn d_cov_tokens() -> usize {
    100_000
}
fn d_cov_seq_len() -> usize {
    512
}
fn d_quiet() -> f64 {
    1.0
}
fn d_batch() -> usize {
    16
}

struct ConditionalSteer {
    layer: usize,
    /// c·v, [d_model].
    value: Vec<f32>,
    positive: Vec<Vec<u32>>,
    negative: Vec<Vec<u32>>,
    last: usize,
    covariance: Option<(PathBuf, usize, usize)>,
    quiet: f64,
    batch: usize,
    tok: Tok,
    progress: bool,
    /// Fitted on the first model the pass sees (the model it rewrites, or the source for its twin).
    fitted: OnceLock<Fitted>,
}

struct Fitted {
    update: RankOne,
    key: ConceptKey,
    keys: (usize, usize),
    cov_note: String,
    /// The key's firing on every 4th prompt when fitted without them (None with fewer than 4
    /// prompts in a set).
    held_out: Option<HeldOut>,
}

fn invalid(m: impl Into<String>) -> Error {
    Error::invalid(m)
}

fn build(t: &toml::Table, cx: &BuildCtx) -> Result<Box<dyn Pass>> {
    let m = cx.source;
    let o: Opts = options(t)?;
    let tok = cx.tok.ok_or_else(|| invalid("conditional-steer needs the model's tokenizer (tokenizer.json)"))?.clone();
    if o.layer >= m.cfg.num_layers {
        return Err(invalid(format!("`layer` = {} does not exist (the model has layers 0..{})", o.layer, m.cfg.num_layers - 1)));
    }
    let coeff = match &o.coeff {
        toml::Value::Float(c) => *c,
        toml::Value::Integer(c) => *c as f64,
        toml::Value::String(s) if s == "auto" => {
            return Err(invalid("`coeff = \"auto\"` is a search the compile driver runs before the pass is built (a pipeline's [[pass]] with an `auto` table)"))
        }
        other => return Err(invalid(format!("`coeff` must be a number or \"auto\", found {other}"))),
    };
    if !coeff.is_finite() {
        return Err(invalid("`coeff` must be finite"));
    }
    if !(o.quiet > 0.0 && o.quiet.is_finite()) {
        return Err(invalid(format!("`quiet` = {}: must be > 0 (it keeps the key silent on ordinary text)", o.quiet)));
    }
    let v = vector(&o.direction, o.normalize.unwrap_or(true), cx)?;
    let value: Vec<f32> = (v * coeff)?.to_vec1::<f32>()?;
    let load = |what: &str, spec: &str| -> Result<(Vec<String>, Vec<Vec<u32>>)> {
        let mut at = SetSpec::parse(spec);
        at.path = cx.path(&at.path.to_string_lossy());
        let mut set = TextSet::load(&at, 0).map_err(|e| invalid(format!("`{what}`: {e}")))?;
        set.texts = set.texts.into_iter().skip(o.skip).take(if o.limit == 0 { usize::MAX } else { o.limit }).collect();
        if set.texts.is_empty() {
            return Err(invalid(format!("`{what}` = \"{spec}\": no prompts left after skip = {}", o.skip)));
        }
        let ids = tok.prompts_ids(&set.texts, o.chat)?;
        Ok((set.texts, ids))
    };
    let (pos_texts, positive) = load("positive", &o.positive)?;
    let (neg_texts, negative) = load("negative", &o.negative)?;
    let last = match (o.last, o.chat) {
        (0, false) => 1,
        (0, true) => {
            let mut k = usize::MAX;
            for (text, ids) in pos_texts.iter().zip(&positive).chain(neg_texts.iter().zip(&negative)) {
                k = k.min(crate::locate::direction::post_instruction_len(&tok, text, ids).map_err(|e| invalid(format!("`last` = 0: {e} (give `last = N`)")))?);
            }
            k
        }
        (n, _) => n,
    };
    if let Some(short) = positive.iter().chain(&negative).find(|p| p.len() < last) {
        return Err(invalid(format!("`last` = {last}: a prompt has only {} tokens", short.len())));
    }
    let covariance = match o.covariance.as_str() {
        "identity" => None,
        p => {
            let path = cx.path(p);
            if !path.is_file() {
                return Err(Error::bad_file(&path, "covariance text: no such file (or write covariance = \"identity\")"));
            }
            if o.cov_tokens < 2 || o.cov_seq_len == 0 {
                return Err(invalid("cov_tokens must be ≥ 2 and cov_seq_len > 0"));
            }
            Some((path, o.cov_tokens, o.cov_seq_len))
        }
    };
    if o.batch == 0 {
        return Err(invalid("`batch` must be at least 1"));
    }
    Ok(Box::new(ConditionalSteer {
        layer: o.layer,
        value,
        positive,
        negative,
        last,
        covariance,
        quiet: o.quiet,
        batch: o.batch,
        tok,
        progress: cx.progress,
        fitted: OnceLock::new(),
    }))
}

/// Random models have no tokenizer, so the registry's generic twin test cannot build this pass;
/// `tests/conditional_steer.rs` holds its update and its twin to their properties instead.
fn example(_: &Model, _: u64) -> Option<toml::Table> {
    None
}

impl ConditionalSteer {
    fn fitted(&self, model: &Model) -> Result<&Fitted> {
        if let Some(f) = self.fitted.get() {
            return Ok(f);
        }
        let l = self.layer;
        let (cov, cov_note) = match &self.covariance {
            None => (Covariance::identity(l, model.blocks[l].down.w().dim(1)?), "C = I".to_string()),
            Some((path, tokens, seq_len)) => {
                let (mut c, note) = covariance::from_text(model, &self.tok, &[l], path, *tokens, *seq_len, self.progress)?;
                (c.remove(0), note)
            }
        };
        let pos = concept::keys(model, l, &self.positive, self.last, self.batch)?;
        let neg = concept::keys(model, l, &self.negative, self.last, self.batch)?;
        let held_out = if self.positive.len() >= 4 && self.negative.len() >= 4 {
            Some(concept::held_out(&pos, &neg, self.last, &cov, self.quiet)?)
        } else {
            None
        };
        let key = concept::fit(&pos, &neg, &cov, self.quiet)?;
        let update = RankOne { layer: l, r: self.value.clone(), u: key.u.clone() };
        let f = Fitted { update, key, keys: (pos.len(), neg.len()), cov_note, held_out };
        Ok(self.fitted.get_or_init(|| f))
    }
}

impl Pass for ConditionalSteer {
    fn run(&self, m: &mut Model) -> Result<String> {
        let f = self.fitted(m)?;
        f.update.apply(m)?;
        let norm = f.update.r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let (p, n) = (f.key.positive, f.key.negative);
        let mut line = format!(
            "wrote c·v (norm {norm:.4}) into L{}.mlp down_proj behind a concept key fitted on {} positive and {} negative tokens ({}): uᵀk {:.3} ± {:.3} positive, {:.3} ± {:.3} negative, rms {:.3} on the text",
            self.layer, f.keys.0, f.keys.1, f.cov_note, p.0, p.1, n.0, n.1, f.key.text_rms
        );
        if let Some(h) = f.held_out {
            line += &format!(
                "; fitted without every 4th prompt, on those: {:.3} ± {:.3} positive, {:.3} ± {:.3} negative",
                h.positive.0, h.positive.1, h.negative.0, h.negative.1
            );
        }
        Ok(line)
    }

    fn twin(&self, source: &Model) -> Result<Hooks> {
        rome::twin(std::slice::from_ref(&self.fitted(source)?.update))
    }
}
