//! `mechc locate` from the command line on stories260K (fast): help texts, findings files that
//! read back with provenance, determinism, and one-line errors on bad input.

mod common;

use std::process::Command;

use mechc::ir::{Component, Findings};

fn mechc(args: &[&str]) -> std::process::Output {
    // The project's import cache (the GGUF is imported once), unless the environment names one.
    let cache =
        std::env::var_os("MECHC_CACHE").unwrap_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache").into());
    Command::new(env!("CARGO_BIN_EXE_mechc"))
        .args(args)
        .env("MECHC_CACHE", cache)
        .output()
        .unwrap()
}

#[test]
fn locate_cli() {
    let h = mechc(&["locate", "--help"]);
    let help = String::from_utf8_lossy(&h.stdout);
    assert!(help.contains("block-influence") && help.contains("logit-lens"), "{help}");
    let h = mechc(&["locate", "block-influence", "--help"]);
    let help = String::from_utf8_lossy(&h.stdout);
    for opt in ["--text", "--tokens", "--seq-len", "--n", "--out", "--plot"] {
        assert!(help.contains(opt), "{opt} undocumented:\n{help}");
    }

    let model = common::stories_gguf();
    if !model.exists() {
        eprintln!("SKIPPED: {} is missing", model.display());
        return;
    }
    let text = common::shared_data().join("text/wikitext2-test.raw");
    let dir = std::env::temp_dir().join(format!("mechc-locate-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (m, t) = (model.to_str().unwrap(), text.to_str().unwrap());
    let outs: Vec<_> = (0..2).map(|i| dir.join(format!("bi{i}.json"))).collect();
    for out in &outs {
        let o = mechc(&[
            "locate",
            "block-influence",
            "--model",
            m,
            "--text",
            t,
            "--tokens",
            "300",
            "--seq-len",
            "128",
            "--out",
            out.to_str().unwrap(),
            "--plot",
            dir.join("bi.svg").to_str().unwrap(),
            "--force",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert!(String::from_utf8_lossy(&o.stdout).contains("\nL4  "));
    }
    assert_eq!(
        std::fs::read(&outs[0]).unwrap(),
        std::fs::read(&outs[1]).unwrap(),
        "not deterministic"
    );
    let f = Findings::read(&outs[0]).unwrap();
    assert_eq!(f.method, "block-influence");
    assert_eq!(f.model.sha256, mechc::io::sha256_file(&model).unwrap());
    assert_eq!(f.data[0].sha256, mechc::io::sha256_file(&text).unwrap());
    assert_eq!(f.options["tokens"], 300);
    assert_eq!(
        f.scores.iter().map(|s| s.component).collect::<Vec<_>>(),
        (0..5).map(Component::Block).collect::<Vec<_>>()
    );
    assert!(std::fs::read_to_string(dir.join("bi.svg")).unwrap().contains("<svg"));

    // Existing output without --force, a missing text, a bad --n: one-line errors naming the culprit.
    let o = mechc(&[
        "locate",
        "block-influence",
        "--model",
        m,
        "--text",
        t,
        "--out",
        outs[0].to_str().unwrap(),
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("bi0.json") && e.contains("--force"), "{e}");
    let o = mechc(&["locate", "block-influence", "--model", m, "--text", "/nonexistent.txt"]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && e.contains("/nonexistent.txt") && e.trim().lines().count() == 1,
        "{e}"
    );
    let o = mechc(&[
        "locate",
        "block-influence",
        "--model",
        m,
        "--text",
        t,
        "--tokens",
        "300",
        "--n",
        "9",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--n"), "{e}");

    let out = dir.join("lens.json");
    let o = mechc(&[
        "locate",
        "logit-lens",
        "--model",
        m,
        "--prompt",
        "Once upon a",
        "--target",
        " time",
        "--out",
        out.to_str().unwrap(),
        "--force",
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = Findings::read(&out).unwrap();
    assert_eq!(f.scores.len(), 6, "embed + 5 blocks");
    assert!(f
        .scores
        .iter()
        .all(|s| s.score >= 0.0 && s.score <= 1.0 && s.extra.contains_key("rank")));
    let o = mechc(&[
        "locate",
        "logit-lens",
        "--model",
        m,
        "--prompt",
        "Once",
        "--target",
        " time",
        "--position",
        "-9",
    ]);
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && e.contains("--position"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
