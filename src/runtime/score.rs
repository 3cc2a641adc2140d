//! Batched scoring primitives shared by `diff`, `eval` and `locate`: next-token log-probabilities
//! at the end of each prompt, and the log-probability of a continuation given a prompt.
//!
//! Sequences are grouped by length (fewer padding tokens) and run in right-padded batches;
//! right padding leaves every real token's position and attention unchanged, so a row's
//! numbers do not depend on what it is batched with (up to float summation order).

use candle_core::{IndexOp, D};

use crate::error::{Error, Result};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::batch::length_batches;
use crate::runtime::{Batch, HookPoint, Hooks};

/// Calls `f(i, log_probs)` with the log-softmax of the next-token logits after the whole of
/// prompt `i`, for every prompt (in an unspecified order). `hooks` apply to every batch.
pub fn next_token_logprobs(
    model: &Model,
    prompts: &[Vec<u32>],
    batch: usize,
    hooks: &mut Hooks,
    mut f: impl FnMut(usize, &[f32]) -> Result<()>,
) -> Result<()> {
    last_token(model, prompts, batch, hooks, None, |i, lp, _| f(i, lp))
}

/// Like [`next_token_logprobs`], and also hands `f` the last token's activation at `capture`
/// (flattened), when given.
pub fn last_token(
    model: &Model,
    prompts: &[Vec<u32>],
    batch: usize,
    hooks: &Hooks,
    capture: Option<HookPoint>,
    mut f: impl FnMut(usize, &[f32], Option<&[f32]>) -> Result<()>,
) -> Result<()> {
    if let Some(i) = prompts.iter().position(|p| p.is_empty()) {
        return Err(Error::invalid(format!("prompt {i} has no tokens")));
    }
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    for chunk in length_batches(&lens, batch) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let mut h = hooks.clone();
        if let Some(p) = capture {
            h.capture(p);
        }
        let logits = model.forward(&Batch::right_padded(&seqs, 0), None, &mut h, Fwd::default())?;
        let act = match capture {
            Some(p) => Some(h.captured.get(&p).ok_or_else(|| Error::invalid(format!("{p} was not captured")))?),
            None => None,
        };
        for (r, &i) in chunk.iter().enumerate() {
            let last = lens[i] - 1;
            let lp = candle_nn::ops::log_softmax(&logits.i((r, last))?, D::Minus1)?.to_vec1::<f32>()?;
            let a = act.map(|a| a.i((r, last))?.flatten_all()?.to_vec1::<f32>()).transpose()?;
            f(i, &lp, a.as_deref())?;
        }
    }
    Ok(())
}

/// Log-softmax of the next-token logits after each prompt, under `hooks`: left-padded batches
/// of similar lengths, logits at the last position only. `f(i, row)` per prompt.
pub fn last_logprobs(model: &Model, prompts: &[Vec<u32>], hooks: &Hooks, batch: usize, mut f: impl FnMut(usize, &[f32])) -> Result<()> {
    let lens: Vec<usize> = prompts.iter().map(Vec::len).collect();
    if let Some(i) = lens.iter().position(|&n| n == 0) {
        return Err(Error::invalid(format!("prompt {i} has no tokens")));
    }
    for chunk in length_batches(&lens, batch) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let logits = model.forward(&Batch::left_padded(&seqs, 0), None, &mut hooks.clone(), Fwd { last_only: true, ..Fwd::default() })?;
        let lp = candle_nn::ops::log_softmax(&logits.i((.., 0))?.to_dtype(candle_core::DType::F32)?, D::Minus1)?.to_vec2::<f32>()?;
        for (row, &i) in lp.iter().zip(&chunk) {
            f(i, row);
        }
    }
    Ok(())
}

/// Log-probability of each token of `conts[i]` following `prompts[i]` (teacher forcing).
pub fn continuation_logprobs(model: &Model, prompts: &[Vec<u32>], conts: &[Vec<u32>], batch: usize) -> Result<Vec<Vec<f32>>> {
    continuation_logprobs_with(model, prompts, conts, batch, Fwd::default())
}

/// [`continuation_logprobs`] with forward options (e.g. `precise` for transformers-level accuracy).
pub fn continuation_logprobs_with(
    model: &Model,
    prompts: &[Vec<u32>],
    conts: &[Vec<u32>],
    batch: usize,
    fwd: Fwd,
) -> Result<Vec<Vec<f32>>> {
    if prompts.len() != conts.len() {
        return Err(Error::invalid("continuation_logprobs: as many continuations as prompts are needed"));
    }
    if let Some(i) = (0..prompts.len()).find(|&i| prompts[i].is_empty() || conts[i].is_empty()) {
        return Err(Error::invalid(format!("pair {i}: empty prompt or continuation")));
    }
    let full: Vec<Vec<u32>> = prompts.iter().zip(conts).map(|(p, c)| [p.as_slice(), c.as_slice()].concat()).collect();
    let lens: Vec<usize> = full.iter().map(Vec::len).collect();
    let mut out = vec![vec![]; prompts.len()];
    for chunk in length_batches(&lens, batch) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| full[i].clone()).collect();
        let logits = model.forward(&Batch::right_padded(&seqs, 0), None, &mut Hooks::new(), fwd)?;
        for (r, &i) in chunk.iter().enumerate() {
            let (p, c) = (prompts[i].len(), conts[i].len());
            // Token p + j is predicted at position p + j − 1.
            let lp = candle_nn::ops::log_softmax(&logits.i((r, p - 1..p + c - 1))?, D::Minus1)?.to_vec2::<f32>()?;
            out[i] = lp.iter().zip(&conts[i]).map(|(row, &t)| row[t as usize]).collect();
        }
    }
    Ok(out)
}

/// KL(p‖q) in nats from two log-probability rows (computed in f64).
pub fn kl(logp: &[f32], logq: &[f32]) -> f64 {
    logp.iter().zip(logq).map(|(&a, &b)| if a == f32::NEG_INFINITY { 0.0 } else { (a as f64).exp() * (a as f64 - b as f64) }).sum::<f64>().max(0.0)
}

/// Index of the largest value (the first one on ties).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Left-padded, last-position logits equal each prompt run alone.
    #[test]
    fn last_logprobs_match_single_prompts() {
        let m = crate::model::random::random_model(crate::model::random::RandomSpec::from_seed(4).config(), 4).unwrap();
        let prompts = vec![vec![1, 2, 3, 4, 5], vec![6, 7], vec![3, 3, 3]];
        let mut got = vec![vec![]; 3];
        last_logprobs(&m, &prompts, &Hooks::new(), 8, |i, lp| got[i] = lp.to_vec()).unwrap();
        for (i, p) in prompts.iter().enumerate() {
            let logits = m.forward(&Batch::single(p), None, &mut Hooks::new(), Fwd::default()).unwrap();
            let want = candle_nn::ops::log_softmax(&logits.i((0, p.len() - 1)).unwrap(), D::Minus1).unwrap().to_vec1::<f32>().unwrap();
            let err = want.iter().zip(&got[i]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err < 1e-4, "prompt {i}: max |Δ log p| {err}");
        }
        assert!(last_logprobs(&m, &[vec![]], &Hooks::new(), 8, |_, _| {}).is_err());
    }

    use crate::model::random::{random_model, RandomSpec};

    #[test]
    fn batched_scores_equal_single_runs() {
        let model = random_model(RandomSpec::from_seed(7).config(), 7).unwrap();
        let prompts: Vec<Vec<u32>> = vec![vec![1, 2, 3], vec![4], vec![5, 6, 7, 8, 9], vec![3, 3]];
        let conts: Vec<Vec<u32>> = vec![vec![4, 5], vec![1], vec![2], vec![7, 8, 9]];
        let batched = continuation_logprobs(&model, &prompts, &conts, 3).unwrap();
        for i in 0..prompts.len() {
            let single = continuation_logprobs(&model, &prompts[i..i + 1], &conts[i..i + 1], 1).unwrap();
            for (a, b) in batched[i].iter().zip(&single[0]) {
                assert!((a - b).abs() < 1e-4, "pair {i}: {a} vs {b}");
            }
        }
        // The first continuation token's log-prob is the next-token distribution's entry.
        let mut firsts = vec![0f32; prompts.len()];
        next_token_logprobs(&model, &prompts, 2, &mut Hooks::new(), |i, lp| {
            firsts[i] = lp[conts[i][0] as usize];
            Ok(())
        })
        .unwrap();
        for i in 0..prompts.len() {
            assert!((firsts[i] - batched[i][0]).abs() < 1e-4);
        }
    }

    #[test]
    fn kl_basics() {
        let p = [0.5f32.ln(), 0.5f32.ln()];
        let q = [0.9f32.ln(), 0.1f32.ln()];
        assert_eq!(kl(&p, &p), 0.0);
        let want = 0.5 * (0.5f64 / 0.9).ln() + 0.5 * (0.5f64 / 0.1).ln();
        assert!((kl(&p, &q) - want).abs() < 1e-6);
        assert_eq!(argmax(&[1.0, 3.0, 3.0]), 1);
    }
}
