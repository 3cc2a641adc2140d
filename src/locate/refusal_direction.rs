//! `refusal-direction`: the refusal direction chosen as Arditi et al. choose it
//! (andyrdt/refusal_direction, `pipeline/submodules/select_direction.py`): by what ablating it
//! does, not by how well it separates the prompts.
//!
//! **Candidates.** For every layer `l` (outside the last `exclude_last` fraction) and every
//! post-instruction position `p` of the chat template (the tokens after the instruction, e.g.
//! Qwen's `<|im_end|>\n<|im_start|>assistant\n`; `p = -1` is the last), the difference of the
//! harmful and the harmless train prompts' mean `blocks.l.hook_resid_pre` at `p`, unnormalised.
//!
//! **Refusal score** (generation-free, as the paper defines it): with `P` the next-token
//! probability of the refusal tokens (the first tokens of `--refusal-tokens`, default "I" and
//! "As") after the prompt, `ln(P + ε) − ln(1 − P + ε)`, `ε = 1e-8`; averaged over prompts.
//!
//! **Scores**, each with a runtime twin on the held-out prompts:
//! - *bypass*: the harmful prompts' refusal score with `r̂` projected out of every write into the
//!   residual stream (embedding, every attention and MLP output: the twin of `bake-steering`'s
//!   ablate mode);
//! - *induce*: the harmless prompts' refusal score with `r` added to `resid_pre` at `l`;
//! - *kl*: the mean first-token KL(source ‖ ablated) on the harmless prompts.
//!
//! **Choice.** Candidates with `kl > max_kl` or `induce ≤ 0` are filtered (the paper's
//! thresholds: 0.1 and 0); the lowest bypass wins. When none passes (the findings say so:
//! `summary.passed_filters = false`), the lowest bypass within the KL budget wins, and when no
//! candidate is within it, the lowest KL: on Qwen2.5-Coder-0.5B the lowest bypass of all is a
//! layer-1 direction whose ablation costs KL 1.1.
//!
//! **Screening** (`--screen N`, the one departure, off by default): bypass is measured for every
//! candidate, kl and induce only for the N lowest-bypass ones — a third of the forwards.
//!
//! The findings hold one `direction` score per layer (its best candidate; score = the baseline
//! harmful refusal score minus the bypass, higher = a stronger direction), every candidate's
//! numbers in `extra.candidates`, and the vectors file one tensor per layer (that layer's best
//! position), so `direction = { by = ID }` and `{ by = ID, layer = L }` work as with `direction`.

use std::collections::BTreeMap;

use candle_core::{DType, Device, IndexOp, Tensor};
use serde::Serialize;
use serde_json::json;

use crate::data::{SetSpec, TextSet};
use crate::error::{Error, Result};
use crate::ir::{Component, Findings, Source};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::score::last_logprobs;
use crate::runtime::{Batch, HookPoint, Hooks, Op};

use super::direction::Vectors;

pub const METHOD: &str = "refusal-direction";

/// The refusal direction chosen by ablation, as Arditi et al. choose it.
///
/// A candidate per layer × post-instruction position (difference of means), each scored on
/// held-out prompts by bypass (harmful refusal score with it ablated), induce (harmless refusal
/// score with it added) and first-token KL; the lowest bypass among those with KL ≤ --max-kl and
/// induce > 0 wins. Writes findings and the vectors (--vectors) that bake-steering's ablate mode
/// takes.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Spec {
    /// Harmful train prompts, FILE[:FIELD] (e.g. harmful_train.json:instruction).
    #[arg(long)]
    pub harmful: SetSpec,
    /// Harmless train prompts (e.g. harmless_train.json:instruction).
    #[arg(long)]
    pub harmless: SetSpec,
    /// Held-out harmful prompts for the bypass score (e.g. harmful_val.json:instruction).
    /// Default: the --val-limit prompts of --harmful after its first --limit.
    #[arg(long)]
    pub val_harmful: Option<SetSpec>,
    /// Held-out harmless prompts for the induce and KL scores (e.g.
    /// harmless_val.json:instruction). Default: the --val-limit prompts of --harmless after its
    /// first --limit.
    #[arg(long)]
    pub val_harmless: Option<SetSpec>,
    /// Use the first N prompts of each train set (the paper: 128).
    #[arg(long, default_value_t = 128)]
    pub limit: usize,
    /// Use the first N prompts of each held-out set (the paper: 32).
    #[arg(long, default_value_t = 32)]
    pub val_limit: usize,
    /// Texts whose first tokens are the refusal tokens, comma-separated (the paper's Qwen and
    /// Llama-3 choice: "I" and "As").
    #[arg(long, value_delimiter = ',', default_values_t = ["I".to_string(), "As".to_string()])]
    pub refusal_tokens: Vec<String>,
    /// Layers to consider, comma-separated (default: all outside the last --exclude-last).
    #[arg(long, value_delimiter = ',')]
    pub layers: Vec<usize>,
    /// Fraction of the last layers that are not candidates (the paper: 0.2).
    #[arg(long, default_value_t = 0.2)]
    pub exclude_last: f64,
    /// Candidates whose ablation moves the harmless first-token distribution by more than this
    /// mean KL (nats) are filtered (the paper: 0.1).
    #[arg(long, default_value_t = 0.1)]
    pub max_kl: f64,
    /// Score kl and induce for only the N lowest-bypass candidates (0 = every candidate, as the
    /// paper does).
    #[arg(long, default_value_t = 0)]
    pub screen: usize,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
}

/// One candidate's numbers (`None`: not measured, screened out).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Candidate {
    pub layer: usize,
    /// Offset from the end of the prompt: -1 is the last post-instruction token.
    pub position: i64,
    pub bypass: f64,
    pub induce: Option<f64>,
    pub kl: Option<f64>,
    pub norm: f64,
}

impl Candidate {
    fn passes(&self, max_kl: f64) -> bool {
        matches!((self.kl, self.induce), (Some(k), Some(i)) if k <= max_kl && i > 0.0)
    }
}

/// `ln(P + ε) − ln(1 − P + ε)` with `P` the probability of `tokens` in a log-probability row.
pub fn refusal_score(logp: &[f32], tokens: &[u32]) -> f64 {
    const EPS: f64 = 1e-8;
    let p: f64 = tokens.iter().map(|&t| (logp[t as usize] as f64).exp()).sum::<f64>().min(1.0);
    (p + EPS).ln() - (1.0 - p + EPS).ln()
}

/// The mean over prompts of `resid_pre` at each of the last `k` positions, in f64:
/// `[layer of layers][j]`, `j = 0` the last token (position offset `-(j + 1)`).
fn position_means(model: &Model, prompts: &[Vec<u32>], layers: &[usize], k: usize, batch: usize, tick: &mut impl FnMut(usize)) -> Result<Vec<Vec<Vec<f64>>>> {
    let d = model.cfg.hidden_size;
    let mut sum = vec![vec![vec![0f64; d]; k]; layers.len()];
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    for chunk in crate::runtime::batch::length_batches(&lens, batch) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let mut hooks = Hooks::new();
        for &l in layers {
            hooks.capture(HookPoint::ResidPre(l));
        }
        model.forward(&Batch::right_padded(&seqs, 0), None, &mut hooks, Fwd { last_only: true, ..Fwd::default() })?;
        for (li, &l) in layers.iter().enumerate() {
            let a = &hooks.captured[&HookPoint::ResidPre(l)];
            for (r, &i) in chunk.iter().enumerate() {
                let rows = a.i((r, lens[i] - k..lens[i]))?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for (j, row) in rows.iter().rev().enumerate() {
                    sum[li][j].iter_mut().zip(row).for_each(|(s, &x)| *s += x as f64);
                }
            }
        }
        tick(chunk.len());
    }
    let n = prompts.len() as f64;
    sum.iter_mut().flatten().flatten().for_each(|s| *s /= n);
    Ok(sum)
}

/// What [`select`] needs besides the model.
pub struct Prompts<'a> {
    pub harmful: &'a [Vec<u32>],
    pub harmless: &'a [Vec<u32>],
    pub val_harmful: &'a [Vec<u32>],
    pub val_harmless: &'a [Vec<u32>],
    /// How many tokens at the end of every prompt are the template's post-instruction tokens.
    pub post_instruction: usize,
    pub refusal_tokens: &'a [u32],
}

pub struct Options {
    pub layers: Vec<usize>,
    pub max_kl: f64,
    pub screen: usize,
    pub batch: usize,
}

/// The outcome: every candidate (layer-major, last position first), its vector, the chosen one.
pub struct Selection {
    pub candidates: Vec<Candidate>,
    pub vectors: Vec<Vec<f32>>,
    pub best: usize,
    pub passed_filters: bool,
    pub baseline_harmful: f64,
    pub baseline_harmless: f64,
}

impl Selection {
    /// Per layer, the index of its best candidate (the chosen rule, restricted to the layer).
    pub fn per_layer(&self, max_kl: f64) -> Vec<usize> {
        let mut out: Vec<usize> = vec![];
        for (i, c) in self.candidates.iter().enumerate() {
            match out.last() {
                Some(&j) if self.candidates[j].layer == c.layer => {
                    if better(c, &self.candidates[j], max_kl) {
                        *out.last_mut().expect("non-empty") = i;
                    }
                }
                _ => out.push(i),
            }
        }
        out
    }
}

/// `a` beats `b`: passing both filters first, then the KL filter alone; among equals the lower
/// bypass — except when neither is within the KL budget: then the lower measured KL (a
/// direction whose ablation breaks the model is no answer, however low its bypass).
fn better(a: &Candidate, b: &Candidate, max_kl: f64) -> bool {
    let rank = |c: &Candidate| 2 * u8::from(c.passes(max_kl)) + u8::from(c.kl.is_some_and(|k| k <= max_kl));
    let (ra, rb) = (rank(a), rank(b));
    if ra != rb {
        return ra > rb;
    }
    if ra == 0 {
        match (a.kl, b.kl) {
            (Some(x), Some(y)) if x != y => return x < y,
            (Some(_), None) => return true,
            (None, Some(_)) => return false,
            _ => {}
        }
    }
    a.bypass < b.bypass
}

/// Mean refusal score of `prompts` under `hooks`.
pub fn mean_refusal(model: &Model, prompts: &[Vec<u32>], hooks: &Hooks, tokens: &[u32], batch: usize) -> Result<f64> {
    let mut total = 0.0;
    last_logprobs(model, prompts, hooks, batch, |_, lp| total += refusal_score(lp, tokens))?;
    Ok(total / prompts.len() as f64)
}

/// Score every candidate and choose (see the module doc). `tick(done, total)` counts prompts
/// forwarded.
pub fn select(model: &Model, p: &Prompts, o: &Options, mut tick: impl FnMut(usize, usize)) -> Result<Selection> {
    let (k, n_layers) = (p.post_instruction, model.blocks.len());
    let (nh, nhl) = (p.val_harmful.len(), p.val_harmless.len());
    let n_candidates = o.layers.len() * k;
    let scored = if o.screen == 0 { n_candidates } else { o.screen.min(n_candidates) };
    let total = p.harmful.len() + p.harmless.len() + nh + nhl + n_candidates * nh + scored * 2 * nhl;
    let mut done = 0;
    let mut step = |n: usize| {
        done += n;
        tick(done.min(total), total);
    };
    step(0);
    let harmful = position_means(model, p.harmful, &o.layers, k, o.batch, &mut step)?;
    let harmless = position_means(model, p.harmless, &o.layers, k, o.batch, &mut step)?;
    let baseline_harmful = mean_refusal(model, p.val_harmful, &Hooks::new(), p.refusal_tokens, o.batch)?;
    step(nh);
    let mut base_lp: Vec<Vec<f32>> = vec![vec![]; nhl];
    let mut baseline_harmless = 0.0;
    last_logprobs(model, p.val_harmless, &Hooks::new(), o.batch, |i, lp| {
        baseline_harmless += refusal_score(lp, p.refusal_tokens);
        base_lp[i] = lp.to_vec();
    })?;
    baseline_harmless /= nhl as f64;
    step(nhl);
    let (mut candidates, mut vectors) = (vec![], vec![]);
    for (li, &l) in o.layers.iter().enumerate() {
        for j in 0..k {
            let v: Vec<f32> = harmful[li][j].iter().zip(&harmless[li][j]).map(|(a, b)| (a - b) as f32).collect();
            let norm = v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
            if !norm.is_finite() {
                return Err(Error::invalid(format!("layer {l}, position -{}: the activations are not finite", j + 1)));
            }
            if norm == 0.0 {
                // The template's own tokens before any mixing (layer 0's resid_pre is their
                // embedding): both classes alike, no direction.
                continue;
            }
            let r = Tensor::from_vec(v.clone(), v.len(), &Device::Cpu)?;
            let mut ablate = Hooks::new();
            ablate.project_out_everywhere(&r, n_layers);
            let bypass = mean_refusal(model, p.val_harmful, &ablate, p.refusal_tokens, o.batch)?;
            step(nh);
            candidates.push(Candidate { layer: l, position: -(j as i64 + 1), bypass, induce: None, kl: None, norm });
            vectors.push(v);
        }
    }
    let mut order: Vec<usize> = (0..candidates.len()).collect();
    order.sort_by(|&a, &b| candidates[a].bypass.total_cmp(&candidates[b].bypass));
    for &i in order.iter().take(scored) {
        let c = &candidates[i];
        let r = Tensor::from_vec(vectors[i].clone(), vectors[i].len(), &Device::Cpu)?;
        let mut ablate = Hooks::new();
        ablate.project_out_everywhere(&r, n_layers);
        let mut kl = 0.0;
        last_logprobs(model, p.val_harmless, &ablate, o.batch, |i, lp| kl += crate::runtime::score::kl(&base_lp[i], lp))?;
        step(nhl);
        let mut add = Hooks::new();
        add.intervene(HookPoint::ResidPre(c.layer), Op::Add(r));
        let induce = mean_refusal(model, p.val_harmless, &add, p.refusal_tokens, o.batch)?;
        step(nhl);
        let c = &mut candidates[i];
        c.kl = Some(kl / nhl as f64);
        c.induce = Some(induce);
    }
    step(total);
    let best = (0..candidates.len())
        .reduce(|b, i| if better(&candidates[i], &candidates[b], o.max_kl) { i } else { b })
        .ok_or_else(|| Error::invalid("no candidate: the harmful and harmless prompts' activations are equal at every layer and position"))?;
    let passed_filters = candidates[best].passes(o.max_kl);
    Ok(Selection { candidates, vectors, best, passed_filters, baseline_harmful, baseline_harmless })
}

/// The prompts' chat-template ids and the number of post-instruction tokens they all end with.
fn chat_ids(tok: &crate::tokenizer::Tok, set: &TextSet, what: &str) -> Result<(Vec<Vec<u32>>, usize)> {
    let ids = tok.prompts_ids(&set.texts, true)?;
    let mut k = usize::MAX;
    for (i, (text, ids)) in set.texts.iter().zip(&ids).enumerate() {
        let n = super::direction::post_instruction_len(tok, text, ids).map_err(|e| Error::invalid(format!("--{what} prompt {i}: {e}")))?;
        k = k.min(n);
    }
    Ok((ids, k))
}

impl Spec {
    fn sets(&self) -> Result<[TextSet; 4]> {
        if self.batch_size == 0 {
            return Err(Error::invalid("--batch-size must be at least 1"));
        }
        if !(0.0..1.0).contains(&self.exclude_last) {
            return Err(Error::invalid(format!("--exclude-last must be in [0, 1), got {}", self.exclude_last)));
        }
        if !(self.max_kl >= 0.0) {
            return Err(Error::invalid(format!("--max-kl must be a number ≥ 0, got {}", self.max_kl)));
        }
        if self.refusal_tokens.is_empty() {
            return Err(Error::invalid("--refusal-tokens: give at least one text"));
        }
        if self.limit == 0 || self.val_limit == 0 {
            return Err(Error::invalid("--limit and --val-limit must be at least 1"));
        }
        // A train set and its held-out set: the given one, or the train file's next prompts.
        // An empty set is the loader's error (it names the file).
        let pair = |train: &SetSpec, val: Option<&SetSpec>, flag: &str| -> Result<(TextSet, TextSet)> {
            if let Some(v) = val {
                return Ok((TextSet::load(train, self.limit)?, TextSet::load(v, self.val_limit)?));
            }
            let mut all = TextSet::load(train, self.limit + self.val_limit)?;
            if all.texts.len() <= self.limit {
                return Err(Error::invalid(format!(
                    "--{flag} {train} has {} prompts: none left after the first --limit {} to hold out (give --val-{flag})",
                    all.texts.len(),
                    self.limit
                )));
            }
            let mut val = all.clone();
            val.texts = all.texts.split_off(self.limit);
            Ok((all, val))
        };
        let (h, vh) = pair(&self.harmful, self.val_harmful.as_ref(), "harmful")?;
        let (hl, vhl) = pair(&self.harmless, self.val_harmless.as_ref(), "harmless")?;
        Ok([h, hl, vh, vhl])
    }
}

impl super::Method for Spec {
    fn check(&self) -> Result<()> {
        self.sets().map(|_| ())
    }

    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        let sets = self.sets()?;
        let (model, tok) = (cx.model(), cx.tok()?);
        let n = model.blocks.len();
        let cut = ((n as f64) * (1.0 - self.exclude_last)).floor() as usize;
        let layers: Vec<usize> = super::layer_list(&self.layers, n)?.into_iter().filter(|&l| l < cut.max(1)).collect();
        if layers.is_empty() {
            return Err(Error::invalid(format!("--layers: every layer given is in the last {} of the model (layers {cut}..{n}); lower --exclude-last", self.exclude_last)));
        }
        let refusal_tokens: Vec<u32> = self.refusal_tokens.iter().map(|t| super::first_token(tok, "--refusal-tokens", t)).collect::<Result<_>>()?;
        let names = ["harmful", "harmless", "val-harmful", "val-harmless"];
        let mut ids = vec![];
        let mut k = usize::MAX;
        for (set, name) in sets.iter().zip(names) {
            let (i, n) = chat_ids(tok, set, name)?;
            ids.push(i);
            k = k.min(n);
        }
        let prompts = Prompts { harmful: &ids[0], harmless: &ids[1], val_harmful: &ids[2], val_harmless: &ids[3], post_instruction: k, refusal_tokens: &refusal_tokens };
        let opts = Options { layers: layers.clone(), max_kl: self.max_kl, screen: self.screen, batch: self.batch_size };
        let bar = super::bar("forwards", cx.progress);
        let s = select(model, &prompts, &opts, super::tick(&bar))?;
        bar.finish_and_clear();

        let options = json!({
            "layers": layers, "post_instruction_tokens": k, "refusal_tokens": self.refusal_tokens, "refusal_token_ids": refusal_tokens,
            "limit": self.limit, "val_limit": self.val_limit, "exclude_last": self.exclude_last, "max_kl": self.max_kl, "screen": self.screen,
            "n_harmful": ids[0].len(), "n_harmless": ids[1].len(), "n_val_harmful": ids[2].len(), "n_val_harmless": ids[3].len(),
        });
        let data = sets.iter().map(|s| Source { file: Some(s.spec.path.clone()), sha256: s.sha256.clone() }).collect();
        let meaning = "drop of the held-out harmful prompts' refusal score (log-odds of the refusal tokens after the prompt) when the layer's best candidate is ablated everywhere; higher = a stronger refusal direction";
        let mut f = Findings::new(METHOD, meaning, options, cx.source.clone(), data);
        let per_layer = s.per_layer(self.max_kl);
        let mut tensors = vec![];
        for &i in &per_layer {
            let c = &s.candidates[i];
            let tensor = HookPoint::ResidPre(c.layer).to_string();
            let score = f.push(Component::Direction(c.layer), s.baseline_harmful - c.bypass);
            let all: Vec<&Candidate> = s.candidates.iter().filter(|x| x.layer == c.layer).collect();
            score.extra = BTreeMap::from([
                ("layer".to_string(), json!(c.layer)),
                ("tensor".to_string(), json!(tensor)),
                ("position".to_string(), json!(c.position)),
                ("bypass".to_string(), json!(c.bypass)),
                ("induce".to_string(), json!(c.induce)),
                ("kl".to_string(), json!(c.kl)),
                ("norm".to_string(), json!(c.norm)),
                ("passes".to_string(), json!(c.passes(self.max_kl))),
                ("candidates".to_string(), json!(all)),
            ]);
            tensors.push((tensor, s.vectors[i].clone()));
        }
        let b = &s.candidates[s.best];
        let best_tensor = HookPoint::ResidPre(b.layer).to_string();
        for (key, v) in [
            ("best_layer", json!(b.layer)),
            ("best_position", json!(b.position)),
            ("best_component", json!(Component::Direction(b.layer).to_string())),
            ("best_tensor", json!(best_tensor)),
            ("bypass", json!(b.bypass)),
            ("induce", json!(b.induce)),
            ("kl", json!(b.kl)),
            ("passed_filters", json!(s.passed_filters)),
            ("baseline_harmful", json!(s.baseline_harmful)),
            ("baseline_harmless", json!(s.baseline_harmless)),
        ] {
            f.summary.insert(key.into(), v);
        }
        let metadata: BTreeMap<String, String> = [
            ("format", "mechc-directions/1".to_string()),
            ("method", "mean-diff".to_string()),
            ("site", "resid-pre".to_string()),
            ("positions", "post-instruction (per layer: its best position, in the findings)".to_string()),
            ("model_sha256", cx.source.sha256.clone()),
            ("best_tensor", best_tensor),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut out = super::Located::new(f);
        out.vectors = Some(Vectors { tensors, metadata });
        out.report = table(&s, &per_layer, self.max_kl);
        Ok(out)
    }
}

/// Per layer its best candidate; the chosen one marked, filtered ones flagged.
pub fn table(s: &Selection, per_layer: &[usize], max_kl: f64) -> String {
    let num = |x: Option<f64>| x.map_or("-".to_string(), |x| format!("{x:.3}"));
    let mut t = format!(
        "refusal score without intervention: harmful {:.3}, harmless {:.3}\n{:>5} {:>4} {:>9} {:>9} {:>9}  \n",
        s.baseline_harmful, s.baseline_harmless, "layer", "pos", "bypass", "induce", "kl"
    );
    for &i in per_layer {
        let c = &s.candidates[i];
        let mark = if i == s.best { "  <- chosen" } else if c.passes(max_kl) { "" } else { "  (filtered)" };
        t.push_str(&format!("{:>5} {:>4} {:>9.3} {:>9} {:>9}{mark}\n", c.layer, c.position, c.bypass, num(c.induce), num(c.kl)));
    }
    if !s.passed_filters {
        t.push_str(&format!("no candidate has KL ≤ {max_kl} and induce > 0: chosen by KL within the budget, else the lowest KL\n"));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::{random_model, RandomSpec};

    #[test]
    fn refusal_score_is_the_log_odds_of_the_refusal_tokens() {
        let lp: Vec<f32> = [0.5f32, 0.25, 0.125, 0.125].iter().map(|p| p.ln()).collect();
        assert!((refusal_score(&lp, &[0]) - 0.0).abs() < 1e-6);
        assert!((refusal_score(&lp, &[1, 2]) - (0.375f64 / 0.625).ln()).abs() < 1e-6);
        // Certain refusal and certain compliance stay finite (ε).
        let sure: Vec<f32> = vec![0.0, f32::NEG_INFINITY];
        assert!((refusal_score(&sure, &[0]) - (1.0f64 / 1e-8).ln()).abs() < 1e-3);
        assert!((refusal_score(&sure, &[1]) + (1.0f64 / 1e-8).ln()).abs() < 1e-3);
    }

    fn cand(layer: usize, bypass: f64, induce: f64, kl: f64) -> Candidate {
        Candidate { layer, position: -1, bypass, induce: Some(induce), kl: Some(kl), norm: 1.0 }
    }

    #[test]
    fn the_choice_filters_then_takes_the_lowest_bypass() {
        let cs = vec![cand(0, -5.0, 1.0, 0.5), cand(1, -3.0, -1.0, 0.01), cand(2, -2.0, 2.0, 0.05), cand(2, -1.0, 2.0, 0.01)];
        let s = Selection { candidates: cs.clone(), vectors: vec![vec![]; 4], best: 0, passed_filters: true, baseline_harmful: 1.0, baseline_harmless: -1.0 };
        // Layer 0 fails KL, layer 1 fails induce: per layer they stay (their only candidates),
        // the layer-2 pair keeps its lower bypass.
        assert_eq!(s.per_layer(0.1), vec![0, 1, 2]);
        let best = (0..cs.len()).reduce(|b, i| if better(&cs[i], &cs[b], 0.1) { i } else { b }).unwrap();
        assert_eq!(best, 2);
        // Without a KL filter, the lowest bypass among those inducing refusal.
        let best = (0..cs.len()).reduce(|b, i| if better(&cs[i], &cs[b], 10.0) { i } else { b }).unwrap();
        assert_eq!(best, 0);
        // Nothing within the KL budget: the lowest KL (ties: the lower bypass), not the lowest bypass.
        let best = (0..cs.len()).reduce(|b, i| if better(&cs[i], &cs[b], 0.001) { i } else { b }).unwrap();
        assert_eq!(best, 1);
        // Within KL beats over KL even when it fails induce; passing both beats both.
        assert!(better(&cs[1], &cs[0], 0.1) && better(&cs[3], &cs[1], 0.1));
        // Screened-out candidates (no kl/induce) never pass.
        assert!(!Candidate { induce: None, kl: None, ..cand(0, -9.0, 0.0, 0.0) }.passes(1.0));
    }

    /// On a random model with a planted class difference the selection runs end to end: every
    /// candidate scored, the vectors the means' difference, the baseline unchanged by scoring.
    #[test]
    fn select_scores_every_candidate() {
        let m = random_model(RandomSpec::from_seed(5).config(), 5).unwrap();
        let v = m.cfg.vocab_size as u32;
        let mk = |base: u32| -> Vec<Vec<u32>> { (0..4).map(|i| vec![(base + i) % v, (base + 2 * i + 1) % v, 1, 2, 3]).collect() };
        let (h, hl) = (mk(5), mk(11));
        let p = Prompts { harmful: &h, harmless: &hl, val_harmful: &h, val_harmless: &hl, post_instruction: 3, refusal_tokens: &[0, 1] };
        let n = m.blocks.len();
        let o = Options { layers: (0..n).collect(), max_kl: 10.0, screen: 0, batch: 3 };
        let mut last = (0, 0);
        let s = select(&m, &p, &o, |a, b| last = (a, b)).unwrap();
        assert_eq!(last.0, last.1);
        // Layer 0's resid_pre at the shared last tokens is their embedding: no direction there.
        assert_eq!(s.candidates.len(), (n - 1) * 3);
        assert!(s.candidates.iter().all(|c| c.layer > 0 && c.norm > 0.0));
        assert!(s.candidates.iter().all(|c| c.kl.is_some() && c.induce.is_some() && c.kl.unwrap() >= 0.0));
        let base = mean_refusal(&m, &h, &Hooks::new(), &[0, 1], 3).unwrap();
        assert!((s.baseline_harmful - base).abs() < 1e-9);
        // Screening measures kl/induce for the lowest-bypass candidates only.
        let s2 = select(&m, &p, &Options { screen: 2, ..o }, |_, _| {}).unwrap();
        assert_eq!(s2.candidates.iter().filter(|c| c.kl.is_some()).count(), 2);
        assert_eq!(s2.candidates.iter().map(|c| c.bypass).collect::<Vec<_>>(), s.candidates.iter().map(|c| c.bypass).collect::<Vec<_>>());
    }
}
