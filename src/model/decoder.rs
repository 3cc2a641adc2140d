//! The decoder forward shared by the Llama-like families, with a hook site at every named
//! activation. Computes in f32. Two modes: inference (candle's fused kernels) and gradient
//! (composed ops only, because the fused ones have no backward; frozen weights get no gradient).

use candle_core::{DType, Device, Tensor, D};

use super::config::ModelConfig;
use super::attention::{masked_softmax, AttnMask};
use super::rope::{self, Rope};
use super::{Proj, TensorRole};
use crate::error::{Error, Result};
use crate::runtime::frozen::frozen_matmul;
use crate::runtime::{Batch, HookPoint, Hooks, KvCache};

/// A projection y = x Wᵀ + b with W [out, in] as HF stores it. (Storing Wᵀ contiguous made
/// 64-token prefill 6% faster but 512-token prefill 30% slower with candle's gemm.)
#[derive(Debug, Clone)]
pub struct Linear {
    w: Tensor,
    pub b: Option<Tensor>,
}

impl Linear {
    /// From an HF-layout weight [out, in].
    pub fn new(w: &Tensor, b: Option<Tensor>) -> Result<Linear> {
        Ok(Linear { w: w.clone(), b })
    }

    /// The weight in HF layout [out, in].
    pub fn w(&self) -> &Tensor {
        &self.w
    }

    pub fn out_features(&self) -> usize {
        self.w.dims()[0]
    }

    fn forward(&self, x: &Tensor, opt: Fwd) -> Result<Tensor> {
        let wt = self.w.t()?;
        let y = if opt.grad {
            frozen_matmul(x, &wt)?
        } else if opt.precise {
            matmul_f64(x, &wt)?
        } else {
            project(x, &self.w)?
        };
        Ok(match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

/// Up to this many rows, [`project`] multiplies W xᵀ instead of x Wᵀ.
const SWAP_MAX_ROWS: usize = 128;

/// x Wᵀ for x [.., k] (f32) and W [out, k] as HF stores it, the inference way. With candle's gemm
/// (AVX-512 kernels), x Wᵀ for few rows spends most of its time packing W; computing (W xᵀ)ᵀ
/// instead made 16- to 96-token prefill of SmolLM2 1.3–2× faster, while from 256 rows on x Wᵀ
/// is faster. One row goes to [`matvec`](super::matvec::matvec).
fn project(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let k = x.dim(D::Minus1)?;
    let rows = x.elem_count() / k.max(1);
    if rows == 1 {
        return super::matvec::matvec(x, w);
    }
    if rows > SWAP_MAX_ROWS {
        return x.broadcast_matmul(&w.t()?);
    }
    let mut dims = x.dims().to_vec();
    *dims.last_mut().expect("x has a last axis") = w.dim(0)?;
    w.matmul(&x.reshape((rows, k))?.t()?)?.t()?.contiguous()?.reshape(dims)
}

/// `x @ wt` multiplied in f64 and rounded back to f32, for the `precise` forward. candle's f32
/// gemm sums each dot product in one sequential chain, which put SmolLM2's logits 2.3× further
/// from an f64 forward than torch's f32 matmul does; summing in f32 blocks only got that to
/// torch's level. In f64 the projections are exact to f32 output rounding, at ~1.25× the
/// time of a whole forward (the weights are converted on every call).
pub fn matmul_f64(x: &Tensor, wt: &Tensor) -> candle_core::Result<Tensor> {
    x.to_dtype(DType::F64)?.broadcast_matmul(&wt.to_dtype(DType::F64)?)?.to_dtype(DType::F32)
}

#[derive(Debug, Clone)]
pub struct Block {
    pub attn_norm: Tensor,
    pub mlp_norm: Tensor,
    pub q: Linear,
    pub k: Linear,
    pub v: Linear,
    pub o: Linear,
    pub gate: Linear,
    pub up: Linear,
    pub down: Linear,
}

impl Block {
    pub fn proj(&self, p: Proj) -> &Linear {
        match p {
            Proj::Q => &self.q,
            Proj::K => &self.k,
            Proj::V => &self.v,
            Proj::O => &self.o,
            Proj::Gate => &self.gate,
            Proj::Up => &self.up,
            Proj::Down => &self.down,
        }
    }
    pub fn proj_mut(&mut self, p: Proj) -> &mut Linear {
        match p {
            Proj::Q => &mut self.q,
            Proj::K => &mut self.k,
            Proj::V => &mut self.v,
            Proj::O => &mut self.o,
            Proj::Gate => &mut self.gate,
            Proj::Up => &mut self.up,
            Proj::Down => &mut self.down,
        }
    }
}

/// Options of one forward pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fwd {
    /// Differentiable ops only (for backprop through activations).
    pub grad: bool,
    /// Compute logits for the last position only (generation).
    pub last_only: bool,
    /// Projections and unembedding multiplied in f64: closer to an f64 forward than torch's f32
    /// forward is, slower.
    pub precise: bool,
}

/// What every block of one forward shares: rotary tables and the attention mask.
struct BlockCtx<'a> {
    cos: &'a Tensor,
    sin: &'a Tensor,
    mask: Option<&'a Tensor>,
    attn_mask: &'a AttnMask,
}

#[derive(Debug, Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    pub embed: Tensor,
    pub blocks: Vec<Block>,
    pub norm: Tensor,
    /// The unembedding; the same tensor as `embed` when tied.
    pub lm_head: Tensor,
    pub rope: Rope,
    pub device: Device,
}

impl Model {
    /// Build from tensors by role. `get` returns `None` for a missing tensor. Every tensor is
    /// converted to f32 and its shape checked against the config.
    pub fn from_tensors(
        cfg: ModelConfig,
        file: &std::path::Path,
        mut get: impl FnMut(TensorRole) -> Result<Option<Tensor>>,
    ) -> Result<Model> {
        let mut take = |role: TensorRole| -> Result<Tensor> {
            let name = role.hf_name();
            let t = get(role)?.ok_or_else(|| Error::bad_file(file, format!("missing tensor `{name}`")))?;
            let want = role.shape(&cfg);
            if t.dims() != want.as_slice() {
                return Err(Error::bad_file(
                    file,
                    format!("tensor `{name}` has shape {:?}, config.json implies {:?}", t.dims(), want),
                ));
            }
            let t = t.to_dtype(DType::F32)?;
            super::check_finite(&t, &name, file)?;
            Ok(t)
        };
        let embed = take(TensorRole::Embed)?;
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let mut lin = |p: Proj| -> Result<Linear> {
                let w = take(TensorRole::Weight(l, p))?;
                let b = if p.has_bias(&cfg) { Some(take(TensorRole::Bias(l, p))?) } else { None };
                Linear::new(&w, b)
            };
            let (q, k, v, o) = (lin(Proj::Q)?, lin(Proj::K)?, lin(Proj::V)?, lin(Proj::O)?);
            let (gate, up, down) = (lin(Proj::Gate)?, lin(Proj::Up)?, lin(Proj::Down)?);
            blocks.push(Block {
                attn_norm: take(TensorRole::AttnNorm(l))?,
                mlp_norm: take(TensorRole::MlpNorm(l))?,
                q,
                k,
                v,
                o,
                gate,
                up,
                down,
            });
        }
        let norm = take(TensorRole::FinalNorm)?;
        let lm_head = if cfg.tie_word_embeddings { embed.clone() } else { take(TensorRole::LmHead)? };
        let rope = Rope::new(&cfg);
        Ok(Model { cfg, embed, blocks, norm, lm_head, rope, device: Device::Cpu })
    }

    /// Every tensor by role (the tied head is not repeated).
    pub fn tensors(&self) -> Vec<(TensorRole, Tensor)> {
        let mut v = vec![(TensorRole::Embed, self.embed.clone())];
        for (l, b) in self.blocks.iter().enumerate() {
            v.push((TensorRole::AttnNorm(l), b.attn_norm.clone()));
            v.push((TensorRole::MlpNorm(l), b.mlp_norm.clone()));
            for p in Proj::ALL {
                let lin = b.proj(p);
                v.push((TensorRole::Weight(l, p), lin.w().clone()));
                if let Some(bias) = &lin.b {
                    v.push((TensorRole::Bias(l, p), bias.clone()));
                }
            }
        }
        v.push((TensorRole::FinalNorm, self.norm.clone()));
        if !self.cfg.tie_word_embeddings {
            v.push((TensorRole::LmHead, self.lm_head.clone()));
        }
        v
    }

    /// Parameters actually stored (so pruned, per-layer-shaped models count right).
    pub fn param_count(&self) -> usize {
        self.tensors().iter().map(|(_, t)| t.elem_count()).sum()
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, grad: bool) -> Result<Tensor> {
        let eps = self.cfg.rms_norm_eps;
        if !grad {
            return Ok(super::norm::rms_norm(x, w, eps)?);
        }
        let var = x.sqr()?.mean_keepdim(D::Minus1)?;
        Ok(x.broadcast_div(&(var + eps)?.sqrt()?)?.broadcast_mul(w)?)
    }

    /// Logits [b, t, vocab] (or [b, 1, vocab] with `last_only`). With a cache, `batch` holds the
    /// new tokens only and the cache grows by them.
    pub fn forward(&self, batch: &Batch, mut cache: Option<&mut KvCache>, hooks: &mut Hooks, opt: Fwd) -> Result<Tensor> {
        let (b, t) = (batch.size(), batch.len());
        if b == 0 || t == 0 {
            return Err(Error::invalid("forward: empty batch"));
        }
        let vocab = self.cfg.vocab_size as u32;
        if let Some(&bad) = batch.ids.iter().flatten().find(|&&i| i >= vocab) {
            return Err(Error::invalid(format!("token id {bad} is outside the vocabulary ({vocab})")));
        }
        let past_valid: Vec<Vec<bool>> = match &cache {
            Some(c) if c.seen() > 0 => {
                if c.valid.len() != b {
                    return Err(Error::invalid("forward: batch size differs from the cache's"));
                }
                c.valid.clone()
            }
            _ => vec![vec![]; b],
        };
        let past = past_valid[0].len();

        // Positions: the number of valid tokens before this one in its row.
        let positions: Vec<Vec<u32>> = (0..b)
            .map(|r| {
                let mut n = past_valid[r].iter().filter(|&&v| v).count() as u32;
                batch.valid[r]
                    .iter()
                    .map(|&v| {
                        let p = n;
                        n += v as u32;
                        p
                    })
                    .collect()
            })
            .collect();
        let (cos, sin) = self.rope.cos_sin(&positions, &self.device)?;

        // Which keys each query may see: causal, and valid (not padding). Inference applies it in
        // the fused masked softmax; the gradient mode adds it as a tensor of 0 / -1e30.
        let any_invalid = batch.has_padding() || past_valid.iter().flatten().any(|v| !v);
        let key_valid: Option<Vec<Vec<bool>>> = any_invalid.then(|| {
            (0..b).map(|r| past_valid[r].iter().chain(batch.valid[r].iter()).copied().collect()).collect()
        });
        let attn_mask = AttnMask { past, t, key_valid: key_valid.map(std::sync::Arc::new) };
        let mask = if opt.grad && (t > 1 || any_invalid) { Some(attn_mask.additive(b, &self.device)?) } else { None };

        let ids: Vec<u32> = batch.ids.iter().flatten().copied().collect();
        let ids = Tensor::from_vec(ids, (b * t,), &self.device)?;
        let x = self.embed.index_select(&ids, 0)?.reshape((b, t, self.cfg.hidden_size))?;
        let mut x = hooks.site(HookPoint::Embed, x)?;

        let ctx = BlockCtx { cos: &cos, sin: &sin, mask: mask.as_ref(), attn_mask: &attn_mask };
        x = self.run_blocks(x, 0..self.blocks.len(), &ctx, cache.as_deref_mut(), hooks, opt)?;
        if let Some(c) = cache.as_deref_mut() {
            if c.valid.len() != b {
                c.valid = vec![vec![]; b];
            }
            for (r, v) in batch.valid.iter().enumerate() {
                c.valid[r].extend_from_slice(v);
            }
        }
        self.unembed(x, hooks, opt)
    }

    /// The final norm and the unembedding of the residual stream `x` [b, t, d_model] (the last
    /// position only with `last_only`), through the `ln_final.hook_normalized` and `logits` sites.
    pub fn unembed(&self, x: Tensor, hooks: &mut Hooks, opt: Fwd) -> Result<Tensor> {
        let t = x.dim(1)?;
        let x = if opt.last_only { x.narrow(1, t - 1, 1)? } else { x };
        let x = self.rms_norm(&x, &self.norm, opt.grad)?;
        let x = hooks.site(HookPoint::LnFinal, x)?;
        let logits = if opt.grad {
            frozen_matmul(&x, &self.lm_head.t()?)?
        } else if opt.precise {
            matmul_f64(&x, &self.lm_head.t()?)?
        } else {
            project(&x, &self.lm_head)?
        };
        hooks.site(HookPoint::Logits, logits)
    }

    /// Continue a forward inside the network: run blocks `layers` on the residual stream `x`
    /// [b, t, d_model] entering the first of them, for tokens at positions `past..past + t` of
    /// unpadded sequences. With `past > 0`, `cache` must hold every layer's keys and values of the
    /// `past` earlier tokens ([b, kv_heads, past, head_dim], e.g. from a forward with a
    /// [`KvCache`]); the cache's layers grow by the new tokens. Hook sites fire as in
    /// [`Model::forward`]. Returns the residual stream after the last block (`x` for an empty
    /// range); [`Model::unembed`] turns it into logits.
    pub fn forward_from(
        &self,
        x: Tensor,
        layers: std::ops::Range<usize>,
        past: usize,
        cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
        opt: Fwd,
    ) -> Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        if t == 0 || d != self.cfg.hidden_size || layers.end > self.blocks.len() || layers.start > layers.end {
            return Err(Error::invalid(format!(
                "forward_from: states {:?} for layers {layers:?} of a {}-layer model with d_model {}",
                x.dims(),
                self.blocks.len(),
                self.cfg.hidden_size
            )));
        }
        for l in layers.clone() {
            let seen = cache.as_deref().and_then(|c| c.layers.get(l)?.as_ref()).map(|(k, _)| k.dims().to_vec());
            let ok = match &seen {
                None => past == 0,
                Some(dims) => dims.len() == 4 && dims[0] == b && dims[2] == past,
            };
            if !ok {
                return Err(Error::invalid(format!(
                    "forward_from: layer {l} has cached keys {seen:?}, expected {past} past position(s) for {b} row(s)"
                )));
            }
        }
        let positions: Vec<Vec<u32>> = vec![(past as u32..(past + t) as u32).collect(); b];
        let (cos, sin) = self.rope.cos_sin(&positions, &self.device)?;
        let attn_mask = AttnMask { past, t, key_valid: None };
        let mask = if opt.grad && t > 1 { Some(attn_mask.additive(b, &self.device)?) } else { None };
        let ctx = BlockCtx { cos: &cos, sin: &sin, mask: mask.as_ref(), attn_mask: &attn_mask };
        self.run_blocks(x, layers, &ctx, cache, hooks, opt)
    }

    /// Blocks `layers` in order, honouring skipped blocks.
    fn run_blocks(
        &self,
        mut x: Tensor,
        layers: std::ops::Range<usize>,
        ctx: &BlockCtx,
        mut cache: Option<&mut KvCache>,
        hooks: &mut Hooks,
        opt: Fwd,
    ) -> Result<Tensor> {
        for l in layers {
            x = hooks.site(HookPoint::ResidPre(l), x)?;
            if hooks.skips(l) {
                x = hooks.site(HookPoint::ResidPost(l), x)?;
                continue;
            }
            let layer_cache = cache.as_deref_mut().map(|c| &mut c.layers[l]);
            x = self.block(l, &self.blocks[l], x, ctx.cos, ctx.sin, ctx.mask, ctx.attn_mask, layer_cache, hooks, opt)?;
        }
        Ok(x)
    }

    #[allow(clippy::too_many_arguments)]
    fn block(
        &self,
        l: usize,
        blk: &Block,
        resid_pre: Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        attn_mask: &AttnMask,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        hooks: &mut Hooks,
        opt: Fwd,
    ) -> Result<Tensor> {
        let grad = opt.grad;
        let (b, t, _) = resid_pre.dims3()?;
        let hd = self.cfg.head_dim;
        let h = self.rms_norm(&resid_pre, &blk.attn_norm, grad)?;
        // Head counts come from the weights, so per-layer pruned models run unchanged.
        let n_q = blk.q.out_features() / hd;
        let n_kv = blk.k.out_features() / hd;
        let q = blk.q.forward(&h, opt)?.reshape((b, t, n_q, hd))?.transpose(1, 2)?;
        let k = blk.k.forward(&h, opt)?.reshape((b, t, n_kv, hd))?.transpose(1, 2)?;
        let v = blk.v.forward(&h, opt)?.reshape((b, t, n_kv, hd))?.transpose(1, 2)?.contiguous()?;
        let q = rope::apply(&q, cos, sin, grad)?;
        let k = rope::apply(&k, cos, sin, grad)?;
        let (k, v) = match cache {
            Some(slot) => {
                let kv = match slot.take() {
                    Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
                    None => (k, v),
                };
                *slot = Some(kv.clone());
                kv
            }
            None => (k, v),
        };
        let total = k.dim(2)?;
        let g = n_q / n_kv;
        // Grouped-query attention without copying k/v: view the g query heads of each kv head
        // as extra rows, [b, n_kv, g*t, hd] @ [b, n_kv, hd, total].
        let qg = q.contiguous()?.reshape((b, n_kv, g * t, hd))?;
        let scale = 1.0 / (hd as f64).sqrt();
        let scores = qg.matmul(&k.t()?.contiguous()?)?.reshape((b, n_kv, g, t, total))?;
        let probs = if grad {
            let scores = (scores * scale)?;
            let scores = match mask {
                Some(m) => scores.broadcast_add(m)?,
                None => scores,
            };
            candle_nn::ops::softmax(&scores, D::Minus1)?
        } else {
            masked_softmax(&scores, scale, attn_mask.clone())?
        };
        let z = probs.reshape((b, n_kv, g * t, total))?.matmul(&v)?; // [b, n_kv, g*t, hd]
        let z = z.reshape((b, n_q, t, hd))?.transpose(1, 2)?.contiguous()?; // [b, t, n_q, hd]
        let z = hooks.site(HookPoint::AttnZ(l), z)?;
        let attn_out = blk.o.forward(&z.reshape((b, t, n_q * hd))?, opt)?;
        let attn_out = hooks.site(HookPoint::AttnOut(l), attn_out)?;
        let resid_mid = hooks.site(HookPoint::ResidMid(l), (resid_pre + attn_out)?)?;

        let h = self.rms_norm(&resid_mid, &blk.mlp_norm, grad)?;
        let (gate, up) = (blk.gate.forward(&h, opt)?, blk.up.forward(&h, opt)?);
        let post = if grad { (candle_nn::ops::silu(&gate)? * up)? } else { super::swiglu::silu_mul(&gate, &up)? };
        let post = hooks.site(HookPoint::MlpPost(l), post)?;
        let mlp_out = hooks.site(HookPoint::MlpOut(l), blk.down.forward(&post, opt)?)?;
        hooks.site(HookPoint::ResidPost(l), (resid_mid + mlp_out)?)
    }
}
