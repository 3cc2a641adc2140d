//! `mechc locate refusal-direction` on SmolLM2-135M-Instruct (skipped with a message when the
//! registry model is missing): the findings and vectors a pipeline selects from, and the claim
//! the method rests on — each candidate's *bypass* is scored with the runtime twin of
//! `bake-steering`'s ablate mode, so baking the chosen vector into the weights and measuring the
//! refusal score without any hook gives the same number. Bad input: one line, nothing written.

mod common;

use mechc::ir::Findings;
use mechc::locate::refusal_direction::refusal_score;
use mechc::runtime::score::last_logprobs;
use mechc::runtime::Hooks;

fn spec(file: &str) -> String {
    format!("{}:instruction", common::shared_data().join("prompts/refusal").join(file).display())
}

#[test]
fn refusal_direction_on_smollm2_is_what_the_baked_ablation_does() {
    let Some(model) = common::registry_model("SmolLM2-135M-Instruct.Q4_1.gguf") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let (out, vectors) = (tmp.path().join("f.json"), tmp.path().join("v.safetensors"));
    let (harmful, harmless, val_harmful, val_harmless) = (spec("harmful_train.json"), spec("harmless_train.json"), spec("harmful_val.json"), spec("harmless_val.json"));
    let o = common::mechc()
        .args(["locate", "refusal-direction", "--model"])
        .arg(&model)
        .args(["--harmful", &harmful, "--harmless", &harmless, "--val-harmful", &val_harmful, "--val-harmless", &val_harmless])
        .args(["--limit", "16", "--val-limit", "8", "--layers", "9,15", "--out"])
        .arg(&out)
        .arg("--vectors")
        .arg(&vectors)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = Findings::read(&out).unwrap();
    assert_eq!(f.method, "refusal-direction");
    assert_eq!(f.scores.len(), 2, "one score per layer given");
    let k = f.options["post_instruction_tokens"].as_u64().unwrap() as usize;
    assert!(k >= 2, "SmolLM2's template puts several tokens after the instruction, got {k}");
    for s in &f.scores {
        assert_eq!(s.extra["candidates"].as_array().unwrap().len(), k, "every post-instruction position is a candidate");
    }
    let best = f.summary["best_tensor"].as_str().unwrap().to_string();
    let bypass = f.summary["bypass"].as_f64().unwrap();
    let baseline = f.summary["baseline_harmful"].as_f64().unwrap();
    let all: Vec<&serde_json::Value> = f.scores.iter().flat_map(|s| s.extra["candidates"].as_array().unwrap()).collect();
    let lowest = all.iter().map(|c| c["bypass"].as_f64().unwrap()).fold(f64::INFINITY, f64::min);
    assert!(lowest < baseline, "some candidate's ablation lowers the harmful prompts' refusal score: {lowest} vs {baseline}");
    // The choice rule: when no candidate is within the KL budget, the lowest measured KL wins.
    let max_kl = f.options["max_kl"].as_f64().unwrap();
    let kls: Vec<f64> = all.iter().filter_map(|c| c["kl"].as_f64()).collect();
    if kls.iter().all(|&k| k > max_kl) {
        let min = kls.iter().cloned().fold(f64::INFINITY, f64::min);
        assert_eq!(f.summary["kl"].as_f64().unwrap(), min, "nothing within KL {max_kl}: the lowest KL is chosen");
    }

    // Bake the chosen vector into the weights; measure without hooks.
    let loaded = mechc::io::load(&model, false).unwrap();
    let tok = loaded.tok().unwrap();
    let opts: toml::Table = toml::from_str(&format!("mode = \"ablate\"\ndirection = \"{}:{best}\"", vectors.display())).unwrap();
    let cx = mechc::passes::BuildCtx { source: &loaded.model, base_dir: tmp.path(), tok: Some(tok), progress: false };
    let pass = (mechc::passes::find("bake-steering").unwrap().build)(&opts, &cx).unwrap();
    let mut baked = loaded.model.clone();
    pass.run(&mut baked).unwrap();
    let texts = mechc::data::TextSet::load(&mechc::data::SetSpec::parse(&val_harmful), 8).unwrap().texts;
    let ids = tok.prompts_ids(&texts, true).unwrap();
    let refusal: Vec<u32> = ["I", "As"].iter().map(|t| tok.encode(t, false).unwrap()[0]).collect();
    let mut total = 0.0;
    last_logprobs(&baked, &ids, &Hooks::new(), 4, |_, lp| total += refusal_score(lp, &refusal)).unwrap();
    let measured = total / ids.len() as f64;
    assert!((measured - bypass).abs() < 1e-2, "baked ablation's refusal score {measured} vs the twin's bypass {bypass}");
}

#[test]
fn refusal_direction_bad_input_is_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let out = tmp.path().join("f.json");
    let e = empty.display().to_string();
    let h = spec("harmful_val.json");
    // An empty set is found before the model is read (the model path does not exist).
    common::fails(
        common::mechc()
            .args(["locate", "refusal-direction", "--model", "no-such-model.gguf", "--harmful", &e, "--harmless", &h, "--val-harmful", &h, "--val-harmless", &h, "--out"])
            .arg(&out),
        &["empty.json", "empty"],
    );
    assert!(!out.exists());
    // stories260K has no chat template: no post-instruction positions.
    let stories = common::stories_gguf();
    if stories.exists() {
        common::fails(
            common::mechc()
                .args(["locate", "refusal-direction", "--model"])
                .arg(&stories)
                .args(["--harmful", &h, "--harmless", &h, "--val-harmful", &h, "--val-harmless", &h, "--limit", "2", "--val-limit", "2", "--out"])
                .arg(&out),
            &["chat template"],
        );
        assert!(!out.exists());
    }
}
