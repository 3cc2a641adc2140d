//! Rotary position embeddings with HF semantics (`rotate_half` layout, `rope_scaling` llama3),
//! computed in f32 the way transformers computes them.

use candle_core::{Device, Tensor};

use super::config::{ModelConfig, RopeScaling};
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct Rope {
    /// Inverse frequencies, head_dim / 2 of them.
    pub inv_freq: Vec<f32>,
}

impl Rope {
    pub fn new(cfg: &ModelConfig) -> Self {
        let d = cfg.head_dim;
        // transformers: 1.0 / (base ** (arange(0, d, 2).float() / d)) in float32.
        let base = cfg.rope_theta as f32;
        let mut inv_freq: Vec<f32> = (0..d).step_by(2).map(|i| 1.0f32 / base.powf(i as f32 / d as f32)).collect();
        if let Some(RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings }) =
            &cfg.rope_scaling
        {
            let (factor, lf, hf, old) =
                (*factor as f32, *low_freq_factor as f32, *high_freq_factor as f32, *original_max_position_embeddings as f32);
            let low_wavelen = old / lf;
            let high_wavelen = old / hf;
            for f in inv_freq.iter_mut() {
                let wavelen = 2.0 * std::f32::consts::PI / *f;
                *f = if wavelen > low_wavelen {
                    *f / factor
                } else if wavelen < high_wavelen {
                    *f
                } else {
                    let smooth = (old / wavelen - lf) / (hf - lf);
                    (1.0 - smooth) * *f / factor + smooth * *f
                };
            }
        }
        Rope { inv_freq }
    }

    /// cos and sin of shape [b, t, head_dim/2] for the given positions ([b][t]).
    pub fn cos_sin(&self, positions: &[Vec<u32>], device: &Device) -> Result<(Tensor, Tensor)> {
        let b = positions.len();
        let t = positions.first().map_or(0, |p| p.len());
        let h = self.inv_freq.len();
        let mut cos = Vec::with_capacity(b * t * h);
        let mut sin = Vec::with_capacity(b * t * h);
        for row in positions {
            for &p in row {
                for &f in &self.inv_freq {
                    let a = p as f32 * f;
                    cos.push(a.cos());
                    sin.push(a.sin());
                }
            }
        }
        Ok((Tensor::from_vec(cos, (b, t, h), device)?, Tensor::from_vec(sin, (b, t, h), device)?))
    }
}

/// Apply RoPE to x [b, heads, t, d] with cos/sin [b, t, d/2]. `grad` selects the composed
/// (differentiable) form; otherwise candle's fused kernel, which has no backward.
pub fn apply(x: &Tensor, cos: &Tensor, sin: &Tensor, grad: bool) -> Result<Tensor> {
    if !grad {
        return Ok(candle_nn::rotary_emb::rope(&x.contiguous()?, cos, sin)?);
    }
    let d = x.dim(3)?;
    let half = d / 2;
    let cos = cos.unsqueeze(1)?; // [b, 1, t, d/2]
    let sin = sin.unsqueeze(1)?;
    let x1 = x.narrow(3, 0, half)?;
    let x2 = x.narrow(3, half, half)?;
    let r1 = (x1.broadcast_mul(&cos)? - x2.broadcast_mul(&sin)?)?;
    let r2 = (x2.broadcast_mul(&cos)? + x1.broadcast_mul(&sin)?)?;
    Ok(Tensor::cat(&[r1, r2], 3)?)
}
