//! Every command that writes checks its output before any work: with a model path that does not
//! exist and an output that does, the error is about the output (not the model), and the
//! existing output is left as it was. (`compile` and `locate` have their own tests.)

mod common;

use std::path::Path;

/// `output` is what the error must name; `kept` a file whose bytes must not change.
fn assert_output_error(args: &[&str], output: &Path, kept: &Path) {
    let before = std::fs::read(kept).unwrap();
    let err = common::fails(common::mechc().args(args), &["already exists", "--force"]);
    assert!(err.contains(&output.display().to_string()), "the error should name the output: {err}");
    assert!(!err.contains("no-such-model"), "the model was looked at before the output: {err}");
    assert_eq!(std::fs::read(kept).unwrap(), before, "{} was modified", kept.display());
}

#[test]
fn an_existing_output_is_refused_before_the_model_is_read() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let missing = d.join("no-such-model.gguf");
    let m = missing.to_str().unwrap();
    // Inputs that exist, so that only the model and the output can be wrong.
    let prompts = d.join("p.json");
    std::fs::write(&prompts, r#"["Hello"]"#).unwrap();
    let p = prompts.to_str().unwrap();
    let existing_dir = d.join("out-dir");
    std::fs::create_dir(&existing_dir).unwrap();
    std::fs::write(existing_dir.join("keep.txt"), "keep").unwrap();
    let existing = d.join("existing.out");
    std::fs::write(&existing, "keep").unwrap();
    let (od, of) = (existing_dir.to_str().unwrap(), existing.to_str().unwrap());

    assert_output_error(&["import", m, "--out", od], &existing_dir, &existing_dir.join("keep.txt"));
    assert_output_error(&["trace", m, "--prompt", "hi", "--out", of], &existing, &existing);
    assert_output_error(&["export", m, "--gguf", of], &existing, &existing);
    assert_output_error(&["random-model", "--out", od], &existing_dir, &existing_dir.join("keep.txt"));
    assert_output_error(&["diff", m, m, "--prompts", p, "--report", of], &existing, &existing);
    assert_output_error(&["eval", "perplexity", "--model", m, "--text", p, "--report", of], &existing, &existing);
    assert_output_error(&["eval", "edit", "--model", m, "--records", p, "--report", of], &existing, &existing);
    assert_output_error(&["eval", "refusal", "--model", m, "--prompts", p, "--report", of], &existing, &existing);
    assert_output_error(&["eval", "choice", "--model", m, "--items", p, "--report", of], &existing, &existing);
    assert_output_error(
        &["eval", "steer", "--model", m, "--direction", p, "--layer", "0", "--prompts", p, "--report", of],
        &existing,
        &existing,
    );
    // The directory still holds exactly what it held.
    let names: Vec<_> = std::fs::read_dir(&existing_dir).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, vec![std::ffi::OsString::from("keep.txt")]);

    // With --force the output check passes and the model is what is wrong.
    common::fails(common::mechc().args(["trace", m, "--prompt", "hi", "--out", of, "--force"]), &["no-such-model.gguf"]);
    common::fails(
        common::mechc().args(["eval", "perplexity", "--model", m, "--text", p, "--report", of, "--force"]),
        &["no-such-model.gguf"],
    );
    // An output under a regular file cannot be created: said before the model is read.
    let under_file = existing.join("r.html");
    common::fails(common::mechc().args(["diff", m, m, "--prompts", p, "--report"]).arg(&under_file), &["not a directory"]);
    // An import onto its own input is refused as such, even with --force.
    let gguf = d.join("x.gguf");
    std::fs::write(&gguf, "not really").unwrap();
    common::fails(common::mechc().arg("import").arg(&gguf).arg("--out").arg(&gguf).arg("--force"), &["input"]);
    assert_eq!(std::fs::read_to_string(&gguf).unwrap(), "not really");
}

/// A real write after the checks: the report appears, and a second run without --force is
/// refused and leaves it alone.
#[test]
fn a_report_is_written_then_refused_without_force() {
    let model = common::stories_gguf();
    if !model.exists() {
        eprintln!("SKIPPED: {} is missing", model.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "Once upon a time there was a little girl who liked to play outside in the sun.").unwrap();
    let report = tmp.path().join("ppl.html");
    let run = || {
        let mut c = common::mechc();
        c.args(["eval", "perplexity", "--model"]).arg(&model).arg("--text").arg(&text).args(["--seq-len", "16", "--report"]).arg(&report);
        c
    };
    run().assert().success();
    let html = std::fs::read_to_string(&report).unwrap();
    assert!(html.contains("<html") && html.contains("perplexity"), "{html}");
    common::fails(&mut run(), &["ppl.html", "already exists", "--force"]);
    assert_eq!(std::fs::read_to_string(&report).unwrap(), html);
    run().arg("--force").assert().success();
}
