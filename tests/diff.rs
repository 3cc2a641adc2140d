//! `mechc diff` end to end on stories260K: a model against itself is exactly unchanged; against a
//! perturbed copy every number moves the way it must, and the JSON matches the library's view.

mod common;

use std::path::{Path, PathBuf};

use serde_json::Value;

fn stories_prompts(dir: &Path) -> PathBuf {
    let p = dir.join("prompts.json");
    let prompts = ["Once upon a time", "The cat sat on the", "Lily wanted to play with her", "One day, a little boy", "The sun was"];
    std::fs::write(&p, serde_json::to_string(&prompts).unwrap()).unwrap();
    p
}

fn diff_json(a: &Path, b: &Path, prompts: &Path) -> Value {
    let text = common::shared_data().join("text/tinystories-subset.txt");
    let out = common::mechc()
        .arg("diff")
        .args([a, b])
        .arg("--prompts")
        .arg(prompts)
        .arg("--text")
        .arg(&text)
        .args(["--tokens", "600", "--seq-len", "128", "--top", "3", "--gen-tokens", "8", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn self_diff_is_exactly_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = stories_prompts(tmp.path());
    let g = common::stories_gguf();
    let j = diff_json(&g, &g, &prompts);
    let p = &j["prompts"]["result"];
    for k in ["all", "first"] {
        assert_eq!(p[k]["kl_max"].as_f64(), Some(0.0), "{k}");
        assert_eq!(p[k]["top1_agreement"].as_f64(), Some(1.0), "{k}");
    }
    assert_eq!(p["moved"].as_array().unwrap().len(), 0, "nothing moved");
    let t = &j["text"]["result"];
    assert_eq!(t["perplexity_a"], t["perplexity_b"], "identical perplexities");
    assert_eq!(t["all"]["kl_max"].as_f64(), Some(0.0));
    // Same perplexity as `eval perplexity` with the same settings (disjoint windows).
    let out = common::mechc()
        .args(["eval", "perplexity", "--model"])
        .arg(&g)
        .arg("--text")
        .arg(common::shared_data().join("text/tinystories-subset.txt"))
        .args(["--tokens", "600", "--seq-len", "128", "--json"])
        .output()
        .unwrap();
    let e: Value = serde_json::from_slice(&out.stdout).unwrap();
    let (a, b) = (e["perplexity"].as_f64().unwrap(), t["perplexity_a"].as_f64().unwrap());
    assert!((a - b).abs() < 1e-9 * a, "{a} vs {b}");
    assert_eq!(j["a"]["parameters"], j["b"]["parameters"]);
}

#[test]
fn perturbed_model_moves() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = stories_prompts(tmp.path());
    let src = tmp.path().join("src");
    mechc::io::gguf::import(&common::stories_gguf(), &src, candle_core::DType::F32, false, false).unwrap();
    // Scale one MLP's output projection: a real behaviour change with the same shapes.
    let mut loaded = mechc::io::load(&src, false).unwrap();
    let down = &mut loaded.model.blocks[2].down;
    *down = mechc::model::decoder::Linear::new(&(down.w() * 3.0).unwrap(), None).unwrap();
    let dst = tmp.path().join("dst");
    std::fs::create_dir(&dst).unwrap();
    mechc::io::hf::save_model(&loaded.model, &dst, candle_core::DType::F32, &Default::default()).unwrap();
    for f in ["tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let j = diff_json(&src, &dst, &prompts);
    let p = &j["prompts"]["result"];
    assert!(p["all"]["kl_mean"].as_f64().unwrap() > 1e-3, "{}", p["all"]);
    assert!(p["all"]["top1_agreement"].as_f64().unwrap() < 1.0);
    let moved = p["moved"].as_array().unwrap();
    assert_eq!(moved.len(), 3);
    let kls: Vec<f64> = moved.iter().map(|m| m["kl_first"].as_f64().unwrap()).collect();
    assert!(kls.windows(2).all(|w| w[0] >= w[1]), "{kls:?}");
    // The top moved prompt is the per-prompt maximum.
    let max = p["per_prompt"].as_array().unwrap().iter().map(|d| d["kl_first"].as_f64().unwrap()).fold(0.0, f64::max);
    assert_eq!(kls[0], max);
    assert_eq!(p["first"]["kl_max"].as_f64().unwrap(), max);
    let t = &j["text"]["result"];
    assert_ne!(t["perplexity_a"], t["perplexity_b"]);
    assert!(t["all"]["kl_mean"].as_f64().unwrap() > 0.0);
}

#[test]
fn report_and_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let prompts = stories_prompts(tmp.path());
    let g = common::stories_gguf();
    let report = tmp.path().join("r.html");
    common::mechc().arg("diff").args([&g, &g]).arg("--prompts").arg(&prompts).arg("--report").arg(&report).assert().success();
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains("<svg") && html.contains("top-1 agreement"));
    // Neither prompts nor text; a field on a list of strings: one-line errors, no report.
    let out = common::mechc().arg("diff").args([&g, &g]).output().unwrap();
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--prompts"));
    let bad = tmp.path().join("r2.html");
    let out = common::mechc()
        .arg("diff")
        .args([&g, &g])
        .arg("--prompts")
        .arg(format!("{}:instruction", prompts.display()))
        .arg("--report")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not objects") && err.trim().lines().count() == 1, "{err}");
    assert!(!bad.exists());
}
