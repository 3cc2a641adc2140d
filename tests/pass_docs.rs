//! Every pass's documentation (`mechc passes NAME`) shows how to give its targets with runnable
//! examples, and the examples work: each `Example:` block is TOML whose `[[pass]]` tables name
//! the pass, and each table builds with the pass's `build` on a model of a suitable shape —
//! after `select = {..}` / `direction = { by = .. }` are resolved through
//! `mechc::compile::select::resolve` against findings made here for the ids the example uses.
//!
//! The format, shared by every pass: a line `Example:` or `Example (what it does):`, then TOML
//! lines indented by 4 spaces, ending at the first line that is not.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mechc::compile::locate_steps::StepFindings;
use mechc::ir::{Component, Findings, Ir, Source};
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::{Arch, Model};
use mechc::passes::{BuildCtx, REGISTRY};

/// The example blocks of a doc text, with the indentation removed.
fn examples(doc: &str) -> Vec<(String, String)> {
    let mut out = vec![];
    let mut lines = doc.lines().peekable();
    while let Some(l) = lines.next() {
        let head = l.trim_end();
        let is_example = head == "Example:" || (head.starts_with("Example (") && head.ends_with("):"));
        if !is_example {
            continue;
        }
        let mut body = String::new();
        while let Some(next) = lines.peek() {
            let Some(rest) = next.strip_prefix("    ") else { break };
            body.push_str(rest);
            body.push('\n');
            lines.next();
        }
        out.push((head.to_string(), body));
    }
    out
}

#[test]
fn the_example_extractor_follows_the_format() {
    let doc = "Summary.\n\nExample:\n    [[pass]]\n    name = \"x\"\nafter\n    not part\nExample (two):\n    a = 1\n";
    let ex = examples(doc);
    assert_eq!(ex.len(), 2);
    assert_eq!(ex[0].1, "[[pass]]\nname = \"x\"\n");
    assert_eq!(ex[1], ("Example (two):".to_string(), "a = 1\n".to_string()));
}

/// Paths as the shipped configs write them (relative to `configs/`) resolve from there; the shared
/// data folder may live elsewhere ($MECHC_SHARED_DATA).
fn relocate(v: &mut toml::Value, shared: &Path) {
    match v {
        toml::Value::String(s) => {
            if let Some(rest) = s.strip_prefix("../../shared/data/") {
                *s = shared.join(rest).display().to_string();
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(|x| relocate(x, shared)),
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, x)| relocate(x, shared)),
        _ => {}
    }
}

/// A SmolLM2-like shape (30 layers, 9 query heads in 3 kv groups, d_ff 1536), tiny otherwise:
/// the layer, head and neuron numbers the docs use for SmolLM2 all exist.
fn model(vocab: usize) -> Model {
    let spec = RandomSpec {
        arch: Arch::Llama,
        layers: 30,
        kv_heads: 3,
        group: 3,
        head_dim: 2,
        d_model: 18,
        d_ff: 1536,
        vocab,
        tied: true,
        attention_bias: false,
        mlp_bias: false,
    };
    random_model(spec.config(), 7).unwrap()
}

/// Findings of the method a `[[locate]]` step names, scoring every component of its kind with
/// distinct scores (so every selection has a definite answer); a `direction` step also gets its
/// vectors file.
fn findings_for(id: &str, method: &str, m: &Model, dir: &Path) -> StepFindings {
    let mut f = Findings::new(method, "test scores", serde_json::Value::Null, Source::inline("random model"), vec![]);
    let n = m.cfg.num_layers;
    let score = |i: usize| ((i * 7919) % 10007) as f64 / 10007.0;
    let step_dir = dir.join(id);
    std::fs::create_dir_all(&step_dir).unwrap();
    match method {
        "block-influence" => (0..n).for_each(|l| {
            f.push(Component::Block(l), score(l));
        }),
        "head-importance" => {
            for l in 0..n {
                for h in 0..m.cfg.num_heads {
                    f.push(Component::Head { layer: l, head: h }, score(l * 100 + h));
                }
            }
        }
        "neuron-importance" => {
            for l in 0..n {
                for i in 0..m.cfg.intermediate_size {
                    f.push(Component::Neuron { layer: l, n: i }, score(l * 10000 + i));
                }
            }
        }
        "direction" => {
            let mut tensors = vec![];
            for l in 0..n {
                let name = format!("blocks.{l}.hook_resid_pre");
                let v: Vec<f32> = (0..m.cfg.hidden_size).map(|i| ((i + l) % 5) as f32 - 2.0).collect();
                tensors.push((name.clone(), Tensor::new(v, &Device::Cpu).unwrap()));
                let s = f.push(Component::Direction(l), score(l));
                s.extra.insert("layer".into(), l.into());
                s.extra.insert("tensor".into(), name.into());
            }
            f.summary.insert("best_tensor".into(), "blocks.1.hook_resid_pre".into());
            mechc::io::st::write(&step_dir.join("vectors.safetensors"), &tensors, &Default::default()).unwrap();
        }
        other => panic!("an example selects from a `{other}` step; this test does not know how to make such findings"),
    }
    StepFindings { id: id.into(), method: method.into(), options: serde_json::Value::Null, dir: step_dir, sha256: "test".into(), cached: false, findings: f, seconds: 0.0 }
}

/// The locate method a pass's selections come from when the example has no `[[locate]]` step.
fn default_method(pass: &str) -> &'static str {
    match pass {
        "skip-layers" => "block-influence",
        "prune-heads" => "head-importance",
        "prune-neurons" => "neuron-importance",
        _ => "direction",
    }
}

/// The `by = ID` ids of a pass table's `select` and `direction` options.
fn ids_used(t: &toml::Table) -> Vec<String> {
    ["select", "direction"]
        .iter()
        .filter_map(|k| t.get(*k).and_then(|v| v.as_table()).and_then(|s| s.get("by")).and_then(|b| b.as_str()).map(str::to_string))
        .collect()
}

#[test]
fn every_pass_doc_has_examples_that_build() {
    let shared = common::shared_data();
    let configs = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("configs");
    // rank-one-edit and conditional-steer need a tokenizer: stories260K's (its vocabulary sizes the random model).
    let stories = common::stories_gguf();
    let tok = stories.exists().then(|| mechc::tokenizer::Tok::from_dir(&mechc::io::resolve(&stories, false).unwrap()).unwrap());
    let m = model(tok.as_ref().map_or(64, |t| t.vocab_size()));
    let ir = Ir::from_model(&m);
    let tmp = tempfile::tempdir().unwrap();
    let steering_files = tmp.path().join("steering");
    std::fs::create_dir_all(&steering_files).unwrap();
    let v: Vec<f32> = (0..m.cfg.hidden_size).map(|i| i as f32 - 3.0).collect();
    mechc::io::st::write(&steering_files.join("refusal_dir.safetensors"), &[("v".to_string(), Tensor::new(v, &Device::Cpu).unwrap())], &Default::default()).unwrap();
    std::fs::write(steering_files.join("harmless.json"), r#"[{"instruction": "Name a colour."}, {"instruction": "Count to three."}]"#).unwrap();
    std::fs::write(steering_files.join("happy_sad.json"), r#"["I feel wonderful today.", "Everything is grey."]"#).unwrap();
    std::fs::write(steering_files.join("harmful.json"), r#"[{"instruction": "Explain how to pick a lock."}, {"instruction": "Write a rude insult."}]"#).unwrap();
    let mut checked = 0;
    for p in REGISTRY {
        let ex = examples(p.doc);
        assert!(!ex.is_empty(), "`mechc passes {}` shows no `Example:` block", p.name);
        for (head, body) in &ex {
            let what = format!("{} {head}\n{body}", p.name);
            let doc: toml::Table = toml::from_str(body).unwrap_or_else(|e| panic!("not TOML: {e}\n{what}"));
            for k in doc.keys() {
                assert!(k == "pass" || k == "locate", "example has a `{k}` table; examples show [[locate]] and [[pass]] only\n{what}");
            }
            let passes = doc.get("pass").and_then(|v| v.as_array()).unwrap_or_else(|| panic!("no [[pass]] table\n{what}"));
            let locates: Vec<&toml::Table> = doc.get("locate").and_then(|v| v.as_array()).map_or(vec![], |a| a.iter().map(|v| v.as_table().unwrap()).collect());
            for l in &locates {
                assert!(l.get("id").and_then(|v| v.as_str()).is_some() && l.get("method").and_then(|v| v.as_str()).is_some(), "a [[locate]] step needs id and method\n{what}");
            }
            for (i, t) in passes.iter().enumerate() {
                let mut t = t.as_table().unwrap_or_else(|| panic!("[[pass]] is not a table\n{what}")).clone();
                assert_eq!(t.remove("name").and_then(|v| v.as_str().map(str::to_string)).as_deref(), Some(p.name), "[[pass]] {i} does not name the pass\n{what}");
                let mut v = toml::Value::Table(t);
                relocate(&mut v, &shared);
                let toml::Value::Table(t) = v else { unreachable!() };
                let steps: Vec<StepFindings> = ids_used(&t)
                    .iter()
                    .map(|id| {
                        let method = locates
                            .iter()
                            .find(|l| l["id"].as_str() == Some(id))
                            .and_then(|l| l["method"].as_str())
                            .unwrap_or(default_method(p.name));
                        findings_for(id, method, &m, tmp.path())
                    })
                    .collect();
                let (opts, used) = mechc::compile::select::resolve(&t, &steps, &ir).unwrap_or_else(|e| panic!("select/direction do not resolve: {e}\n{what}"));
                assert_eq!(used.len(), steps.len(), "every findings id used is resolved\n{what}");
                assert!(!opts.contains_key("select") && !opts.get("direction").is_some_and(|d| d.is_table()));
                if opts.values().chain(t.values()).any(|v| v.as_str().is_some_and(|s| s.contains(shared.to_str().unwrap()))) && !shared.exists() {
                    eprintln!("SKIPPED ({}): {} is missing\n{what}", p.name, shared.display());
                    continue;
                }
                if matches!(p.name, "rank-one-edit" | "conditional-steer") && tok.is_none() {
                    eprintln!("SKIPPED: {} is missing (its tokenizer builds rank-one-edit)", stories.display());
                    continue;
                }
                let mut opts = opts;
                // bake-steering's examples name files of their own (made here) and an inline vector
                // of d_model numbers (a few shown; cycled here to the model's width).
                let base = if matches!(p.name, "bake-steering" | "conditional-steer") { &steering_files } else { &configs };
                if let Some(toml::Value::Array(v)) = opts.get_mut("direction") {
                    *v = v.iter().cycle().take(m.cfg.hidden_size).cloned().collect();
                }
                // stories260K's tokenizer has no chat template: the search reads its prompts plain.
                if let Some(toml::Value::Table(auto)) = opts.get_mut("auto") {
                    auto.insert("chat".into(), toml::Value::Boolean(false));
                }
                if p.name == "conditional-steer" {
                    opts.insert("chat".into(), toml::Value::Boolean(false));
                }
                let cx = BuildCtx { source: &m, base_dir: base, tok: tok.as_ref(), progress: false };
                // A searched option (coeff = "auto") is resolved by the compile driver's search:
                // build the pass as the plan does, at the search's placeholder value.
                // The options are resolved above, so the search's resolver has nothing left to do.
                let resolved = |t: &toml::Table| Ok(t.clone());
                if let Some(search) = mechc::search::extract(p.name, &opts, &resolved, &cx).unwrap_or_else(|e| panic!("the search does not build: {e}\n{what}")) {
                    if tok.is_none() {
                        eprintln!("SKIPPED: {} is missing (its tokenizer reads the search's prompts)", stories.display());
                        continue;
                    }
                    opts = search.placeholder_options(&resolved).unwrap_or_else(|e| panic!("the placeholder does not resolve: {e}\n{what}"));
                }
                let pass = (p.build)(&opts, &cx).unwrap_or_else(|e| panic!("does not build: {e}\n{what}"));
                // The structural passes are cheap: run them too and check the shape changed.
                if matches!(p.name, "skip-layers" | "prune-heads" | "prune-neurons") {
                    let mut out = m.clone();
                    let summary = pass.run(&mut out).unwrap_or_else(|e| panic!("does not run: {e}\n{what}"));
                    // Blocks, query heads and neurons (biases a mean compensation adds do not count).
                    let units = |x: &Model| {
                        let ir = Ir::from_model(x);
                        (ir.layers.len(), ir.layers.iter().map(|l| l.heads).sum::<usize>(), ir.layers.iter().map(|l| l.d_ff).sum::<usize>())
                    };
                    let (a, b) = (units(&m), units(&out));
                    assert!(b.0 <= a.0 && b.1 <= a.1 && b.2 <= a.2 && b != a, "{summary}: nothing removed ({a:?} → {b:?})\n{what}");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 10, "only {checked} examples checked");
}

/// `mechc passes NAME` prints the examples (the doc text is what the CLI shows).
#[test]
fn mechc_passes_prints_the_examples() {
    for p in REGISTRY {
        let o = common::mechc().args(["passes", p.name]).output().unwrap();
        assert!(o.status.success());
        let text = String::from_utf8(o.stdout).unwrap();
        assert_eq!(examples(&text).len(), examples(p.doc).len(), "{}", p.name);
    }
}
