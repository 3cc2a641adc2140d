//! Additive steering on the real SmolLM2-135M-Instruct with a happiness − sadness direction
//! (difference of means of last-token resid_post over the shared sentiment scenarios), and the
//! `mechc eval steer` command's output and bad-input errors.
//!
//! Needs $MECHC_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf (default cache: <repo>/.cache) and
//! the shared data; the model tests are skipped with a message when the model is missing.

mod common;


use mechc::verify::steer::{self, SteerMetric, SteerOpts};

const LAYER: usize = 15; // the middle of SmolLM2's 30 layers
const N: usize = 32; // prompts per set for the direction

fn sentiment(name: &str) -> Vec<String> {
    let p = common::shared_data().join(format!("prompts/sentiment/{name}.json"));
    serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
}

/// Direction from the first N scenarios of each set; the sweep runs on 48 held-out ones (the
/// next 24 of each set) followed by " I feel", so that " happy" / " sad" are natural next tokens
/// (after the bare scenario, which ends in a full stop, p(" happy") ≈ 2e-7 and its trend is noise).
/// Coefficients are in units of the unnormalised mean difference (‖v‖ ≈ 22.9 at layer 15).
/// Measured on SmolLM2-135M-Instruct (Q4_1 import), c = −2, −1, −0.5, 0, 0.5, 1, 2:
///   log p(" happy")  −9.57 −8.31 −7.72 −7.19 −6.75 −6.48 −6.30
///   p(" sad")        .0013 .0028 .0034 .0033 .0023 .0011 .0002
///   projection (last layer)  −12.2 7.4 18.6 30.8 43.8 56.6 76.7
///   KL mean          1.28 0.36 0.088 0 0.076 0.28 0.79
/// With " It makes me feel" instead, p(" happy") peaks at c = 1 and falls at c = 2 (KL 1.8):
/// over-steering, which is why the assertions stop at c = 2 and this suffix is not used.
#[test]
fn happiness_direction_steers_monotonically() {
    let Some(model_path) = common::registry_model(common::SMOLLM2) else { return };
    std::env::set_var("MECHC_CACHE", common::cache());
    let loaded = mechc::io::load(&model_path, false).unwrap();
    let (model, tok) = (&loaded.model, loaded.tok().unwrap());
    let (happy, sad) = (sentiment("happiness"), sentiment("sadness"));
    let v = steer::mean_diff_direction(model, tok, &happy[..N], &sad[..N], LAYER, false).unwrap();
    let held_out: Vec<String> = happy[N..N + 24].iter().chain(&sad[N..N + 24]).map(|s| format!("{s} I feel")).collect();
    let prompts: Vec<Vec<u32>> = held_out.iter().map(|t| tok.prompt_ids(t, false).unwrap()).collect();
    let coeffs = vec![-2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0];
    let opts = SteerOpts {
        layer: LAYER,
        measure_layer: None,
        coeffs: coeffs.clone(),
        metric: SteerMetric::Target,
        targets: steer::target_tokens(tok, &[" happy".to_string(), " sad".to_string()]).unwrap(),
        normalize: false,
        batch: 16,
    };
    let r = steer::steer_sweep(model, &prompts, &v, &opts, |_, _| {}).unwrap();
    eprintln!("‖v‖ = {:.3} at layer {LAYER}", r.direction_norm);
    for p in &r.points {
        eprintln!(
            "c {:>5}: projection {:>9.4}  p(happy) {:.5} (lp {:.3})  p(sad) {:.5}  KL {:.4} (max {:.4})",
            p.coeff, p.projection, p.targets[0].prob, p.targets[0].logprob, p.targets[1].prob, p.kl_mean, p.kl_max
        );
    }
    // Coefficient 0 is the unsteered model: KL exactly 0.
    let zero = &r.points[3];
    assert_eq!((zero.coeff, zero.kl_mean, zero.kl_max), (0.0, 0.0, 0.0));
    // KL grows with |c| on both sides.
    for w in [[3, 2, 1, 0], [3, 4, 5, 6]] {
        for k in w.windows(2) {
            assert!(r.points[k[1]].kl_mean > r.points[k[0]].kl_mean, "KL not increasing from c={} to c={}", coeffs[k[0]], coeffs[k[1]]);
        }
    }
    // The projection at the last layer increases with the coefficient.
    for k in 1..r.points.len() {
        assert!(r.points[k].projection > r.points[k - 1].projection, "projection not increasing at c={}", coeffs[k]);
    }
    // " happy" becomes more likely as c grows, over the whole range.
    let lp = |k: usize| r.points[k].targets[0].logprob;
    for k in 1..r.points.len() {
        assert!(lp(k) > lp(k - 1), "log p(' happy') not rising from c={} to c={}", coeffs[k - 1], coeffs[k]);
    }
    // And, for c > 0, more likely relative to " sad".
    let odds = |k: usize| lp(k) - r.points[k].targets[1].logprob;
    assert!(odds(4) > odds(3) && odds(5) > odds(4) && odds(6) > odds(5), "happy/sad log-odds not rising with c > 0");
    // The score of the target metric is the mean over the two targets.
    assert!((r.points[5].score - (lp(5) + r.points[5].targets[1].logprob) / 2.0).abs() < 1e-12);

    // The same sweep through the binary, from a direction file: c = 0 equals the unsteered
    // numbers (the projection with no steering computed by the library above).
    let d = tempfile::tempdir().unwrap();
    let dir_file = d.path().join("happy.safetensors");
    steer::save_direction(&dir_file, "happiness", &v).unwrap();
    let prompts_file = d.path().join("held_out.json");
    std::fs::write(&prompts_file, serde_json::to_string(&held_out).unwrap()).unwrap();
    let out = common::mechc()
        .args(["eval", "steer", "--model", model_path.to_str().unwrap(), "--direction", dir_file.to_str().unwrap()])
        .args(["--layer", &LAYER.to_string(), "--coeffs", "-1,0,1", "--prompts", prompts_file.to_str().unwrap()])
        .args(["--metric", "target", "--target", " happy", "--json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pts = j["report"]["points"].as_array().unwrap();
    assert_eq!(pts.len(), 3);
    assert_eq!(pts[1]["kl_mean"].as_f64().unwrap(), 0.0);
    let close = |a: &serde_json::Value, b: f64| (a.as_f64().unwrap() - b).abs() < 1e-4;
    assert!(close(&pts[1]["projection"], zero.projection), "{} vs {}", pts[1]["projection"], zero.projection);
    assert!(close(&pts[1]["targets"][0]["logprob"], zero.targets[0].logprob));
    assert!(close(&pts[2]["targets"][0]["logprob"], r.points[5].targets[0].logprob));
    assert!(close(&pts[0]["projection"], r.points[1].projection));
}

#[test]
fn bad_directions_and_arguments() {
    let Some(model) = common::registry_model(common::SMOLLM2) else { return };
    let d = tempfile::tempdir().unwrap();
    let dev = candle_core::Device::Cpu;
    let wrong = d.path().join("wrong.safetensors");
    steer::save_direction(&wrong, "dir", &candle_core::Tensor::ones(100, candle_core::DType::F32, &dev).unwrap()).unwrap();
    let right = d.path().join("right.safetensors");
    steer::save_direction(&right, "dir", &candle_core::Tensor::ones(576, candle_core::DType::F32, &dev).unwrap()).unwrap();
    let prompts = d.path().join("p.json");
    std::fs::write(&prompts, r#"["You find a lost puppy.", "It rains all day."]"#).unwrap();
    let m = model.to_str().unwrap();
    let run = |dir: String, extra: &[&str]| {
        let mut c = common::mechc();
        c.args(["eval", "steer", "--model", m, "--direction", &dir, "--prompts", prompts.to_str().unwrap()]);
        if !extra.contains(&"--layer") {
            c.args(["--layer", "3"]);
        }
        c.args(extra);
        c
    };
    let w = wrong.to_str().unwrap().to_string();
    let r = right.to_str().unwrap().to_string();
    common::fails(&mut run(w.clone(), &[]), &["wrong.safetensors", "[100]", "[576]"]);
    common::fails(&mut run(format!("{r}:nope"), &[]), &["right.safetensors", "`nope`", "dir"]);
    common::fails(&mut run(r.clone(), &["--layer", "30"]), &["30", "layers"]);
    common::fails(&mut run(r.clone(), &["--metric", "target"]), &["--target"]);
    common::fails(&mut run("/nonexistent/v.safetensors".into(), &[]), &["/nonexistent/v.safetensors"]);
    let mut c = common::mechc();
    c.args(["eval", "steer", "--model", m, "--direction", &r, "--layer", "3", "--prompts"]);
    c.arg(format!("{}:text", prompts.display()));
    common::fails(&mut c, &["p.json", "`text`"]);
}
