//! `--report` of every eval task writes one self-contained HTML file with its tables and plots
//! (stories260K, small sets: this checks the plumbing, the numbers are tested elsewhere).

mod common;

use std::path::Path;


fn report_of(args: &[&str], path: &Path) -> String {
    let g = common::stories_gguf();
    common::mechc().arg("eval").arg(args[0]).arg("--model").arg(&g).args(&args[1..]).arg("--report").arg(path).assert().success();
    let html = std::fs::read_to_string(path).unwrap();
    assert!(html.starts_with("<!DOCTYPE html>") && html.trim_end().ends_with("</html>"), "{}", &html[..200.min(html.len())]);
    html
}

#[test]
fn every_eval_task_writes_a_report() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let prompts = d.join("p.json");
    std::fs::write(&prompts, r#"["Once upon a time", "The dog was", "Tom liked"]"#).unwrap();
    let text = common::shared_data().join("text/tinystories-subset.txt");
    let cf = common::shared_data().join("prompts/counterfact/counterfact-edit.json");
    let p = prompts.to_str().unwrap();

    let html = report_of(&["perplexity", "--text", text.to_str().unwrap(), "--tokens", "300", "--seq-len", "64"], &d.join("ppl.html"));
    assert!(html.contains("perplexity") && html.contains("<td>64</td>"));

    let g = common::stories_gguf();
    let html = report_of(
        &["refusal", "--prompts", p, "--no-chat", "--max-tokens", "6", "--reference", g.to_str().unwrap()],
        &d.join("refusal.html"),
    );
    assert!(html.contains("Completions: prompts") && html.contains("The dog was") && html.contains("<svg"));

    let html = report_of(&["edit", "--records", cf.to_str().unwrap(), "--limit", "4"], &d.join("edit.html"));
    assert!(html.contains("efficacy") && html.contains("<svg"));

    let dir = d.join("dir.safetensors");
    let v = candle_core::Tensor::ones(64, candle_core::DType::F32, &candle_core::Device::Cpu).unwrap();
    mechc::verify::steer::save_direction(&dir, "v", &v).unwrap();
    let html = report_of(
        &["steer", "--direction", dir.to_str().unwrap(), "--layer", "2", "--coeffs", "-1,0,1", "--prompts", p],
        &d.join("steer.html"),
    );
    assert_eq!(html.matches("<svg").count(), 2, "score and KL plots");
}
