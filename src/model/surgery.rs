//! Structural model surgery shared by the pruning passes: keep some rows (output features) or
//! columns (input features) of a projection, fold what removed input features contribute into
//! the bias, and give projections zero biases so a config flag (`mlp_bias`, `attention_bias`)
//! can be switched on with the checkpoint staying consistent.

use candle_core::{DType, Device, Tensor};

use super::{Linear, Model, Proj};
use crate::error::Result;

/// Keep these rows (output features) of a projection, bias included.
pub fn keep_rows(lin: &Linear, keep: &[usize]) -> Result<Linear> {
    let idx = index(keep)?;
    let b = lin.b.as_ref().map(|b| b.index_select(&idx, 0)).transpose()?;
    Linear::new(&lin.w().index_select(&idx, 0)?, b)
}

/// Keep these columns (input features) of a projection; add `extra` to its bias (created if absent).
pub fn keep_cols(lin: &Linear, keep: &[usize], extra: Option<&Tensor>) -> Result<Linear> {
    let w = lin.w().index_select(&index(keep)?, 1)?;
    let b = match (&lin.b, extra) {
        (b, None) => b.clone(),
        (Some(b), Some(e)) => Some((b + e)?),
        (None, Some(e)) => Some(e.clone()),
    };
    Linear::new(&w, b)
}

/// W[:, cols] · values: what the removed input features `cols`, held at `values`, contribute.
pub fn folded(lin: &Linear, cols: &[usize], values: &[f32]) -> Result<Tensor> {
    let w = lin.w().index_select(&index(cols)?, 1)?;
    let v = Tensor::from_slice(values, (values.len(), 1), &Device::Cpu)?;
    Ok(w.matmul(&v)?.squeeze(1)?)
}

/// Indices as a u32 tensor, for `index_select`.
pub fn index(v: &[usize]) -> Result<Tensor> {
    Ok(Tensor::from_vec(v.iter().map(|&i| i as u32).collect::<Vec<u32>>(), v.len(), &Device::Cpu)?)
}

/// Complement of sorted `removed` in 0..n.
pub fn kept(n: usize, removed: &[usize]) -> Vec<usize> {
    (0..n).filter(|i| removed.binary_search(i).is_err()).collect()
}

/// Give every projection in `projs` of every layer a zero bias where it has none (so a config
/// flag such as `mlp_bias` can be switched on and the checkpoint stays consistent).
pub fn add_zero_biases(m: &mut Model, projs: &[Proj]) -> Result<()> {
    for b in &mut m.blocks {
        for &p in projs {
            let lin = b.proj_mut(p);
            if lin.b.is_none() {
                lin.b = Some(Tensor::zeros(lin.out_features(), DType::F32, &Device::Cpu)?);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_is_the_complement() {
        assert_eq!(kept(5, &[1, 3]), vec![0, 2, 4]);
        assert_eq!(kept(3, &[]), vec![0, 1, 2]);
    }

    #[test]
    fn folding_then_keeping_columns_preserves_the_output_at_the_held_values() {
        // W = [[1, 2, 3], [4, 5, 6]], b = [0.5, -0.5]; hold input 1 at 2.0 and remove it.
        let w = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], (2, 3), &Device::Cpu).unwrap();
        let lin = Linear::new(&w, Some(Tensor::from_vec(vec![0.5f32, -0.5], 2, &Device::Cpu).unwrap())).unwrap();
        let extra = folded(&lin, &[1], &[2.0]).unwrap();
        let out = keep_cols(&lin, &[0, 2], Some(&extra)).unwrap();
        assert_eq!(out.w().to_vec2::<f32>().unwrap(), vec![vec![1., 3.], vec![4., 6.]]);
        assert_eq!(out.b.unwrap().to_vec1::<f32>().unwrap(), vec![4.5, 9.5]);
        let rows = keep_rows(&lin, &[1]).unwrap();
        assert_eq!(rows.w().to_vec2::<f32>().unwrap(), vec![vec![4., 5., 6.]]);
        assert_eq!(rows.b.unwrap().to_vec1::<f32>().unwrap(), vec![-0.5]);
    }
}
