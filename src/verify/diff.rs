//! Behaviour diff of two models that share a tokenizer: next-token distributions compared
//! position by position (KL(A‖B) in nats, top-1 agreement) over prompts and over text, the
//! perplexity of each on the text, and the prompts whose behaviour moved most.
//!
//! Only outputs are compared, never weights, so B may have other shapes than A (pruned heads,
//! neurons or layers). KL at the last prompt position is the "first generated token" KL.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, IndexOp, Tensor, D};
use serde::Serialize;

use super::perplexity::windows;
use crate::runtime::batch::length_batches;
use crate::error::{Error, Result};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::generate::{generate_batch, GenOpts};
use crate::runtime::{Batch, Hooks};

/// What `diff` knows about one side.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    pub path: PathBuf,
    pub architecture: String,
    pub layers: usize,
    pub parameters: usize,
    /// Bytes of the weight files as given (.gguf, or the directory's safetensors).
    pub file_bytes: u64,
}

impl Side {
    pub fn of(path: &Path, model: &Model) -> Result<Side> {
        Ok(Side {
            path: path.to_path_buf(),
            architecture: model.cfg.arch.name().to_string(),
            layers: model.blocks.len(),
            parameters: model.param_count(),
            file_bytes: weight_bytes(path)?,
        })
    }
}

/// Size of the weights as given: the .gguf file, or the directory's safetensors files.
fn weight_bytes(path: &Path) -> Result<u64> {
    if crate::io::is_gguf(path) {
        return Ok(std::fs::metadata(path).map_err(|e| Error::io(path, e))?.len());
    }
    let mut n = 0;
    for e in std::fs::read_dir(path).map_err(|e| Error::io(path, e))? {
        let e = e.map_err(|e| Error::io(path, e))?;
        if e.path().extension().is_some_and(|x| x == "safetensors") {
            n += e.metadata().map_err(|err| Error::io(e.path(), err))?.len();
        }
    }
    Ok(n)
}

#[derive(Debug, Clone)]
pub struct DiffOpts {
    /// Sequences per forward.
    pub batch: usize,
    /// How many of the most-moved prompts to report with greedy continuations.
    pub top_moved: usize,
    /// Length of those continuations.
    pub gen_tokens: usize,
    /// Generation stops at these tokens.
    pub stop: Vec<u32>,
}

impl Default for DiffOpts {
    fn default() -> Self {
        DiffOpts { batch: 8, top_moved: 5, gen_tokens: 24, stop: vec![] }
    }
}

/// Running KL / agreement statistics over positions.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PosStats {
    pub positions: usize,
    pub kl_mean: f64,
    pub kl_max: f64,
    pub top1_agreement: f64,
    #[serde(skip)]
    kl_sum: f64,
    #[serde(skip)]
    agree: usize,
}

impl PosStats {
    fn push(&mut self, kl: f64, agree: bool) {
        self.positions += 1;
        self.kl_sum += kl;
        self.kl_max = self.kl_max.max(kl);
        self.agree += agree as usize;
        self.kl_mean = self.kl_sum / self.positions as f64;
        self.top1_agreement = self.agree as f64 / self.positions as f64;
    }
}

/// One prompt's numbers.
#[derive(Debug, Clone, Serialize)]
pub struct PromptDiff {
    pub index: usize,
    pub tokens: usize,
    /// KL(A‖B) of the first generated token's distribution.
    pub kl_first: f64,
    /// Mean KL(A‖B) over the prompt's positions.
    pub kl_mean: f64,
    pub top1_a: u32,
    pub top1_b: u32,
}

/// A prompt whose behaviour moved most, with both greedy continuations.
#[derive(Debug, Clone, Serialize)]
pub struct Moved {
    pub index: usize,
    pub prompt: String,
    pub kl_first: f64,
    pub continuation_a: String,
    pub continuation_b: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct PromptsDiff {
    pub prompts: usize,
    pub tokens: usize,
    /// Every position of every prompt.
    pub all: PosStats,
    /// The last position of each prompt (the first generated token).
    pub first: PosStats,
    pub per_prompt: Vec<PromptDiff>,
    pub moved: Vec<Moved>,
    pub timing: Timing,
}

#[derive(Debug, Clone, Serialize)]
pub struct TextDiff {
    pub tokens: usize,
    pub seq_len: usize,
    pub windows: usize,
    pub scored_tokens: usize,
    pub perplexity_a: f64,
    pub perplexity_b: f64,
    pub perplexity_ratio: f64,
    pub all: PosStats,
    pub timing: Timing,
}

/// Where the time went: each model's forwards, and the comparison arithmetic.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timing {
    pub forward_a_s: f64,
    pub forward_b_s: f64,
    pub compare_s: f64,
    pub total_s: f64,
    /// Tokens through both models and the comparison, per second.
    pub tokens_per_s: f64,
    /// Tokens through model A's forward alone, per second (the plain forward's throughput).
    pub forward_a_tokens_per_s: f64,
}

impl Timing {
    fn finish(&mut self, start: Instant, tokens: usize) {
        self.total_s = start.elapsed().as_secs_f64();
        self.tokens_per_s = tokens as f64 / self.total_s.max(1e-9);
        self.forward_a_tokens_per_s = tokens as f64 / self.forward_a_s.max(1e-9);
    }
}

fn check_pair(a: &Model, b: &Model) -> Result<()> {
    if a.cfg.vocab_size != b.cfg.vocab_size {
        return Err(Error::invalid(format!(
            "the models' vocabularies differ ({} vs {} tokens): diff compares next-token distributions of one tokenizer",
            a.cfg.vocab_size, b.cfg.vocab_size
        )));
    }
    Ok(())
}

/// Log-softmax of both models on one batch, and the time each forward took.
fn both_logprobs(a: &Model, b: &Model, batch: &Batch, t: &mut Timing) -> Result<(Tensor, Tensor)> {
    let run = |m: &Model| -> Result<(Tensor, f64)> {
        let s = Instant::now();
        let logits = m.forward(batch, None, &mut Hooks::new(), Fwd::default())?;
        Ok((candle_nn::ops::log_softmax(&logits, D::Minus1)?, s.elapsed().as_secs_f64()))
    };
    let (la, ta) = run(a)?;
    let (lb, tb) = run(b)?;
    t.forward_a_s += ta;
    t.forward_b_s += tb;
    Ok((la, lb))
}

/// KL(A‖B) [b, t] and top-1 of each [b, t] from log-probabilities [b, t, vocab].
fn kl_top1(la: &Tensor, lb: &Tensor) -> Result<(Vec<Vec<f32>>, Vec<Vec<u32>>, Vec<Vec<u32>>)> {
    // exp(-inf) · (-inf − x) would be NaN; log_softmax of finite logits stays finite.
    let kl = (la.exp()? * (la - lb)?)?.sum(D::Minus1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let ta = la.argmax(D::Minus1)?.to_vec2::<u32>()?;
    let tb = lb.argmax(D::Minus1)?.to_vec2::<u32>()?;
    Ok((kl, ta, tb))
}

/// Compare A and B on tokenised prompts. `texts` (the prompts as given) label the moved ones;
/// `decode` turns continuations into text.
pub fn diff_prompts(
    a: &Model,
    b: &Model,
    prompts: &[Vec<u32>],
    texts: &[String],
    opts: &DiffOpts,
    decode: impl Fn(&[u32]) -> Result<String>,
    mut progress: impl FnMut(usize, usize),
) -> Result<PromptsDiff> {
    check_pair(a, b)?;
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::invalid(format!("prompt {i} has no tokens")));
    }
    let start = Instant::now();
    let mut timing = Timing::default();
    let (mut all, mut first) = (PosStats::default(), PosStats::default());
    let mut per_prompt: Vec<Option<PromptDiff>> = vec![None; prompts.len()];
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    let mut done = 0;
    for chunk in length_batches(&lens, opts.batch) {
        progress(done, prompts.len());
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let (la, lb) = both_logprobs(a, b, &Batch::right_padded(&seqs, 0), &mut timing)?;
        let s = Instant::now();
        let (kl, ta, tb) = kl_top1(&la, &lb)?;
        for (r, &i) in chunk.iter().enumerate() {
            let n = lens[i];
            let mut sum = 0f64;
            for j in 0..n {
                let k = kl[r][j].max(0.0) as f64;
                sum += k;
                all.push(k, ta[r][j] == tb[r][j]);
            }
            let k_first = kl[r][n - 1].max(0.0) as f64;
            first.push(k_first, ta[r][n - 1] == tb[r][n - 1]);
            per_prompt[i] = Some(PromptDiff {
                index: i,
                tokens: n,
                kl_first: k_first,
                kl_mean: sum / n as f64,
                top1_a: ta[r][n - 1],
                top1_b: tb[r][n - 1],
            });
        }
        timing.compare_s += s.elapsed().as_secs_f64();
        done += chunk.len();
    }
    progress(prompts.len(), prompts.len());
    let per_prompt: Vec<PromptDiff> = per_prompt.into_iter().map(|p| p.expect("every prompt is in one batch")).collect();
    let tokens = lens.iter().sum();
    timing.finish(start, tokens);

    // The most-moved prompts (by first-token KL; ties keep input order), with continuations.
    // Prompts whose next-token distribution did not change at all are not "moved".
    let mut order: Vec<usize> = (0..prompts.len()).filter(|&i| per_prompt[i].kl_first > 0.0).collect();
    order.sort_by(|&x, &y| per_prompt[y].kl_first.total_cmp(&per_prompt[x].kl_first).then(x.cmp(&y)));
    order.truncate(opts.top_moved);
    let mut moved = vec![];
    if !order.is_empty() && opts.gen_tokens > 0 {
        let sel: Vec<Vec<u32>> = order.iter().map(|&i| prompts[i].clone()).collect();
        let g = GenOpts { max_tokens: opts.gen_tokens, stop: opts.stop.clone(), ..GenOpts::default() };
        let ca = generate_batch(a, &sel, &g, &mut Hooks::new(), 0)?;
        let cb = generate_batch(b, &sel, &g, &mut Hooks::new(), 0)?;
        for (k, &i) in order.iter().enumerate() {
            moved.push(Moved {
                index: i,
                prompt: texts.get(i).cloned().unwrap_or_default(),
                kl_first: per_prompt[i].kl_first,
                continuation_a: decode(&ca[k])?,
                continuation_b: decode(&cb[k])?,
            });
        }
    }
    Ok(PromptsDiff { prompts: prompts.len(), tokens, all, first, per_prompt, moved, timing })
}

/// Compare A and B on text cut into disjoint windows of `seq_len` tokens; perplexities are the
/// ones `eval perplexity` gives with `--stride` = `--seq-len`.
pub fn diff_text(a: &Model, b: &Model, ids: &[u32], seq_len: usize, mut progress: impl FnMut(usize, usize)) -> Result<TextDiff> {
    check_pair(a, b)?;
    if seq_len < 2 || ids.len() < 2 {
        return Err(Error::invalid("diff on text needs seq_len ≥ 2 and at least 2 tokens"));
    }
    let start = Instant::now();
    let mut timing = Timing::default();
    let mut all = PosStats::default();
    let (mut nll_a, mut nll_b, mut scored) = (0f64, 0f64, 0usize);
    let ws = windows(ids.len(), seq_len, seq_len);
    for (w, &(begin, end, first)) in ws.iter().enumerate() {
        progress(w, ws.len());
        let window = &ids[begin..end];
        let (la, lb) = both_logprobs(a, b, &Batch::single(window), &mut timing)?;
        let s = Instant::now();
        let (kl, ta, tb) = kl_top1(&la, &lb)?;
        for j in 0..window.len() {
            all.push(kl[0][j].max(0.0) as f64, ta[0][j] == tb[0][j]);
        }
        // Token j is predicted at j − 1, as in `perplexity`.
        let targets = Tensor::new(&window[first..], la.device())?.unsqueeze(1)?;
        let pick = |l: &Tensor| -> Result<Vec<f32>> {
            Ok(l.i((0, first - 1..window.len() - 1))?.contiguous()?.gather(&targets, 1)?.squeeze(1)?.to_vec1::<f32>()?)
        };
        nll_a -= pick(&la)?.iter().map(|&x| x as f64).sum::<f64>();
        nll_b -= pick(&lb)?.iter().map(|&x| x as f64).sum::<f64>();
        scored += window.len() - first;
        timing.compare_s += s.elapsed().as_secs_f64();
    }
    progress(ws.len(), ws.len());
    timing.finish(start, ids.len());
    let (pa, pb) = ((nll_a / scored as f64).exp(), (nll_b / scored as f64).exp());
    Ok(TextDiff {
        tokens: ids.len(),
        seq_len,
        windows: ws.len(),
        scored_tokens: scored,
        perplexity_a: pa,
        perplexity_b: pb,
        perplexity_ratio: pb / pa,
        all,
        timing,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::{random_model, RandomSpec};
    use crate::runtime::score::{kl, next_token_logprobs};

    #[test]
    fn self_diff_is_zero_and_kl_matches_the_scalar_formula() {
        let spec = RandomSpec::from_seed(3);
        let a = random_model(spec.config(), 3).unwrap();
        let b = random_model(spec.config(), 4).unwrap();
        let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4, 5], vec![6, 7, 8, 9, 10]];
        let texts: Vec<String> = (0..3).map(|i| format!("p{i}")).collect();
        let dec = |ids: &[u32]| Ok(format!("{ids:?}"));
        let opts = DiffOpts { batch: 2, top_moved: 2, gen_tokens: 3, stop: vec![] };
        let same = diff_prompts(&a, &a, &prompts, &texts, &opts, dec, |_, _| {}).unwrap();
        assert_eq!((same.all.kl_max, same.all.top1_agreement, same.first.kl_max), (0.0, 1.0, 0.0));
        assert!(same.moved.is_empty());

        let d = diff_prompts(&a, &b, &prompts, &texts, &opts, dec, |_, _| {}).unwrap();
        // First-token KL equals the scalar f64 KL of the two next-token distributions.
        let (mut pa, mut pb) = (vec![vec![]; 3], vec![vec![]; 3]);
        next_token_logprobs(&a, &prompts, 1, &mut Hooks::new(), |i, lp| Ok(pa[i] = lp.to_vec())).unwrap();
        next_token_logprobs(&b, &prompts, 1, &mut Hooks::new(), |i, lp| Ok(pb[i] = lp.to_vec())).unwrap();
        for i in 0..3 {
            let want = kl(&pa[i], &pb[i]);
            assert!((d.per_prompt[i].kl_first - want).abs() < 1e-4 * (1.0 + want), "{i}: {} vs {want}", d.per_prompt[i].kl_first);
        }
        assert!(d.all.kl_mean > 0.0);
        // Moved prompts come in decreasing first-token KL.
        assert!(d.moved.windows(2).all(|w| w[0].kl_first >= w[1].kl_first));
    }

    #[test]
    fn text_perplexity_matches_eval_perplexity() {
        let spec = RandomSpec::from_seed(5);
        let a = random_model(spec.config(), 5).unwrap();
        let b = random_model(spec.config(), 6).unwrap();
        let v = spec.vocab as u32;
        let ids: Vec<u32> = (0..37u32).map(|i| (i * 7 + 3) % v).collect();
        let d = diff_text(&a, &b, &ids, 8, |_, _| {}).unwrap();
        let pa = crate::verify::perplexity::perplexity(&a, &ids, 8, 8, |_, _| {}).unwrap();
        let pb = crate::verify::perplexity::perplexity(&b, &ids, 8, 8, |_, _| {}).unwrap();
        assert!((d.perplexity_a - pa.perplexity).abs() < 1e-9 * pa.perplexity, "{} vs {}", d.perplexity_a, pa.perplexity);
        assert!((d.perplexity_b - pb.perplexity).abs() < 1e-9 * pb.perplexity);
        assert_eq!(d.scored_tokens, pa.scored_tokens);
    }
}
