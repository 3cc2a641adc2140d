//! `mechc compile` end to end on stories260K: identity compile, determinism, budgets that fail
//! the compile and write nothing, pipeline errors, and a real pass checked against its twin.

mod common;

use std::path::{Path, PathBuf};

use mechc::model::decoder::Fwd;
use mechc::runtime::{Batch, Hooks};

/// A pipeline over stories260K with `extra` TOML appended (passes, verify); output `out`.
fn pipeline(dir: &Path, name: &str, extra: &str) -> PathBuf {
    let prompts = dir.join("prompts.json");
    std::fs::write(&prompts, r#"["Once upon a time", "The cat sat on the", "Lily wanted to", "One day, a boy"]"#).unwrap();
    let text = common::shared_data().join("text/tinystories-subset.txt");
    let body = format!(
        "version = 1\n[model]\npath = \"{}\"\n{extra}\n[output]\npath = \"out-{name}\"\n",
        common::stories_gguf().display()
    )
    .replace("PROMPTS", &prompts.display().to_string())
    .replace("TEXT", &text.display().to_string());
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    p
}

fn files(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut v: Vec<(String, Vec<u8>)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect();
    v.sort();
    v
}

#[test]
fn no_passes_reproduces_the_tensors_and_output_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(tmp.path(), "id", "[verify]\nprompts = \"PROMPTS\"\nmax_kl = 0.0\nmin_top1 = 1.0");
    common::mechc().arg("compile").arg(&p).assert().success();
    let out = tmp.path().join("out-id");
    // The tensors equal the source's import bit for bit.
    let src = mechc::io::resolve(&common::stories_gguf(), false).unwrap();
    let a = mechc::io::st::StFile::open(&src.join("model.safetensors")).unwrap();
    let b = mechc::io::st::StFile::open(&out.join("model.safetensors")).unwrap();
    let (va, vb) = (a.view().unwrap(), b.view().unwrap());
    let mut names = va.names();
    names.sort();
    let mut names_b = vb.names();
    names_b.sort();
    assert_eq!(names, names_b);
    for n in names {
        assert_eq!(va.tensor(n).unwrap().data(), vb.tensor(n).unwrap().data(), "{n}");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("mechc-manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["verify"]["checks"].as_array().unwrap().len(), 2);
    assert_eq!(manifest["files"]["model.safetensors"].as_str().unwrap(), mechc::io::sha256_file(&out.join("model.safetensors")).unwrap());
    // Same input + same pipeline → byte-identical output (compiled again elsewhere).
    let again = tmp.path().join("again");
    common::mechc().arg("compile").arg(&p).arg("--out").arg(&again).assert().success();
    assert_eq!(files(&out), files(&again));
    // An existing output is refused without --force, replaced with it.
    common::fails(common::mechc().arg("compile").arg(&p), &["already exists", "--force"]);
    common::mechc().arg("compile").arg(&p).arg("--force").assert().success();
}

#[test]
fn impossible_budget_fails_names_the_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(
        tmp.path(),
        "budget",
        "[[pass]]\nname = \"skip-layers\"\nlayers = [2]\n[verify]\nprompts = \"PROMPTS\"\ntext = \"TEXT\"\ntokens = 512\nseq_len = 128\nmax_ppl_ratio = 1.0",
    );
    let err = common::fails(common::mechc().arg("compile").arg(&p), &["budget violated", "budget.toml:", "max_ppl_ratio = 1.0", "ppl_ratio"]);
    // The line number is the line of the budget in the file.
    let line = std::fs::read_to_string(&p).unwrap().lines().position(|l| l.starts_with("max_ppl_ratio")).unwrap() + 1;
    assert!(err.contains(&format!("budget.toml:{line}:")), "{err}");
    let left: Vec<String> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert!(!left.iter().any(|n| n.contains("out-budget")), "left behind: {left:?}");
}

#[test]
fn pipeline_errors_are_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(tmp.path(), "u", "[[pass]]\nname = \"prune-everything\"");
    common::fails(common::mechc().arg("compile").arg(&p), &["unknown pass `prune-everything`", "skip-layers"]);
    let p = pipeline(tmp.path(), "t", "[[pass]]\nname = \"skip-layers\"\nlayers = \"two\"");
    common::fails(common::mechc().arg("compile").arg(&p), &["pass[0] (skip-layers)", "invalid type"]);
    let p = pipeline(tmp.path(), "r", "[[pass]]\nname = \"skip-layers\"\nlayers = [9]");
    common::fails(common::mechc().arg("compile").arg(&p), &["layer 9 does not exist"]);
    let p = pipeline(tmp.path(), "k", "[[pass]]\nname = \"skip-layers\"\nlayers = [1]\nlayer = [2]");
    common::fails(common::mechc().arg("compile").arg(&p), &["unknown field `layer`"]);
    let p = pipeline(tmp.path(), "v", "[verify]\nmax_kl = 0.1");
    common::fails(common::mechc().arg("compile").arg(&p), &["verify.max_kl", "needs `prompts`"]);
    let p = pipeline(tmp.path(), "s", "[verfy]\nmax_kl = 0.1");
    common::fails(common::mechc().arg("compile").arg(&p), &["line 4", "verfy"]);
}

#[test]
fn skip_layers_output_equals_the_twin_and_dry_run_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(tmp.path(), "skip", "[[pass]]\nname = \"skip-layers\"\nlayers = [1, 3]");
    let o = common::mechc().arg("compile").arg(&p).arg("--dry-run").arg("--dump-ir").output().unwrap();
    assert!(o.status.success());
    assert!(!tmp.path().join("out-skip").exists());
    // --dump-ir: the IR before and after the pass, each parsing back, 5 blocks then 3.
    let text = String::from_utf8(o.stdout).unwrap();
    let dumps: Vec<&str> = text.split("; --- ").filter(|s| !s.is_empty()).collect();
    assert_eq!(dumps.len(), 2, "{text}");
    let ir = |d: &str| mechc::ir::Ir::parse(d.split_once('\n').unwrap().1).unwrap();
    let (before, after) = (ir(dumps[0]), ir(dumps[1]));
    assert!(dumps[1].starts_with("IR after pass skip-layers"));
    let blocks = |ir: &mechc::ir::Ir| ir.components().iter().filter(|c| c.kind() == mechc::ir::Kind::Block).count();
    assert_eq!((blocks(&before), blocks(&after)), (5, 3));
    assert!(after.params() < before.params());
    common::mechc().arg("compile").arg(&p).assert().success();
    let compiled = mechc::io::load(&tmp.path().join("out-skip"), false).unwrap();
    assert_eq!(compiled.model.cfg.num_layers, 3);
    let source = mechc::io::load(&common::stories_gguf(), false).unwrap();
    let ids = source.tok().unwrap().encode("Once upon a time, there was a dog", true).unwrap();
    let got = compiled.model.forward(&Batch::single(&ids), None, &mut Hooks::new(), Fwd::default()).unwrap();
    let mut twin = Hooks::new();
    twin.skip_block(1).skip_block(3);
    let want = source.model.forward(&Batch::single(&ids), None, &mut twin, Fwd::default()).unwrap();
    assert_eq!(common::max_abs_diff(&got, &want), 0.0);
}

#[test]
fn task_budgets_run_on_both_models_and_point_at_their_section() {
    let tmp = tempfile::tempdir().unwrap();
    let cf = common::shared_data().join("prompts/counterfact/counterfact-edit.json");
    let extra = format!(
        "[verify]\nprompts = \"PROMPTS\"\n[verify.refusal]\nprompts = \"PROMPTS\"\nchat = false\nmax_tokens = 8\nmin_rate = 0.5\n\
         [verify.edit]\nrecords = \"{}\"\nlimit = 5\nmin_score = 0.0",
        cf.display()
    );
    let p = pipeline(tmp.path(), "task", &extra);
    // stories260K refuses nothing: min_rate = 0.5 is violated, and the error points at the
    // `min_rate` line of [verify.refusal] (not some other section's key).
    let err = common::fails(common::mechc().arg("compile").arg(&p), &["budget violated", "min_rate = 0.5", "refusal_rate = 0.000000"]);
    let line = std::fs::read_to_string(&p).unwrap().lines().position(|l| l.starts_with("min_rate")).unwrap() + 1;
    assert!(err.contains(&format!("task.toml:{line}:")), "{err}");
    assert!(!tmp.path().join("out-task").exists());
    // Without the impossible bound it compiles, and the manifest has both models' numbers.
    std::fs::write(&p, std::fs::read_to_string(&p).unwrap().replace("min_rate = 0.5", "max_rate = 1.0")).unwrap();
    common::mechc().arg("compile").arg(&p).assert().success();
    let m: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("out-task/mechc-manifest.json")).unwrap()).unwrap();
    let metrics = &m["verify"]["metrics"];
    for k in ["refusal_rate", "refusal_rate_source", "edit_score", "edit_score_source", "edit_efficacy"] {
        assert!(metrics[k].is_number(), "{k} missing: {metrics}");
    }
    // No passes: the compiled model is the source, so every task metric is equal.
    assert_eq!(metrics["edit_score"], metrics["edit_score_source"]);
    assert_eq!(metrics["refusal_rate"], metrics["refusal_rate_source"]);
}

/// `[[locate]]` steps: their findings choose the pass targets (recorded in the manifest with
/// the findings' hash), are cached by content (a second compile reads the cache: shown by
/// editing the cached scores and seeing the choice follow), and other inputs miss the cache.
#[test]
fn locate_steps_select_targets_and_are_cached_by_content() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let text = tmp.path().join("calib.txt");
    std::fs::copy(common::shared_data().join("text/tinystories-subset.txt"), &text).unwrap();
    let step = "[[locate]]\nid = \"bi\"\nmethod = \"block-influence\"\ntext = \"calib.txt\"\ntokens = 512\nseq_len = 128\n";
    let compile = |name: &str, select: &str| {
        let p = pipeline(tmp.path(), name, &format!("{step}[[pass]]\nname = \"skip-layers\"\nselect = {select}"));
        let mut c = common::mechc();
        c.env("MECHC_CACHE", &cache).arg("compile").arg(&p);
        c
    };
    let manifest = |name: &str| -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(tmp.path().join(format!("out-{name}/mechc-manifest.json"))).unwrap()).unwrap()
    };
    compile("a", "{ by = \"bi\", lowest = 1 }").assert().success();
    let entries: Vec<_> = std::fs::read_dir(cache.join("findings")).unwrap().map(|e| e.unwrap().path()).collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let cached = entries[0].join("findings.json");
    let f = mechc::ir::Findings::read(&cached).unwrap();
    assert_eq!((f.method.as_str(), f.scores.len()), ("block-influence", 5));
    let lowest = f.lowest(1)[0].layer().unwrap();
    let m = manifest("a");
    assert_eq!(m["passes"][0]["options"]["layers"], serde_json::json!([lowest]));
    assert!(m["passes"][0]["options"].get("select").is_none());
    let used = &m["passes"][0]["findings"][0];
    assert_eq!((used["by"].as_str(), used["method"].as_str()), (Some("bi"), Some("block-influence")));
    assert_eq!(used["findings_sha256"].as_str().unwrap(), mechc::io::sha256_file(&cached).unwrap());
    assert_eq!(m["locate"][0]["sha256"].as_str().unwrap(), mechc::io::sha256_file(&cached).unwrap());
    assert_eq!(mechc::io::load(&tmp.path().join("out-a"), false).unwrap().model.cfg.num_layers, 4);

    // The cache is read: make another layer the lowest in the cached file.
    let mut edited = f.clone();
    let other = (lowest + 2) % 5;
    for s in &mut edited.scores {
        s.score = if s.component.layer() == Some(other) { -1.0 } else { s.score.abs() + 1.0 };
    }
    edited.write(&cached).unwrap();
    compile("b", "{ by = \"bi\", lowest = 1 }").assert().success();
    assert_eq!(manifest("b")["passes"][0]["options"]["layers"], serde_json::json!([other]));
    // highest / fraction read the same cached scores.
    compile("c", "{ by = \"bi\", highest = 2 }").assert().success();
    let top2 = edited.highest(2).iter().map(|c| c.layer().unwrap()).collect::<std::collections::BTreeSet<_>>();
    let got: std::collections::BTreeSet<usize> =
        manifest("c")["passes"][0]["options"]["layers"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap() as usize).collect();
    assert_eq!(got, top2);

    // Other data misses the cache and recomputes the real scores.
    std::fs::write(&text, std::fs::read_to_string(&text).unwrap().replace("the", "a")).unwrap();
    compile("d", "{ by = \"bi\", lowest = 1 }").assert().success();
    assert_eq!(std::fs::read_dir(cache.join("findings")).unwrap().count(), 2);
    assert_ne!(manifest("d")["passes"][0]["options"]["layers"], serde_json::json!([other]));

    // Bad selections: one-line errors naming the pass, nothing written.
    common::fails(&mut compile("e", "{ by = \"nope\", lowest = 1 }"), &["pass[0] (skip-layers)", "no [[locate]] step", "bi"]);
    common::fails(&mut compile("f", "{ by = \"bi\", lowest = 1, layers = [9] }"), &["select matched nothing"]);
    common::fails(&mut compile("g", "{ by = \"bi\", lowest = 1, fraction = 0.5 }"), &["exactly one of"]);
    for n in ["e", "f", "g"] {
        assert!(!tmp.path().join(format!("out-{n}")).exists());
    }
    let p = pipeline(tmp.path(), "h", "[[locate]]\nmethod = \"block-influence\"\nmodel = \"x\"\n");
    common::fails(common::mechc().env("MECHC_CACHE", &cache).arg("compile").arg(&p), &["locate[0]", "`model` is set by the pipeline"]);
    let p = pipeline(tmp.path(), "i", "[[locate]]\nmethod = \"block-influence\"\ntext = \"calib.txt\"\ntokenz = 3\n");
    common::fails(common::mechc().env("MECHC_CACHE", &cache).arg("compile").arg(&p), &["locate[0] (block-influence)", "--tokenz"]);
}

/// `direction = { by = ID, layer = L }` in a pass and in `[verify.steer]`: both read the vector
/// the `direction` step cached (the baked bias is c·v of that file's tensor), the manifest
/// records it, and naming a step that is not a direction step is a one-line error.
#[test]
fn direction_steps_feed_passes_and_the_steer_budget() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    std::fs::write(tmp.path().join("pos.json"), r#"["Lily was happy and smiled", "The sun was warm and bright", "Tom laughed with his friends", "They played and had fun"]"#).unwrap();
    std::fs::write(tmp.path().join("neg.json"), r#"["Lily was sad and cried", "The night was cold and dark", "Tom was alone and scared", "They lost their toy and wept"]"#).unwrap();
    let step = "[[locate]]\nid = \"mood\"\nmethod = \"direction\"\npositive = \"pos.json\"\nnegative = \"neg.json\"\n";
    let steer = |by: &str| {
        format!(
            "{step}[[pass]]\nname = \"bake-steering\"\nmode = \"add\"\nlayer = 1\ncoeff = 2.0\nnormalize = false\ndirection = {{ by = \"mood\", layer = 2 }}\n\
             [verify]\n[verify.steer]\nprompts = \"PROMPTS\"\ndirection = {{ by = \"{by}\", layer = 2 }}\n"
        )
    };
    let run = |name: &str, body: &str| {
        let p = pipeline(tmp.path(), name, body);
        let mut c = common::mechc();
        c.env("MECHC_CACHE", &cache).arg("compile").arg(&p);
        c
    };
    run("a", &steer("mood")).assert().success();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join("out-a/mechc-manifest.json")).unwrap()).unwrap();
    let used = &m["passes"][0]["findings"][0];
    assert_eq!((used["by"].as_str(), used["selected"].as_str()), (Some("mood"), Some("blocks.2.hook_resid_pre")));
    let vectors = m["passes"][0]["options"]["direction"].as_str().unwrap().rsplit_once(':').unwrap().0.to_string();
    assert!(vectors.starts_with(cache.to_str().unwrap()), "{vectors}");
    let v = mechc::io::st::StFile::open(std::path::Path::new(&vectors)).unwrap().get("blocks.2.hook_resid_pre").unwrap().unwrap();
    let out = mechc::io::load(&tmp.path().join("out-a"), false).unwrap().model;
    let bias = out.blocks[1].down.b.clone().expect("add mode writes down_proj's bias");
    let want = (v.to_dtype(candle_core::DType::F32).unwrap() * 2.0).unwrap();
    assert!(common::rel_diff(&bias, &want) < 1e-6, "bias is not 2·v");
    let metrics = &m["verify"]["metrics"];
    assert!(metrics["steer_gain"].as_f64().unwrap() > 0.0, "adding +2v must raise the projection on v: {metrics}");

    let bi = "[[locate]]\nid = \"bi\"\nmethod = \"block-influence\"\ntext = \"TEXT\"\ntokens = 256\nseq_len = 128\n";
    common::fails(&mut run("b", &format!("{bi}{}", steer("bi"))), &["verify.steer.direction", "`bi` is a block-influence step"]);
    assert!(!tmp.path().join("out-b").exists());
}

/// An existing output is refused before anything is loaded: a pipeline whose model does not
/// exist gets the output error, for `--out` and for `[output] path`, and a locate step with a
/// bad option is reported before the model is loaded too.
#[test]
fn outputs_and_steps_are_checked_before_the_model_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let existing = tmp.path().join("out-x");
    std::fs::create_dir(&existing).unwrap();
    let body = "version = 1\n[model]\npath = \"no-such-model.gguf\"\n[output]\npath = \"out-x\"\n";
    let p = tmp.path().join("x.toml");
    std::fs::write(&p, body).unwrap();
    common::fails(common::mechc().arg("compile").arg(&p), &["out-x", "already exists", "--force"]);
    let other = tmp.path().join("other");
    std::fs::create_dir(&other).unwrap();
    common::fails(common::mechc().arg("compile").arg(&p).arg("--out").arg(&other), &["other", "already exists"]);
    // With --force the model is what is missing.
    common::fails(common::mechc().arg("compile").arg(&p).arg("--force"), &["no-such-model.gguf"]);
    let step = format!("version = 1\n[model]\npath = \"no-such-model.gguf\"\n[[locate]]\nmethod = \"block-influence\"\ntext = \"{}\"\ntokens = \"many\"\n[output]\npath = \"out-y\"\n", common::shared_data().join("text/tinystories-subset.txt").display());
    std::fs::write(&p, step).unwrap();
    common::fails(common::mechc().arg("compile").arg(&p), &["locate[0] (block-influence)", "--tokens", "many"]);
    assert!(!tmp.path().join("out-y").exists());
}

/// The library's compile owns the gate: a violated budget is `Failure::Budget` with the
/// verdict, and nothing is written; within budget it emits, and a dry run writes nothing.
#[test]
fn library_compile_writes_nothing_when_a_budget_fails() {
    use mechc::compile::{compile, pipeline::PipelineFile, Failure, Request};
    struct Quiet;
    impl mechc::compile::Observer for Quiet {}
    let tmp = tempfile::tempdir().unwrap();
    let p = pipeline(tmp.path(), "lib", "[[pass]]\nname = \"skip-layers\"\nlayers = [2]\n[verify]\nprompts = \"PROMPTS\"\nmax_kl = 0.0");
    match compile(PipelineFile::load(&p).unwrap(), &Request::default(), &mut Quiet) {
        Err(Failure::Budget { violations, verdict }) => {
            assert_eq!(violations.len(), 1, "{violations:?}");
            assert!(violations[0].contains("max_kl = 0.0"), "{violations:?}");
            assert!(verdict.metrics["kl_first_mean"] > 0.0, "{:?}", verdict.metrics);
        }
        other => panic!("expected a budget failure, got {other:?}"),
    }
    assert!(!tmp.path().join("out-lib").exists());
    let dry = compile(PipelineFile::load(&p).unwrap(), &Request { dry_run: true, ..Default::default() }, &mut Quiet).unwrap();
    assert!(dry.out.is_none() && dry.verdict.is_none() && dry.records.len() == 1);
    assert!(!tmp.path().join("out-lib").exists());
    let p = pipeline(tmp.path(), "lib2", "[[pass]]\nname = \"skip-layers\"\nlayers = [2]\n[verify]\nprompts = \"PROMPTS\"\nmax_kl = 100.0");
    let done = compile(PipelineFile::load(&p).unwrap(), &Request::default(), &mut Quiet).unwrap();
    assert_eq!(done.out.as_deref(), Some(tmp.path().join("out-lib2").as_path()));
    assert!(done.verdict.unwrap().ok());
    assert_eq!(mechc::io::load(&tmp.path().join("out-lib2"), false).unwrap().model.cfg.num_layers, 4);
}

/// What a compile prints names inputs as the pipeline gives them, not as resolved paths.
#[test]
fn locate_steps_print_their_options_as_given() {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::copy(common::shared_data().join("text/tinystories-subset.txt"), tmp.path().join("calib.txt")).unwrap();
    let step = "[[locate]]\nid = \"bi\"\nmethod = \"block-influence\"\ntext = \"calib.txt\"\ntokens = 256\nseq_len = 128\n";
    let p = pipeline(tmp.path(), "said", &format!("{step}[[pass]]\nname = \"skip-layers\"\nselect = {{ by = \"bi\", lowest = 1 }}"));
    let o = assert_cmd::Command::cargo_bin("mechc")
        .unwrap()
        .env("MECHC_CACHE", tmp.path().join("cache"))
        .args(["compile", "--no-progress", "--dry-run"])
        .arg(&p)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("text = \"calib.txt\""), "{err}");
    let abs = tmp.path().canonicalize().unwrap().join("calib.txt");
    assert!(!err.contains(&abs.display().to_string()), "resolved paths printed: {err}");
    assert!(err.contains("dry run") && err.contains("cache"), "{err}");
}
