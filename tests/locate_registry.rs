//! The locate registry: every method's options have one definition that the command line and
//! a pipeline's `[[locate]]` table both parse (same defaults, same canonical form), every option
//! is documented, and the findings cache key follows the data, not its path.

use std::path::Path;

use clap::Parser;
use mechc::locate::{self, Locator};

mod common;

/// `mechc locate NAME ARGS…` parsed by the real CLI, as the method's options.
fn from_cli(args: &[&str]) -> Box<dyn Locator> {
    let mut argv = vec!["mechc", "locate"];
    argv.extend(args);
    argv.extend(["--model", "m.gguf"]);
    let cli = mechc::cli::Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    match cli.command {
        mechc::cli::Command::Locate(a) => a.spec,
        other => panic!("{other:?}"),
    }
}

fn from_toml(method: &str, table: &str, base: &Path) -> mechc::Result<Box<dyn Locator>> {
    let t: toml::Table = toml::from_str(table).unwrap();
    locate::spec_from_table(locate::find(method).unwrap(), &t, base)
}

/// For each method, minimal options as CLI flags and as the same `[[locate]]` table.
fn cases(dir: &Path) -> Vec<(&'static str, Vec<String>, String)> {
    let text = dir.join("calib.txt");
    let pos = dir.join("pos.json");
    let facts = dir.join("facts.json");
    let t = text.display().to_string();
    let p = pos.display().to_string();
    let f = facts.display().to_string();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    vec![
        ("attribute", s(&["--clean", "a b", "--corrupted", "c d", "--verify-top", "3"]), "clean = \"a b\"\ncorrupted = \"c d\"\nverify_top = 3".into()),
        ("block-influence", s(&["--text", &t, "--tokens", "300"]), "text = \"calib.txt\"\ntokens = 300".into()),
        ("causal-trace", s(&["--facts", &f, "--limit", "2", "--kinds", "resid,mlp"]), "facts = \"facts.json\"\nlimit = 2\nkinds = [\"resid\", \"mlp\"]".into()),
        (
            "direction",
            s(&["--positive", &format!("{p}:text"), "--negative", &p, "--layers", "1,3", "--chat"]),
            "positive = \"pos.json:text\"\nnegative = \"pos.json\"\nlayers = [1, 3]\nchat = true".into(),
        ),
        ("head-importance", s(&["--text", &t, "--by", "wanda"]), "text = \"calib.txt\"\nby = \"wanda\"".into()),
        ("logit-lens", s(&["--prompt", "Once", "--target", " time", "--position", "-1"]), "prompt = \"Once\"\ntarget = \" time\"\nposition = -1".into()),
        ("neuron-importance", s(&["--text", &t, "--skip", "10", "--layers", "0,2"]), "text = \"calib.txt\"\nskip = 10\nlayers = [0, 2]".into()),
        ("patch", s(&["--clean", "a", "--corrupted", "b", "--sites", "resid,head"]), "clean = \"a\"\ncorrupted = \"b\"\nsites = [\"resid\", \"head\"]".into()),
        ("probe", s(&["--positive", &p, "--negative", &p, "--l2", "0.5", "--shuffle-labels"]), "positive = \"pos.json\"\nnegative = \"pos.json\"\nl2 = 0.5\nshuffle_labels = true".into()),
        (
            "refusal-direction",
            s(&["--harmful", &format!("{p}:text"), "--harmless", &p, "--val-harmful", &p, "--val-harmless", &p, "--refusal-tokens", "I,Sorry", "--screen", "4"]),
            "harmful = \"pos.json:text\"\nharmless = \"pos.json\"\nval_harmful = \"pos.json\"\nval_harmless = \"pos.json\"\nrefusal_tokens = [\"I\", \"Sorry\"]\nscreen = 4".into(),
        ),
    ]
}

fn setup() -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::write(tmp.path().join("calib.txt"), "Once upon a time there was a cat.").unwrap();
    std::fs::write(tmp.path().join("pos.json"), r#"[{"text": "a"}, {"text": "b"}]"#).unwrap();
    std::fs::write(tmp.path().join("facts.json"), r#"[{"prompt": "a b", "subject": "a", "attribute": "c", "known_id": 0}]"#).unwrap();
    tmp
}

#[test]
fn cli_and_pipeline_parse_the_same_options() {
    let tmp = setup();
    let dir = tmp.path().canonicalize().unwrap();
    let cases = cases(&dir);
    let names: Vec<&str> = cases.iter().map(|c| c.0).collect();
    let registered: Vec<&str> = locate::REGISTRY.iter().map(|m| m.name).collect();
    assert_eq!(names, registered, "every registered method needs a case here");
    for (method, flags, table) in &cases {
        let mut args = vec![*method];
        args.extend(flags.iter().map(String::as_str));
        let cli = from_cli(&args).options();
        let toml = from_toml(method, table, &dir).unwrap().options();
        assert_eq!(cli, toml, "{method}: the command line and the pipeline disagree");
        // Defaults are filled in: the canonical form names every option.
        let n = locate::find(method).unwrap();
        let ids: Vec<String> = (n.command)().get_arguments().map(|a| a.get_id().to_string()).filter(|id| id != "help").collect();
        let keys = cli.as_object().unwrap();
        assert!(keys.len() >= ids.len(), "{method}: options {keys:?} vs flags {ids:?}");
    }
}

#[test]
fn every_option_is_documented() {
    for m in locate::REGISTRY {
        let cmd = (m.command)();
        let about = cmd.get_about().map(|s| s.to_string()).unwrap_or_default();
        assert!(!about.is_empty() && about.len() <= 100, "{}: one-line about, got {about:?}", m.name);
        for a in cmd.get_arguments() {
            let help = a.get_help().map(|s| s.to_string()).unwrap_or_default();
            assert!(!help.trim().is_empty(), "{}: --{} has no help", m.name, a.get_id());
        }
    }
}

#[test]
fn pipeline_errors_name_the_flag_in_one_line() {
    let tmp = setup();
    let e = from_toml("block-influence", "text = \"calib.txt\"\ntokenz = 3", tmp.path()).err().unwrap().to_string();
    assert!(e.contains("--tokenz") && e.contains("mechc locate block-influence --help") && !e.contains('\n'), "{e}");
    let e = from_toml("block-influence", "text = \"calib.txt\"\ntokens = \"many\"", tmp.path()).err().unwrap().to_string();
    assert!(e.contains("many") && e.contains("--tokens"), "{e}");
    let e = from_toml("block-influence", "tokens = 3", tmp.path()).err().unwrap().to_string();
    assert!(e.contains("--text"), "{e}");
    let e = from_toml("block-influence", "text = \"calib.txt\"\nn = { a = 1 }", tmp.path()).err().unwrap().to_string();
    assert!(e.contains("`n`"), "{e}");
}

#[test]
fn cache_key_follows_the_data_not_its_path() {
    let tmp = setup();
    let dir = tmp.path().canonicalize().unwrap();
    let key = |table: &str| locate::cache_key("block-influence", from_toml("block-influence", table, &dir).unwrap().as_ref(), "model-hash").unwrap();
    let a = key("text = \"calib.txt\"");
    // The same file by an absolute path, and a default written out: the same key.
    assert_eq!(a, key(&format!("text = \"{}\"", dir.join("calib.txt").display())));
    assert_eq!(a, key("text = \"calib.txt\"\ntokens = 4096"));
    // A copy elsewhere with the same bytes: the same key (the key holds the hash, not the path).
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::copy(dir.join("calib.txt"), dir.join("sub/calib.txt")).unwrap();
    assert_eq!(a, key("text = \"sub/calib.txt\""));
    // Another option, other bytes, another model: other keys.
    assert_ne!(a, key("text = \"calib.txt\"\ntokens = 100"));
    std::fs::write(dir.join("calib.txt"), "Other text entirely.").unwrap();
    assert_ne!(a, key("text = \"calib.txt\""));
    let spec = from_toml("block-influence", "text = \"sub/calib.txt\"", &dir).unwrap();
    assert_ne!(a, locate::cache_key("block-influence", spec.as_ref(), "other-model").unwrap());
}
