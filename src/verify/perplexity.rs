//! Perplexity with a sliding window, computed the way the transformers documentation does it
//! ("Perplexity of fixed-length models"), so numbers compare when the settings match:
//!
//! windows start every `stride` tokens and span `seq_len` tokens (the last one is cut at the
//! end of the text); in each window only the tokens not scored by the previous window are
//! scored (`trg_len = end − prev_end`), each predicted from everything before it in the window;
//! the first token of a window is never scored. ppl = exp(Σ NLL / number of scored tokens).

use candle_core::{IndexOp, D};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::{Batch, Hooks};

#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    pub scored_tokens: usize,
    pub total_tokens: usize,
    pub windows: usize,
    pub seq_len: usize,
    pub stride: usize,
}

/// The windows `(begin, end, first scored position within the window)`.
pub fn windows(n: usize, seq_len: usize, stride: usize) -> Vec<(usize, usize, usize)> {
    let mut out = vec![];
    let mut prev_end = 0;
    let mut begin = 0;
    while begin < n {
        let end = (begin + seq_len).min(n);
        let trg_len = end - prev_end;
        let first = (end - begin - trg_len).max(1);
        out.push((begin, end, first));
        prev_end = end;
        if end == n {
            break;
        }
        begin += stride;
    }
    out
}

pub fn perplexity(model: &Model, ids: &[u32], seq_len: usize, stride: usize, progress: impl FnMut(usize, usize)) -> Result<Perplexity> {
    perplexity_with_hooks(model, ids, seq_len, stride, &Hooks::new(), progress)
}

/// Perplexity with interventions applied in every window (e.g. a skipped block).
pub fn perplexity_with_hooks(
    model: &Model,
    ids: &[u32],
    seq_len: usize,
    stride: usize,
    hooks: &Hooks,
    mut progress: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if seq_len < 2 || stride == 0 || stride > seq_len {
        return Err(Error::invalid(format!("need seq_len ≥ 2 and 0 < stride ≤ seq_len (got {seq_len}, {stride})")));
    }
    if ids.len() < 2 {
        return Err(Error::invalid("the text has fewer than 2 tokens"));
    }
    let ws = windows(ids.len(), seq_len, stride);
    let (mut nll, mut count) = (0f64, 0usize);
    for (w, &(begin, end, first)) in ws.iter().enumerate() {
        progress(w, ws.len());
        let window = &ids[begin..end];
        let logits = model.forward(&Batch::single(window), None, &mut hooks.clone(), Fwd::default())?.squeeze(0)?;
        // Token j is predicted by the logits at j − 1.
        let lp = candle_nn::ops::log_softmax(&logits.i(first - 1..window.len() - 1)?, D::Minus1)?;
        let lp = lp.to_vec2::<f32>()?;
        for (row, &target) in lp.iter().zip(&window[first..]) {
            nll -= row[target as usize] as f64;
            count += 1;
        }
    }
    let mean = nll / count as f64;
    Ok(Perplexity {
        perplexity: mean.exp(),
        nll: mean,
        scored_tokens: count,
        total_tokens: ids.len(),
        windows: ws.len(),
        seq_len,
        stride,
    })
}

#[cfg(test)]
mod tests {
    use super::windows;

    /// Every token is scored at most once; the only unscored tokens are the first token of a
    /// window that starts at or after the previous window's end (no context inside the window),
    /// as in the transformers docs (with stride = seq_len, every window's first token).
    #[test]
    fn windows_score_each_token_once_except_context_free_starts() {
        for (n, len, stride) in [(10, 4, 2), (10, 4, 4), (9, 5, 3), (3, 8, 8), (100, 16, 5), (10, 3, 3)] {
            let mut scored = vec![0; n];
            let mut unscored_ok = vec![false; n];
            let mut prev_end = 0;
            for (b, e, first) in windows(n, len, stride) {
                assert!(e - b <= len && first >= 1);
                if b >= prev_end {
                    unscored_ok[b] = true;
                }
                for s in scored.iter_mut().take(e).skip(b + first) {
                    *s += 1;
                }
                prev_end = e;
            }
            for i in 0..n {
                let want = if unscored_ok[i] { 0 } else { 1 };
                assert_eq!(scored[i], want, "n {n} len {len} stride {stride}: token {i} scored {scored:?}");
            }
        }
    }
}
