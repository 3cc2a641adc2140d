//! RMSNorm for the inference forward: y = x · (mean(x²) + eps)^-½ · w per row, as transformers'
//! `LlamaRMSNorm` computes it, with the mean of squares accumulated in f64. candle's fused
//! kernel sums the squares sequentially in f32: a relative error of ~1e-6 in every row's scale,
//! which the massive activations of the first positions amplify layer after layer (a head-pruned
//! SmolLM2 with folded o_proj biases ended 4.7× further from an f64 forward than transformers'
//! f32 one). No backward: the gradient mode uses the composed ops.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

struct RmsNorm {
    eps: f64,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm-f64-sum"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::op_input(s1, l1, "rms-norm", "input")?;
        let w = super::op_input(s2, l2, "rms-norm", "weight")?;
        let n = w.len();
        if l1.shape().dims().last() != Some(&n) {
            candle_core::bail!("rms-norm: input {:?} vs weight of {n}", l1.shape());
        }
        let eps = self.eps;
        let row = |(d, s): (&mut [f32], &[f32])| {
            // Four accumulators: independent chains the compiler can overlap; squares of f32 are
            // exact in f64.
            let mut acc = [0f64; 4];
            let chunks = s.chunks_exact(4);
            let rest: f64 = chunks.remainder().iter().map(|&v| f64::from(v) * f64::from(v)).sum();
            for c in chunks {
                for (a, &v) in acc.iter_mut().zip(c) {
                    *a += f64::from(v) * f64::from(v);
                }
            }
            let ms = (acc.iter().sum::<f64>() + rest) / n as f64;
            let inv = (1.0 / (ms + eps).sqrt()) as f32;
            for ((d, &s), &w) in d.iter_mut().zip(s).zip(w) {
                *d = s * inv * w;
            }
        };
        let mut dst = vec![0f32; x.len()];
        if x.len() <= 32 * n {
            dst.chunks_mut(n).zip(x.chunks(n)).for_each(row);
        } else {
            dst.par_chunks_mut(n).zip(x.par_chunks(n)).for_each(row);
        }
        Ok((CpuStorage::F32(dst), l1.shape().clone()))
    }
}

/// RMSNorm of `x` [..., d] (f32) with weight `w` [d] over the last axis.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &RmsNorm { eps })
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Every element within 2 ulps of the f64 computation, for rows of any scale (the first
        /// rows of real models reach |x| ~ 1e3 next to entries ~ 1e-2) and row counts on both
        /// sides of the parallel threshold.
        #[test]
        fn equals_the_f64_computation(rows in 1usize..48, d in 1usize..80, scale in -3f64..3.0, seed in any::<u64>()) {
            use rand::{Rng, SeedableRng};
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let x: Vec<f32> = (0..rows * d).map(|_| (rng.gen_range(-1.0..1.0) * 10f64.powf(scale + rng.gen_range(-2.0..0.0))) as f32).collect();
            let w: Vec<f32> = (0..d).map(|_| rng.gen_range(-2.0..2.0) as f32).collect();
            let eps = 1e-5;
            let dev = Device::Cpu;
            let y = super::rms_norm(&Tensor::from_vec(x.clone(), (rows, d), &dev).unwrap(), &Tensor::from_vec(w.clone(), d, &dev).unwrap(), eps).unwrap();
            let y = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for r in 0..rows {
                let s = &x[r * d..(r + 1) * d];
                let ms = s.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / d as f64;
                let inv = 1.0 / (ms + eps).sqrt();
                for j in 0..d {
                    let exact = f64::from(s[j]) * inv * f64::from(w[j]);
                    let got = f64::from(y[r * d + j]);
                    prop_assert!((got - exact).abs() <= 2.0 * f64::from(f32::EPSILON) * exact.abs() + 1e-30,
                        "row {r} col {j}: {got} vs {exact}");
                }
            }
        }
    }

    #[test]
    fn refuses_a_weight_of_another_width() {
        let dev = Device::Cpu;
        let err = super::rms_norm(&Tensor::ones((2, 4), candle_core::DType::F32, &dev).unwrap(), &Tensor::ones(3, candle_core::DType::F32, &dev).unwrap(), 1e-5);
        assert!(err.unwrap_err().to_string().contains("weight of 3"));
    }
}
