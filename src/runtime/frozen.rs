//! `x @ W` whose backward computes only the input gradient. candle's matmul backward always
//! computes the weight gradient too, even for weights nobody optimises, which tripled the cost
//! of a gradient step in our measurements (notes/stack.md).

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

struct FrozenMatmul {
    /// [in, out]
    wt: Tensor,
}

impl CustomOp1 for FrozenMatmul {
    fn name(&self) -> &'static str {
        "frozen-matmul"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = storage.as_slice::<f32>()?;
        let (start, end) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("frozen-matmul: input must be contiguous".into()))?;
        let x = Tensor::from_slice(&data[start..end], layout.shape(), &candle_core::Device::Cpu)?;
        let y = x.broadcast_matmul(&self.wt)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad_res.broadcast_matmul(&self.wt.t()?)?))
    }
}

/// `x @ wt` differentiable in `x` only. `x` is f32 [..., in], `wt` is f32 [in, out].
pub fn frozen_matmul(x: &Tensor, wt: &Tensor) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenMatmul { wt: wt.detach() })
}
