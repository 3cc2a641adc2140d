//! Golden IR tests, in the manner of Cranelift's filetests: each `fixtures/ir/*.ir` holds a
//! small IR text (`;; in`), a `[[pass]]` table (`;; pass`) and the IR text the pass must give
//! (`;; expect`), so a reader sees what every pass does structurally at a glance.
//!
//! For each fixture: a random model is built with the input's shapes (`random_model_for_ir`),
//! its IR must print exactly as the fixture's input (so the input is honest), the pass is built
//! through the registry and run, the structural verifier checks the result, and the result's IR
//! must equal the expected text. `MECHC_BLESS=1` rewrites the expected section instead of
//! failing (like `CRANELIFT_TEST_BLESS`); read what it wrote before committing it.
//!
//! Every model gets a word-level tokenizer whose token i is the word `w{i}`, for the passes
//! whose options are text.

mod common;

use std::path::{Path, PathBuf};

use mechc::ir::Ir;
use mechc::ir::random::random_model_for_ir;
use mechc::model::random::{random_model, RandomSpec};
use mechc::passes::{self, BuildCtx};

const MARK_IN: &str = ";; in";
const MARK_PASS: &str = ";; pass";
const MARK_EXPECT: &str = ";; expect";

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/ir")
}

fn fixtures() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(fixture_dir())
        .expect("fixtures/ir")
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "ir"))
        .collect();
    v.sort();
    v
}

/// One fixture file: the comment header, then the three sections.
struct Fixture {
    header: String,
    input: String,
    pass: String,
    expect: String,
}

impl Fixture {
    fn parse(path: &Path) -> Result<Fixture, String> {
        let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
        let mut parts: Vec<(&str, String)> = vec![("header", String::new())];
        for line in text.lines() {
            if [MARK_IN, MARK_PASS, MARK_EXPECT].contains(&line.trim_end()) {
                parts.push((line.trim_end(), String::new()));
            } else {
                let s = &mut parts.last_mut().unwrap().1;
                s.push_str(line);
                s.push('\n');
            }
        }
        let marks: Vec<&str> = parts[1..].iter().map(|p| p.0).collect();
        if marks != [MARK_IN, MARK_PASS, MARK_EXPECT] {
            return Err(format!("expected the sections `{MARK_IN}`, `{MARK_PASS}`, `{MARK_EXPECT}` once each, in that order; found {marks:?}"));
        }
        if let Some(l) = parts[0].1.lines().find(|l| !l.trim().is_empty() && !l.starts_with(';')) {
            return Err(format!("the header before `{MARK_IN}` is for `;` comments only, found `{l}`"));
        }
        let mut it = parts.into_iter().map(|p| p.1);
        Ok(Fixture { header: it.next().unwrap(), input: it.next().unwrap(), pass: it.next().unwrap(), expect: it.next().unwrap() })
    }

    fn pass_table(&self) -> Result<(String, toml::Table), String> {
        let mut t: toml::Table = toml::from_str(&self.pass).map_err(|e| format!("`{MARK_PASS}` is not TOML: {}", e.message()))?;
        let name = match t.remove("name") {
            Some(toml::Value::String(s)) => s,
            _ => return Err(format!("`{MARK_PASS}` needs `name = \"PASS\"` (one of {})", passes::names())),
        };
        Ok((name, t))
    }

    fn write(&self, path: &Path, expect: &str) {
        let text = format!("{}{MARK_IN}\n{}{MARK_PASS}\n{}{MARK_EXPECT}\n{expect}", self.header, self.input, self.pass);
        // Whole or not at all: the other tests read fixtures while this one blesses.
        let tmp = path.with_extension("ir.blessing");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, path).unwrap();
    }
}

/// A line diff (longest common subsequence; fixtures are a few lines): `-` expected, `+` got.
fn diff(want: &str, got: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] { lcs[i + 1][j + 1] + 1 } else { lcs[i + 1][j].max(lcs[i][j + 1]) };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out += &format!("  {}\n", a[i]);
            (i, j) = (i + 1, j + 1);
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out += &format!("- {}\n", a[i]);
            i += 1;
        } else {
            out += &format!("+ {}\n", b[j]);
            j += 1;
        }
    }
    out
}

/// Run one fixture; Err is the failure report.
fn check(path: &Path, bless: bool) -> Result<(), String> {
    let fx = Fixture::parse(path)?;
    let ir = Ir::parse(&fx.input).map_err(|e| format!("`{MARK_IN}`: {e}"))?;
    let model = random_model_for_ir(&ir, 0).map_err(|e| format!("`{MARK_IN}`: {e}"))?;
    let printed = Ir::from_model(&model).to_text();
    if printed != fx.input {
        return Err(format!(
            "`{MARK_IN}` is not what a model of its shapes prints (fix the input; it is never blessed):\n{}",
            diff(&fx.input, &printed)
        ));
    }
    let (name, opts) = fx.pass_table()?;
    let info = passes::find(&name).ok_or_else(|| format!("unknown pass `{name}` (one of {})", passes::names()))?;
    let tok = common::word_tokenizer(ir.vocab);
    let cx = BuildCtx { source: &model, base_dir: &fixture_dir(), tok: Some(&tok), progress: false };
    let pass = (info.build)(&opts, &cx).map_err(|e| format!("building {name}: {e}"))?;
    let mut out = model.clone();
    pass.run(&mut out).map_err(|e| format!("running {name}: {e}"))?;
    mechc::model::verifier::check(&out).map_err(|e| format!("the verifier rejects {name}'s output: {e}"))?;
    let got = Ir::from_model(&out).to_text();
    if got == fx.expect {
        return Ok(());
    }
    if bless {
        fx.write(path, &got);
        eprintln!("blessed {}", path.display());
        return Ok(());
    }
    Err(format!("`{MARK_EXPECT}` differs (- expected, + got; MECHC_BLESS=1 rewrites it):\n{}", diff(&fx.expect, &got)))
}

#[test]
fn every_fixture_gives_its_expected_ir() {
    let bless = std::env::var("MECHC_BLESS").is_ok_and(|v| v == "1");
    let all = fixtures();
    assert!(!all.is_empty(), "no fixtures in {}", fixture_dir().display());
    let failures: Vec<String> = all
        .iter()
        .filter_map(|p| check(p, bless).err().map(|e| format!("{}: {e}", p.display())))
        .collect();
    assert!(failures.is_empty(), "{} of {} fixtures failed:\n\n{}", failures.len(), all.len(), failures.join("\n"));
}

#[test]
fn every_registered_pass_has_a_fixture() {
    let covered: Vec<String> = fixtures()
        .iter()
        .map(|p| Fixture::parse(p).and_then(|f| f.pass_table()).map(|(n, _)| n).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .collect();
    let missing: Vec<&str> = passes::REGISTRY.iter().map(|p| p.name).filter(|n| !covered.iter().any(|c| c == n)).collect();
    assert!(missing.is_empty(), "passes without a fixtures/ir/*.ir golden test: {missing:?}");
}

/// The helper the fixtures rest on: a random model rebuilt from another's IR has the same IR
/// (per-layer widths and every bias layout included), and a miscounted line is refused.
#[test]
fn random_model_for_ir_reproduces_the_ir() {
    for seed in 0..40 {
        let m = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
        let ir = Ir::from_model(&m);
        let again = Ir::from_model(&random_model_for_ir(&ir, 1).unwrap());
        assert_eq!(again.to_text(), ir.to_text(), "seed {seed}");
    }
    let input = Fixture::parse(&fixture_dir().join("skip-layers.ir")).unwrap().input;
    let ir = Ir::parse(&input.replace("mlp=240", "mlp=241")).unwrap();
    let e = random_model_for_ir(&ir, 0).unwrap_err().to_string();
    assert!(e.contains("L1 mlp=241"), "{e}");
}

#[test]
fn diff_marks_changed_lines() {
    assert_eq!(diff("a\nb\nc\n", "a\nx\nc\n"), "  a\n- b\n+ x\n  c\n");
}
