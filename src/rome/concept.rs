//! A concept key for a conditional MLP write (the `conditional-steer` pass): ROME's
//! rank-one machinery with the key fitted to a *concept* (e.g. "this request is harmful")
//! instead of a subject.
//!
//! ΔW = v uᵀ on one layer's `down_proj` adds (uᵀk) v to the MLP's output wherever its input
//! (`mlp.hook_post`) is k. u is chosen so that uᵀk ≈ 1 at the positive prompts' keys, ≈ 0 at
//! the negative prompts' keys and is small on running text:
//!
//!   u = argmin Σᵢ (uᵀkᵢ − yᵢ)² + quiet·n·uᵀCu,  yᵢ = 1 (positive) or 0 (negative),
//!
//! with C = E[kkᵀ] the layer's uncentred second moment over a text corpus (so uᵀCu is the mean
//! square firing on that text; [`super::covariance`]) and n the number of keys: the normal
//! equations (KKᵀ + quiet·n·C) u = K y, solved by Cholesky in f64. Where the key is absent
//! (uᵀk = 0) the layer's output is unchanged exactly; everywhere else it moves by (uᵀk) v.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use nalgebra::{DMatrix, DVector};
use sha2::{Digest, Sha256};

use super::covariance::{hash_weights_through, truncated_hooks, Covariance};
use crate::error::{Error, Result};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::batch::length_batches;
use crate::runtime::{Batch, HookPoint};

/// `mlp.hook_post` of `layer` at the last `last` tokens of every prompt: one key per token.
/// Remembered for the life of the process (keyed by the weights they depend on and the prompts),
/// so a coefficient search that builds the pass once per candidate collects them once.
pub fn keys(model: &Model, layer: usize, prompts: &[Vec<u32>], last: usize, batch: usize) -> Result<Arc<Vec<Vec<f32>>>> {
    static MEMO: Mutex<BTreeMap<[u8; 32], Arc<Vec<Vec<f32>>>>> = Mutex::new(BTreeMap::new());
    if layer >= model.cfg.num_layers {
        return Err(Error::invalid(format!("layer {layer} does not exist (the model has layers 0..{})", model.cfg.num_layers - 1)));
    }
    let mut h = Sha256::new();
    h.update(format!("concept-keys layer={layer} last={last} prompts={}\n", prompts.len()));
    hash_weights_through(&mut h, model, layer)?;
    for p in prompts {
        h.update((p.len() as u32).to_le_bytes());
        p.iter().for_each(|id| h.update(id.to_le_bytes()));
    }
    let digest: [u8; 32] = h.finalize().into();
    if let Some(k) = MEMO.lock().expect("concept-key memo").get(&digest) {
        return Ok(k.clone());
    }
    let k = Arc::new(collect_keys(model, layer, prompts, last, batch)?);
    MEMO.lock().expect("concept-key memo").insert(digest, k.clone());
    Ok(k)
}

fn collect_keys(model: &Model, layer: usize, prompts: &[Vec<u32>], last: usize, batch: usize) -> Result<Vec<Vec<f32>>> {
    if let Some(i) = prompts.iter().position(|p| p.len() < last || p.is_empty()) {
        return Err(Error::invalid(format!("prompt {i} has {} tokens, fewer than the {last} key positions", prompts[i].len())));
    }
    let lens: Vec<usize> = prompts.iter().map(|p| p.len()).collect();
    let mut out = vec![vec![]; prompts.len()];
    for chunk in length_batches(&lens, batch) {
        let seqs: Vec<Vec<u32>> = chunk.iter().map(|&i| prompts[i].clone()).collect();
        let mut hooks = truncated_hooks(model, layer);
        hooks.capture(HookPoint::MlpPost(layer));
        model.forward(&Batch::right_padded(&seqs, 0), None, &mut hooks, Fwd::default())?;
        let post = &hooks.captured[&HookPoint::MlpPost(layer)];
        for (r, &i) in chunk.iter().enumerate() {
            let n = prompts[i].len();
            out[i] = post.get(r)?.narrow(0, n - last, last)?.to_dtype(candle_core::DType::F32)?.to_vec2::<f32>()?;
        }
    }
    Ok(out.into_iter().flatten().collect())
}

/// The fitted key and how it fires.
#[derive(Debug, Clone)]
pub struct ConceptKey {
    /// [d_ff]
    pub u: Vec<f32>,
    /// Mean and standard deviation of uᵀk over the positive keys, then over the negative keys.
    pub positive: (f64, f64),
    pub negative: (f64, f64),
    /// √(uᵀCu): the root-mean-square firing on the covariance's text.
    pub text_rms: f64,
}

/// u solving (KKᵀ + quiet·n·C) u = K y (see the module documentation).
pub fn fit(positive: &[Vec<f32>], negative: &[Vec<f32>], cov: &Covariance, quiet: f64) -> Result<ConceptKey> {
    let d = cov.dim;
    if positive.is_empty() || negative.is_empty() {
        return Err(Error::invalid("a concept key needs positive and negative prompts"));
    }
    if let Some(k) = positive.iter().chain(negative).find(|k| k.len() != d) {
        return Err(Error::invalid(format!("concept key: a key has {} values, the layer's MLP {d}", k.len())));
    }
    if !(quiet > 0.0 && quiet.is_finite()) {
        return Err(Error::invalid(format!("quiet = {quiet}: must be > 0 (it keeps the key from firing on ordinary text)")));
    }
    let all: Vec<&Vec<f32>> = positive.iter().chain(negative).collect();
    let n = all.len();
    let k = DMatrix::<f64>::from_fn(d, n, |i, j| all[j][i] as f64);
    let c = DMatrix::from_row_slice(d, d, &cov.mom2);
    let m = &k * k.transpose() + &c * (quiet * n as f64);
    let y = DVector::from_fn(n, |j, _| if j < positive.len() { 1.0 } else { 0.0 });
    let chol = m.cholesky().ok_or_else(|| Error::invalid("concept key: KKᵀ + quiet·n·C is not positive definite (raise quiet or cov_tokens)"))?;
    let u = chol.solve(&(&k * y));
    let fire = k.transpose() * &u;
    let text_rms = (&u.transpose() * &c * &u)[(0, 0)].max(0.0).sqrt();
    Ok(ConceptKey {
        u: u.iter().map(|&x| x as f32).collect(),
        positive: mean_sd(&fire.as_slice()[..positive.len()]),
        negative: mean_sd(&fire.as_slice()[positive.len()..]),
        text_rms,
    })
}

fn mean_sd(xs: &[f64]) -> (f64, f64) {
    let m = xs.iter().sum::<f64>() / xs.len() as f64;
    (m, (xs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / xs.len() as f64).sqrt())
}

/// How a key generalises: fitted without every fourth prompt (prompts 3, 7, 11, …; all of a
/// prompt's keys go together), its firing on those prompts' keys.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HeldOut {
    /// Mean and standard deviation of uᵀk over the held-out positive keys, then negative keys.
    pub positive: (f64, f64),
    pub negative: (f64, f64),
}

/// [`HeldOut`] for a key fitted with `quiet`; `per_prompt` keys per prompt, in prompt order (as
/// [`keys`] returns them). Needs at least 4 prompts in each set.
pub fn held_out(positive: &[Vec<f32>], negative: &[Vec<f32>], per_prompt: usize, cov: &Covariance, quiet: f64) -> Result<HeldOut> {
    let split = |keys: &[Vec<f32>]| -> Result<(Vec<Vec<f32>>, Vec<Vec<f32>>)> {
        let n = keys.len() / per_prompt.max(1);
        if n < 4 || keys.len() != n * per_prompt {
            return Err(Error::invalid(format!("holding out every fourth prompt needs at least 4 prompts per set (got {n})")));
        }
        let (mut fit, mut held) = (vec![], vec![]);
        for (i, k) in keys.chunks(per_prompt).enumerate() {
            if i % 4 == 3 { held.extend_from_slice(k) } else { fit.extend_from_slice(k) }
        }
        Ok((fit, held))
    };
    let (pos_fit, pos_held) = split(positive)?;
    let (neg_fit, neg_held) = split(negative)?;
    let key = fit(&pos_fit, &neg_fit, cov, quiet)?;
    Ok(HeldOut { positive: mean_sd(&firing(&key.u, &pos_held)), negative: mean_sd(&firing(&key.u, &neg_held)) })
}

/// uᵀk for each key (how strongly the write fires there).
pub fn firing(u: &[f32], keys: &[Vec<f32>]) -> Vec<f64> {
    keys.iter().map(|k| k.iter().zip(u).map(|(a, b)| *a as f64 * *b as f64).sum()).collect()
}
