#![allow(dead_code)]
//! Helpers shared by the integration tests.

use std::path::PathBuf;

use candle_core::Tensor;

/// `../shared/data` beside the project root, or `$MECHC_SHARED_DATA`.
pub fn shared_data() -> PathBuf {
    match std::env::var_os("MECHC_SHARED_DATA") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/data"),
    }
}

pub fn stories_gguf() -> PathBuf {
    shared_data().join("models/stories260K/stories260K.gguf")
}

/// Max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
}

/// Max |a − b| / (max |b| + 1e-6): a scale-free closeness measure.
pub fn rel_diff(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
    max_abs_diff(a, b) / (scale + 1e-6)
}
