//! llama.cpp control vectors (`--control-vector FILE`, repeng's `export_gguf`): a GGUF with
//! `general.architecture = "controlvector"`, `controlvector.model_hint`, `controlvector.layer_count`
//! and one F32 1-D tensor `direction.N` per steered block.
//!
//! The layer convention, as llama.cpp's loader (`common_control_vector_load_one`) and graph
//! builders (`build_cvec(cur, il)` after block `il`'s residual add) implement it: `direction.N`
//! is added to the output of the 0-based block N, i.e. to `blocks.N.hook_resid_post`.
//! `direction.0` makes llama.cpp reject the whole file ("invalid (zero) direction tensor layer
//! index"), so the output of block 0 cannot be steered through a control vector.
//! `controlvector.layer_count` is the number of direction tensors, as repeng writes it.

use std::io::Cursor;
use std::path::Path;

use candle_core::quantized::gguf_file::{self, Value};
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// One steering vector: added to the output of 0-based block `block`.
pub struct Direction {
    pub block: usize,
    pub values: Vec<f32>,
}

/// The GGUF bytes of a control vector. Errors on block 0, duplicate blocks, unequal lengths or
/// non-finite values (llama.cpp would reject or silently misapply them).
pub fn to_bytes(model_hint: &str, dirs: &[Direction]) -> Result<Vec<u8>> {
    let Some(first) = dirs.first() else {
        return Err(Error::invalid("a control vector needs at least one direction"));
    };
    let n_embd = first.values.len();
    let mut blocks = std::collections::BTreeSet::new();
    for d in dirs {
        if d.block == 0 {
            return Err(Error::invalid(
                "llama.cpp control vectors cannot steer the output of block 0 (`direction.0` is invalid there)",
            ));
        }
        if !blocks.insert(d.block) {
            return Err(Error::invalid(format!("two control-vector directions for block {}", d.block)));
        }
        if d.values.len() != n_embd || n_embd == 0 {
            return Err(Error::invalid("control-vector directions must all have d_model (> 0) values"));
        }
        if d.values.iter().any(|x| !x.is_finite()) {
            return Err(Error::invalid(format!(
                "control-vector direction for block {} has non-finite values",
                d.block
            )));
        }
    }
    let mut tensors = vec![];
    for d in dirs {
        let t = Tensor::from_slice(&d.values, n_embd, &Device::Cpu)?;
        tensors.push((format!("direction.{}", d.block), QTensor::quantize(&t, GgmlDType::F32)?));
    }
    tensors.sort_by_key(|(n, _)| n.trim_start_matches("direction.").parse::<usize>().unwrap_or(0));
    let arch = Value::String("controlvector".into());
    let hint = Value::String(model_hint.into());
    let count = Value::U32(dirs.len() as u32);
    let meta: Vec<(&str, &Value)> = vec![
        ("general.architecture", &arch),
        ("controlvector.model_hint", &hint),
        ("controlvector.layer_count", &count),
    ];
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut buf = Cursor::new(Vec::new());
    gguf_file::write(&mut buf, &meta, &refs)?;
    Ok(buf.into_inner())
}

/// Write a control vector atomically (temporary sibling, then rename).
pub fn write(path: &Path, model_hint: &str, dirs: &[Direction]) -> Result<()> {
    crate::io::atomic::write_file(path, &to_bytes(model_hint, dirs)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::gguf::Gguf;

    #[test]
    fn reads_back_with_llama_cpp_keys_and_names() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cv.gguf");
        let a: Vec<f32> = (0..8).map(|i| i as f32 * 0.25 - 1.0).collect();
        let b: Vec<f32> = (0..8).map(|i| (i as f32).sin()).collect();
        write(
            &p,
            "llama",
            &[
                Direction {
                    block: 5,
                    values: a.clone(),
                },
                Direction {
                    block: 2,
                    values: b.clone(),
                },
            ],
        )
        .unwrap();
        let g = Gguf::open(&p).unwrap();
        assert_eq!(g.str("general.architecture").unwrap(), "controlvector");
        assert_eq!(g.str("controlvector.model_hint").unwrap(), "llama");
        assert_eq!(g.u64("controlvector.layer_count").unwrap(), 2);
        let mut names: Vec<&String> = g.content.tensor_infos.keys().collect();
        names.sort();
        assert_eq!(names, ["direction.2", "direction.5"]);
        for (n, want) in [("direction.5", &a), ("direction.2", &b)] {
            let info = &g.content.tensor_infos[n];
            assert_eq!(info.ggml_dtype, GgmlDType::F32);
            assert_eq!(info.shape.dims(), [8]);
            assert_eq!(&g.tensor(n).unwrap().to_vec1::<f32>().unwrap(), want);
        }
    }

    #[test]
    fn refuses_what_llama_cpp_would_reject() {
        let v = vec![1.0f32; 4];
        let e = to_bytes(
            "llama",
            &[Direction {
                block: 0,
                values: v.clone(),
            }],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("block 0"), "{e}");
        let e = to_bytes(
            "llama",
            &[
                Direction {
                    block: 1,
                    values: v.clone(),
                },
                Direction {
                    block: 1,
                    values: v.clone(),
                },
            ],
        );
        assert!(e.unwrap_err().to_string().contains("two"));
        let e = to_bytes(
            "llama",
            &[
                Direction { block: 1, values: v },
                Direction {
                    block: 2,
                    values: vec![1.0; 3],
                },
            ],
        );
        assert!(e.unwrap_err().to_string().contains("d_model"));
        assert!(to_bytes(
            "llama",
            &[Direction {
                block: 1,
                values: vec![f32::NAN]
            }]
        )
        .is_err());
        assert!(to_bytes("llama", &[]).is_err());
    }
}
