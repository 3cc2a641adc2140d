//! The logit lens on SmolLM2-135M: its last row is the model's own next-token distribution.
//! Skips (with a message) if the model file is missing.

use std::path::PathBuf;

use candle_core::IndexOp;
use mechc::locate::logit_lens::logit_lens;
use mechc::model::decoder::Fwd;
use mechc::runtime::{Batch, Hooks};

#[test]
fn last_layer_of_the_lens_is_the_models_prediction() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !path.exists() {
        eprintln!("SKIPPED: {} is missing", path.display());
        return;
    }
    if std::env::var_os("MECHC_CACHE").is_none() {
        std::env::set_var("MECHC_CACHE", PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache"));
    }
    let loaded = mechc::io::load(&path, false).unwrap();
    let tok = loaded.tok().unwrap();
    let ids = tok.prompt_ids("The capital of France is", false).unwrap();
    let target = tok.encode(" Paris", false).unwrap()[0];
    let rows = logit_lens(&loaded.model, &ids, ids.len() - 1, target, 5).unwrap();
    assert_eq!(rows.len(), loaded.model.blocks.len() + 1, "embed + one row per block");

    // A plain forward, no hooks: the next-token distribution at the last position.
    let logits = loaded
        .model
        .forward(&Batch::single(&ids), None, &mut Hooks::new(), Fwd::default())
        .unwrap();
    let row = logits.i((0, ids.len() - 1)).unwrap().to_vec1::<f32>().unwrap();
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = row.iter().map(|&x| (x as f64 - max).exp()).sum();
    let p_model = (row[target as usize] as f64 - max).exp() / z;
    let argmax = (0..row.len()).max_by(|&a, &b| row[a].total_cmp(&row[b])).unwrap() as u32;
    let last = rows.last().unwrap();
    eprintln!(
        "p(\" Paris\"): lens last layer {:.6}, model {:.6}; ranks {:?}",
        last.prob,
        p_model,
        rows.iter().map(|r| r.rank).collect::<Vec<_>>()
    );
    assert!((last.prob - p_model).abs() < 1e-5, "lens {} vs model {}", last.prob, p_model);
    assert_eq!(last.rank, 0);
    assert_eq!(argmax, target, "the model's own top token");
    assert_eq!(last.top[0].0, target);
    // Early layers do not yet predict it (the lens shows the answer forming, not a copy of the output).
    assert!(rows[1].rank > 0 && rows[1].prob < last.prob);
    let sum: f64 = last.top.iter().map(|t| t.1).sum();
    assert!(sum <= 1.0 + 1e-9 && last.top.windows(2).all(|w| w[0].1 >= w[1].1));
}
