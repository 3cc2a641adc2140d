//! Sharded checkpoints (model-0000N-of-0000M.safetensors + index) load like a single file, and
//! weights stored as f16/bf16 are computed in f32.

mod common;

use std::collections::BTreeMap;

use candle_core::DType;
use mechc::model::decoder::Fwd;
use mechc::runtime::{Batch, Hooks};

#[test]
fn shards_and_half_precision_load() {
    let tmp = tempfile::tempdir().unwrap();
    let single = tmp.path().join("single");
    mechc::io::gguf::import(&common::stories_gguf(), &single, DType::F32, false, false).unwrap();
    let model = mechc::io::hf::load_model(&single).unwrap();
    let ids = [1u32, 403, 407, 261, 378, 30, 67];
    let logits = |m: &mechc::model::Model| m.forward(&Batch::single(&ids), None, &mut Hooks::new(), Fwd::default()).unwrap();
    let want = logits(&model);

    // Two shards and an index, written by hand the way transformers writes them.
    let sharded = tmp.path().join("sharded");
    std::fs::create_dir(&sharded).unwrap();
    std::fs::copy(single.join("config.json"), sharded.join("config.json")).unwrap();
    let tensors: Vec<(String, candle_core::Tensor)> = model.tensors().into_iter().map(|(r, t)| (r.hf_name(), t)).collect();
    let (a, b) = tensors.split_at(tensors.len() / 2);
    let mut map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let name = format!("model-0000{}-of-00002.safetensors", i + 1);
        mechc::io::st::write(&sharded.join(&name), part, &BTreeMap::new()).unwrap();
        for (t, _) in part.iter() {
            map.insert(t.clone(), name.clone().into());
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let got = logits(&mechc::io::hf::load_model(&sharded).unwrap());
    assert_eq!(common::max_abs_diff(&got, &want), 0.0);

    // An index naming a tensor its shard lacks is an error that names both.
    map.insert("model.norm.weight".into(), "model-00001-of-00002.safetensors".into());
    let index = serde_json::json!({"metadata": {}, "weight_map": map});
    std::fs::write(sharded.join("model.safetensors.index.json"), index.to_string()).unwrap();
    let err = mechc::io::hf::load_model(&sharded).err().expect("inconsistent index must fail").to_string();
    assert!(err.contains("model-00001-of-00002.safetensors") && err.contains("model.norm.weight"), "{err}");

    // f16 and bf16 storage: computed in f32, close to the f32 logits.
    for dt in [DType::F16, DType::BF16] {
        let dir = tmp.path().join(format!("{dt:?}"));
        mechc::io::gguf::import(&common::stories_gguf(), &dir, dt, false, false).unwrap();
        let loaded = mechc::io::load(&dir, false).unwrap();
        assert_eq!(loaded.stored_dtype, dt);
        let got = logits(&loaded.model);
        assert_eq!(got.dtype(), DType::F32);
        let tol = if dt == DType::F16 { 0.05 } else { 0.3 };
        assert!(common::max_abs_diff(&got, &want) < tol, "{dt:?}: {}", common::max_abs_diff(&got, &want));
    }
}
