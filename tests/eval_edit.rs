//! `mechc eval edit` on the real, unedited SmolLM2-135M-Instruct and CounterFact records, and
//! its bad-input errors. The per-record numbers are checked against transformers in
//! tests/interop/test_edit_eval.py; here: what an unedited model must look like, and that a
//! model compared with itself changes nothing.
//!
//! Needs $MECHC_CACHE/models/SmolLM2-135M-Instruct.Q4_1.gguf (default cache: <repo>/.cache) and
//! the shared data ($MECHC_SHARED_DATA, default ../shared/data); the model tests are skipped
//! with a message when the model is missing.

mod common;

use std::path::PathBuf;


fn counterfact() -> PathBuf {
    common::shared_data().join("prompts/counterfact/counterfact-edit.json")
}

fn run_json(args: &[&str]) -> serde_json::Value {
    let out = common::mechc().args(args).output().unwrap();
    assert!(out.status.success(), "mechc {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The unedited model on the first 100 CounterFact records (default records file, so this also
/// checks the $MECHC_SHARED_DATA default). Measured on SmolLM2-135M-Instruct (Q4_1 import):
/// ES 37%, PS 36%, NS 66%, Score 42.9; mean magnitudes −0.019 / −0.021 / +0.027. ROME reports
/// ES ≈ 20–25% for unedited GPT-2 XL: the new targets are counterfactual, so an unedited model
/// prefers them on only a minority of prompts; a small model is closer to a coin flip.
#[test]
fn unedited_model_rarely_prefers_the_counterfactual() {
    let Some(model) = common::registry_model(common::SMOLLM2) else { return };
    let r = run_json(&["eval", "edit", "--model", model.to_str().unwrap(), "--limit", "100", "--json"]);
    let m = &r["model"];
    assert_eq!(m["n"], 100);
    let rate = |k: &str| m[k]["rate"].as_f64().unwrap();
    let (es, ps, ns) = (rate("efficacy"), rate("paraphrase"), rate("neighbourhood"));
    eprintln!("unedited SmolLM2, 100 records: ES {es:.1} PS {ps:.1} NS {ns:.1} score {:.2}", m["score"]);
    assert!(es < 50.0, "an unedited model should prefer the true answer on most edit prompts (ES {es})");
    assert!(ps < 50.0, "PS {ps}");
    assert!(ns > 50.0, "the true answer should lead on most neighbourhood prompts (NS {ns})");
    // On average the true answer is more probable than the counterfactual one.
    assert!(m["efficacy"]["magnitude"].as_f64().unwrap() < 0.0);
    assert!(m["neighbourhood"]["magnitude"].as_f64().unwrap() > 0.0);
    // Records and flags are consistent with the per-record log-probs.
    let recs = m["records"].as_array().unwrap();
    let agree = recs.iter().filter(|x| x["efficacy"]["success"].as_bool().unwrap()).count();
    assert_eq!(agree as f64, es);
    for x in recs {
        let e = &x["efficacy"];
        let (n, t) = (e["new_logprob"].as_f64().unwrap(), e["true_logprob"].as_f64().unwrap());
        assert_eq!(e["success"].as_bool().unwrap(), n > t);
        assert!(n < 0.0 && t < 0.0);
    }
    // ROME's filter: on the records where the model does not already prefer the new target,
    // efficacy is 0 by construction; report how many remain (what an edit must flip).
    eprintln!("records an edit would have to flip: {} of 100", 100 - agree);
}

/// A model compared with itself: every delta is exactly 0 (same forward, same batching).
#[test]
fn source_equal_to_model_gives_zero_deltas() {
    let Some(model) = common::registry_model(common::SMOLLM2) else { return };
    let m = model.to_str().unwrap();
    let cf = counterfact();
    let r = run_json(&["eval", "edit", "--model", m, "--source", m, "--records", cf.to_str().unwrap(), "--ids", "0,4,7,13", "--json"]);
    assert_eq!(r["model"]["n"], 4);
    let ids: Vec<i64> = r["model"]["records"].as_array().unwrap().iter().map(|x| x["id"].as_i64().unwrap()).collect();
    assert_eq!(ids, [0, 4, 7, 13]);
    let d = &r["delta"];
    for k in ["efficacy", "paraphrase", "neighbourhood"] {
        assert_eq!(d[k]["rate"].as_f64().unwrap(), 0.0, "{k}");
        assert_eq!(d[k]["magnitude"].as_f64().unwrap(), 0.0, "{k}");
        assert_eq!((d[k]["gained"].as_u64().unwrap(), d[k]["lost"].as_u64().unwrap()), (0, 0));
    }
    assert_eq!(d["score"].as_f64().unwrap(), 0.0);
    for rec in d["records"].as_array().unwrap() {
        for k in ["efficacy", "paraphrase", "neighbourhood"] {
            assert_eq!(rec[k], serde_json::json!([0.0, 0.0]), "{rec}");
        }
    }
    // The human table prints both rows and the delta.
    let out = common::mechc().args(["eval", "edit", "--model", m, "--source", m, "--records", cf.to_str().unwrap(), "--limit", "3"]).output().unwrap();
    let s = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && s.contains("delta (model − source)") && s.contains("Neighbourhood"), "{s}");
}

#[test]
fn missing_record_field_is_a_one_line_error() {
    let Some(model) = common::registry_model(common::SMOLLM2) else { return };
    let d = tempfile::tempdir().unwrap();
    let recs = d.path().join("few.json");
    std::fs::write(&recs, r#"[{"case_id": 1, "prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris",
        "rephrase_prompt": "France's capital city is", "locality_prompt": "The capital of Germany is"}]"#)
    .unwrap();
    let (m, r) = (model.to_str().unwrap(), recs.to_str().unwrap());
    common::fails(common::mechc().args(["eval", "edit", "--model", m, "--records", r]), &["few.json", "locality_ground_truth", "missing"]);
    // A remapped field name that does not exist.
    common::fails(common::mechc().args(["eval", "edit", "--model", m, "--records", r, "--true-field", "answer"]), &["few.json", "`answer`"]);
    // An id that no record has.
    common::fails(common::mechc().args(["eval", "edit", "--model", m, "--records", r, "--ids", "2"]), &["few.json", "case_id", "2"]);
    // A records file that does not exist.
    common::fails(common::mechc().args(["eval", "edit", "--model", m, "--records", "/nonexistent/cf.json"]), &["/nonexistent/cf.json"]);
}
