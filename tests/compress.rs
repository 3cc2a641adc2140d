//! Use case 1, compress: `configs/smollm2-compress.toml` removes ≥ 20% of SmolLM2-135M-Instruct's
//! parameters, chosen from `neuron-importance` findings (a `[[locate]]` step); its WikiText-2
//! perplexity must beat the same number of neurons removed by weight magnitude and at random,
//! with the same compensation, on text neither the findings nor the compensation saw.

mod common;

use std::path::Path;

use mechc::compile::{pipeline::PipelineFile, Plan};

/// The config with `select` swapped for `replacement`, paths made absolute, written to `dir`.
fn variant(dir: &Path, name: &str, model: &Path, replacement: Option<&str>) -> PipelineFile {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut text = std::fs::read_to_string(repo.join("configs/smollm2-compress.toml")).unwrap();
    let select = "select = { by = \"flap\", fraction = 0.35, per_layer = true }";
    assert!(text.contains(select), "the config changed: update this test");
    if let Some(r) = replacement {
        text = text.replace(select, r);
    }
    let text = text
        .replace("../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf", &model.display().to_string())
        .replace("../../shared/data", &common::shared_data().display().to_string());
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, text).unwrap();
    PipelineFile::load(&p).unwrap()
}

#[test]
fn located_pruning_beats_magnitude_and_random() {
    let Some(model) = common::registry_model(common::SMOLLM2) else { return };
    std::env::set_var("MECHC_CACHE", common::cache());
    let loaded = mechc::io::load(&model, false).unwrap();
    let tok = loaded.tok().unwrap();
    let before = loaded.model.param_count();
    let tmp = tempfile::tempdir().unwrap();
    let mut results = vec![];
    for (name, replacement) in [
        ("located", None),
        ("magnitude", Some("fraction = 0.35\nby = \"weight-magnitude\"")),
        ("random", Some("fraction = 0.35\nby = \"random\"\nseed = 0")),
    ] {
        let file = variant(tmp.path(), name, &model, replacement);
        let plan = Plan::new(file, Some(tmp.path().join(name)), false, &loaded, false, &|_| {}).unwrap();
        if name == "located" {
            assert_eq!(plan.used[0][0]["by"], "flap", "the targets come from the findings");
            assert_eq!(plan.steps[0].findings.method, "neuron-importance");
        }
        let (compiled, _) = plan.run_passes(&loaded.model, |_, _| {}).unwrap();
        let removed = 1.0 - compiled.param_count() as f64 / before as f64;
        let v = plan.verify(&loaded.model, &compiled, tok, false).unwrap().unwrap();
        let (ppl0, ppl) = (v.metrics["ppl_source"], v.metrics["ppl_compiled"]);
        println!("{name:<10} removed {:.1}% of {before} parameters: WikiText-2 ppl {ppl0:.2} → {ppl:.2}", 100.0 * removed);
        assert!(removed >= 0.20, "{name}: only {:.1}% removed", 100.0 * removed);
        if name == "located" {
            assert!(v.ok(), "the config's own budgets: {:?}", v.checks);
        }
        results.push((name, removed, ppl));
    }
    let (located, magnitude, random) = (results[0], results[1], results[2]);
    assert_eq!(located.1, magnitude.1, "same amount removed");
    assert_eq!(located.1, random.1, "same amount removed");
    assert!(located.2 < magnitude.2, "located {located:?} vs magnitude {magnitude:?}");
    assert!(located.2 < random.2, "located {located:?} vs random {random:?}");
}
