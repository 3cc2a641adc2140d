//! MEMIT (Meng et al. 2023): many facts written jointly into the `down_proj` of a range of
//! layers, as kmeng01/memit does it (`memit_main.py`, `compute_z.py`, `compute_ks.py`):
//!
//! - **targets z**: for each fact, the residual stream after the range's last layer L at the
//!   subject's last token plus δ, optimised exactly as ROME's v* (same contexts, loss, Adam,
//!   clamp) except that the weight decay and the clamp are relative to the residual's norm:
//!   [`super::key_value`] with [`super::Anchor::Resid`] at L.
//! - **per layer l of the range, in order**, on the model with the earlier layers' updates:
//!   K_l (d_ff × n: each fact's `down_proj` input at the subject's last token, averaged over the
//!   contexts), H (the residual after L at the bare prompts' subject token) and
//!   R_l = (Z − H) / (layers left, l included), then
//!   ΔW_l = R_l K_lᵀ (λ C_l + K_l K_lᵀ)⁻¹, by a Cholesky factorisation in f64, with
//!   C_l = E[k kᵀ] over a text corpus on the unedited model and λ = `mom2_weight` (MEMIT:
//!   15000 for GPT-J and Llama).
//!
//! ΔW_l = Σⱼ R_l[:, j] A_l[:, j]ᵀ with A_l = (λC_l + K_lK_lᵀ)⁻¹K_l, so a MEMIT edit is n
//! rank-one updates per layer: applying, emitting and the runtime twin are ROME's.

use candle_core::Tensor;
use nalgebra::DMatrix;

use super::covariance::{truncated_hooks, Covariance};
use super::{RankOne, Request};
use crate::error::{Error, Result};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::{Batch, HookPoint};

/// The key of `req` at `layer` (mean over its contexts of `mlp.hook_post` at the subject's last
/// token) and the residual after block `last` at the bare prompt's subject token.
pub fn key_and_resid(model: &Model, layer: usize, last: usize, req: &Request) -> Result<(Vec<f32>, Vec<f32>)> {
    let batch = Batch::right_padded(&req.contexts, 0);
    let mut hooks = truncated_hooks(model, last);
    hooks.capture(HookPoint::MlpPost(layer)).capture(HookPoint::ResidPost(last));
    model.forward(&batch, None, &mut hooks, Fwd::default())?;
    let post = &hooks.captured[&HookPoint::MlpPost(layer)];
    let rows: Vec<Tensor> = req.lookup.iter().enumerate().map(|(r, &p)| post.get(r)?.get(p)).collect::<candle_core::Result<_>>()?;
    let k = Tensor::stack(&rows, 0)?.mean(0)?.to_vec1::<f32>()?;
    let h = hooks.captured[&HookPoint::ResidPost(last)].get(0)?.get(req.lookup[0])?.to_vec1::<f32>()?;
    Ok((k, h))
}

/// One layer's update: ΔW = R Kᵀ (λC + K Kᵀ)⁻¹ as rank-one terms r_j = R[:, j],
/// u_j = ((λC + KKᵀ)⁻¹K)[:, j]. `keys[j]` is column j of K (d_ff), `resid[j]` of R (d_model).
pub fn layer_update(layer: usize, keys: &[Vec<f32>], resid: &[Vec<f32>], cov: &Covariance, lambda: f64) -> Result<Vec<RankOne>> {
    let (n, d) = (keys.len(), cov.dim);
    if resid.len() != n || keys.iter().any(|k| k.len() != d) {
        return Err(Error::invalid(format!("memit: {n} keys of sizes ≠ {d} or {} residuals", resid.len())));
    }
    if !(lambda >= 0.0 && lambda.is_finite()) {
        return Err(Error::invalid(format!("mom2_weight = {lambda}: must be ≥ 0")));
    }
    let k = DMatrix::<f64>::from_fn(d, n, |i, j| keys[j][i] as f64);
    let m = DMatrix::from_row_slice(d, d, &cov.mom2) * lambda + &k * k.transpose();
    let chol = m.cholesky().ok_or_else(|| {
        Error::invalid(format!(
            "memit at layer {layer}: λC + KKᵀ is not positive definite (raise mom2_weight, or cov_tokens for a full-rank C)"
        ))
    })?;
    let a = chol.solve(&k); // d × n
    Ok((0..n)
        .map(|j| RankOne { layer, r: resid[j].clone(), u: a.column(j).iter().map(|&x| x as f32).collect() })
        .collect())
}

/// The MEMIT updates that write the residual targets `zs` (one per request, after the last of
/// `layers`) through `layers` (strictly increasing), with `covs[i]` the covariance of
/// `layers[i]`. `on_layer(i)` is called after each layer's update.
pub fn updates(
    model: &Model,
    layers: &[usize],
    reqs: &[Request],
    zs: &[Vec<f32>],
    covs: &[Covariance],
    lambda: f64,
    mut on_layer: impl FnMut(usize),
) -> Result<Vec<RankOne>> {
    let Some(&last) = layers.last() else { return Err(Error::invalid("memit: no layers")) };
    if layers.windows(2).any(|w| w[0] >= w[1]) || last >= model.cfg.num_layers {
        return Err(Error::invalid(format!("memit: layers {layers:?} must increase and be < {}", model.cfg.num_layers)));
    }
    if zs.len() != reqs.len() || covs.len() != layers.len() || covs.iter().zip(layers).any(|(c, &l)| c.layer != l) {
        return Err(Error::invalid("memit: one target per request and one covariance per layer, in order"));
    }
    let mut work = model.clone();
    let mut all = vec![];
    for (i, &l) in layers.iter().enumerate() {
        let left = (layers.len() - i) as f32;
        let (mut ks, mut rs) = (vec![], vec![]);
        for (req, z) in reqs.iter().zip(zs) {
            let (k, h) = key_and_resid(&work, l, last, req)?;
            rs.push(z.iter().zip(&h).map(|(z, h)| (z - h) / left).collect());
            ks.push(k);
        }
        let ups = layer_update(l, &ks, &rs, &covs[i], lambda)?;
        super::apply(&ups, &mut work)?;
        all.extend(ups);
        on_layer(i + 1);
    }
    Ok(all)
}
