//! Fused scaled, masked softmax for the inference forward: one pass per row that skips the
//! masked keys (half of a causal score matrix), instead of scale + mask add + softmax as three
//! passes over [b, heads, t, total]. On SmolLM2 this took 512-token prefill attention from
//! ~450 ms to a third of that. No backward: the gradient mode uses the composed ops.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use rayon::prelude::*;

/// Which keys each query row may attend to.
#[derive(Clone)]
pub struct AttnMask {
    /// Cached positions before the current chunk.
    pub past: usize,
    /// Query positions in the current chunk.
    pub t: usize,
    /// Per batch row: validity of every key (past + t); `None` = all valid.
    pub key_valid: Option<Arc<Vec<Vec<bool>>>>,
}

impl AttnMask {
    /// Whether query `i` (of the current chunk) of batch row `batch` may attend to key `j`.
    fn allows(&self, batch: usize, i: usize, j: usize) -> bool {
        j <= self.past + i && self.key_valid.as_ref().is_none_or(|v| v[batch][j])
    }

    /// The mask as an additive tensor [b, 1, 1, t, total] of 0 and -1e30 (for composed ops).
    pub fn additive(&self, b: usize, device: &candle_core::Device) -> candle_core::Result<Tensor> {
        let total = self.past + self.t;
        let mut m = vec![0f32; b * self.t * total];
        for r in 0..b {
            for i in 0..self.t {
                for j in 0..total {
                    if !self.allows(r, i, j) {
                        m[(r * self.t + i) * total + j] = -1e30;
                    }
                }
            }
        }
        Tensor::from_vec(m, (b, 1, 1, self.t, total), device)
    }
}

struct MaskedSoftmax {
    scale: f32,
    mask: AttnMask,
}

impl CustomOp1 for MaskedSoftmax {
    fn name(&self) -> &'static str {
        "masked-softmax"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let src = super::op_input(storage, layout, "masked-softmax", "input")?;
        let dims = layout.shape().dims();
        let total = dims[dims.len() - 1];
        let rows_per_batch: usize = dims[1..dims.len() - 1].iter().product();
        let (mask, scale) = (&self.mask, self.scale);
        let mut dst = vec![0f32; src.len()];
        dst.par_chunks_mut(total).zip(src.par_chunks(total)).enumerate().for_each(|(r, (d, s))| {
            let batch = r / rows_per_batch;
            let i = r % mask.t; // query position within the chunk (t is the second-to-last axis)
            let limit = (mask.past + i + 1).min(total); // causal: no key beyond is allowed
            let ok = |j: usize| mask.allows(batch, i, j);
            let mut max = f32::NEG_INFINITY;
            for j in 0..limit {
                if ok(j) {
                    max = max.max(s[j] * scale);
                }
            }
            if max == f32::NEG_INFINITY {
                return; // nothing to attend to (a padding query): zeros
            }
            let mut sum = 0f32;
            for j in 0..limit {
                if ok(j) {
                    let e = (s[j] * scale - max).exp();
                    d[j] = e;
                    sum += e;
                }
            }
            for x in d[..limit].iter_mut() {
                *x /= sum;
            }
        });
        Ok((CpuStorage::F32(dst), layout.shape().clone()))
    }
}

/// softmax(scale · scores + mask) over the last axis, for scores [b, ..., t, total] (f32).
pub fn masked_softmax(scores: &Tensor, scale: f64, mask: AttnMask) -> candle_core::Result<Tensor> {
    scores.contiguous()?.apply_op1_no_bwd(&MaskedSoftmax { scale: scale as f32, mask })
}
