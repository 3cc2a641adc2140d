//! x Wᵀ for a single row x (one token: every step of decoding), with W [out, in] as stored.
//! Each output is a dot product of x with one contiguous row of W, so the whole weight streams
//! through memory once, split by rows across the rayon pool. gemm's general kernels pack and
//! tile for many rows; for one row that costs (with its AVX-512 kernels, decoding SmolLM2 fell
//! from 51 to 41 tokens/s). Sixteen f32 accumulators per dot product: independent chains the
//! compiler vectorises, and a shorter summation than one sequential chain.

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use rayon::prelude::*;

struct MatVec;

/// Output rows per parallel task.
const ROWS: usize = 64;
const LANES: usize = 16;

fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..LANES {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

impl CustomOp2 for MatVec {
    fn name(&self) -> &'static str {
        "matvec"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let x = super::op_input(s1, l1, "matvec", "input")?;
        let w = super::op_input(s2, l2, "matvec", "weight")?;
        let (out, k) = l2.shape().dims2()?;
        if x.len() != k {
            candle_core::bail!("matvec: input {:?} vs weight {:?}", l1.shape(), l2.shape());
        }
        let mut y = vec![0f32; out];
        y.par_chunks_mut(ROWS).zip(w.par_chunks(ROWS * k)).for_each(|(y, w)| {
            for (y, row) in y.iter_mut().zip(w.chunks_exact(k)) {
                *y = dot(x, row);
            }
        });
        let mut dims = l1.shape().dims().to_vec();
        *dims.last_mut().expect("input has a last axis") = out;
        Ok((CpuStorage::F32(y), Shape::from_dims(&dims)))
    }
}

/// x Wᵀ for x [.., k] holding a single row (f32) and W [out, k]: [.., out].
pub fn matvec(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&w.contiguous()?, &MatVec)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn equals_gemm_within_f32_rounding() {
        for (out, k) in [(1usize, 1usize), (3, 17), (65, 576), (200, 1536)] {
            let x: Vec<f32> = (0..k).map(|i| ((i * 31) % 97) as f32 / 97.0 - 0.5).collect();
            let w: Vec<f32> = (0..out * k).map(|i| ((i * 7919) % 1009) as f32 / 1009.0 - 0.5).collect();
            let x = Tensor::from_vec(x, (1, 1, k), &Device::Cpu).unwrap();
            let w = Tensor::from_vec(w, (out, k), &Device::Cpu).unwrap();
            let ours = super::matvec(&x, &w).unwrap();
            assert_eq!(ours.dims(), &[1, 1, out]);
            let exact = x.to_dtype(candle_core::DType::F64).unwrap().broadcast_matmul(&w.to_dtype(candle_core::DType::F64).unwrap().t().unwrap()).unwrap();
            let err = (ours.to_dtype(candle_core::DType::F64).unwrap() - exact).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f64>().unwrap();
            assert!(err < 1e-5, "{out}x{k}: {err}");
        }
    }

    #[test]
    fn refuses_more_than_one_row() {
        let x = Tensor::zeros((2, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((3, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        assert!(super::matvec(&x, &w).unwrap_err().to_string().contains("matvec"));
    }
}
