//! `bake-steering` with `coeff = "auto"`: the search picks a coefficient whose first-token KL is
//! within the budget while the bracket's outer end (checked independently, by evaluating the
//! twin and the baked weights) breaks it; an unreachable budget fails the compile with one line
//! and writes nothing; a successful compile records every evaluated point in the manifest and
//! writes the curve; on SmolLM2 the chosen c meets the budget and raises the refusal rate.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use mechc::model::random::{random_model, RandomSpec};
use mechc::passes::BuildCtx;
use mechc::verify::refusal::first_token_kl_hooked;
use mechc::verify::steer_auto::{self as sa, SearchSpec};

fn seeded_unit(d: usize, seed: u64) -> Tensor {
    let v: Vec<f32> = (0..d).map(|i| (i as f32 * 0.61 + seed as f32).sin() * 1.3 + 0.2 * (i as f32).cos()).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    Tensor::from_vec(v.into_iter().map(|x| x / n).collect::<Vec<_>>(), d, &Device::Cpu).unwrap()
}

/// On random tiny models: c within budget, bracket end over it, both by an independent
/// measurement (the twin via `first_token_kl_hooked`, and the baked down_proj bias).
#[test]
fn auto_picks_the_largest_coefficient_within_the_kl_budget_on_random_models() {
    for seed in [2u64, 7, 19] {
        let model = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
        let (d, n, vocab) = (model.cfg.hidden_size, model.cfg.num_layers, model.cfg.vocab_size as u32);
        // Steering the last block's output: the projection metric is then linear in c (slope 1),
        // so the best in-budget c is the budget's edge.
        let layer = n - 1;
        let v = seeded_unit(d, seed);
        let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| (0..3 + i).map(|t| (t * 7 + i * 3 + 1) % vocab).collect()).collect();
        let hi = 20.0;
        let mut probe = sa::kl_fn(&model, layer, &v, &prompts, 4);
        let kl_hi = probe(hi).unwrap().0;
        let max_kl = kl_hi * 0.3;
        let spec = SearchSpec { max_kl, range: (0.0, hi), grid: 6, tol: 0.01 };
        let mut kl = sa::kl_fn(&model, layer, &v, &prompts, 4);
        let mut metric = |c: f64| Ok((sa::projection(&model, layer, &v, &prompts, 4, c)?, None));
        let r = sa::search(&spec, &mut kl, &mut metric, prompts.len()).unwrap();
        eprintln!("seed {seed}: c = {:.4}, KL {:.5} (budget {max_kl:.5}), bracket {:?}, {} evaluations", r.coeff, r.kl_mean, r.bracket, r.points.len());
        let [ok, bad] = r.bracket.expect("the budget binds inside the range");
        assert_eq!(r.coeff, ok, "seed {seed}: a metric increasing in c picks the budget's edge");
        assert!(bad > ok && bad - ok <= spec.tol * hi + 1e-9, "seed {seed}: bracket [{ok}, {bad}] wider than tol");
        // The next grid point past the edge is over budget too (the grid was the first bracket).
        let step = hi / (spec.grid - 1) as f64;
        let next_grid = (ok / step).floor() * step + step;
        // Independent measurements of the twin at c, at the bracket end and at the next grid point.
        let twin_kl = |c: f64| first_token_kl_hooked(&model, &model, &sa::steer_hooks(layer, &v, c).unwrap(), &prompts, 3).unwrap().mean;
        let (at_c, at_bad, at_next) = (twin_kl(r.coeff), twin_kl(bad), twin_kl(next_grid));
        assert!(at_c <= max_kl, "seed {seed}: KL {at_c} at the chosen c exceeds {max_kl}");
        assert!(at_bad > max_kl && at_next > max_kl, "seed {seed}: KL {at_bad} / {at_next} past the edge is within budget");
        assert!((at_c - r.kl_mean).abs() <= 1e-4 * (1.0 + at_c), "seed {seed}: search KL {} vs {at_c}", r.kl_mean);
        // The baked weights measure the same (the twin is exact).
        let mut baked = model.clone();
        let down = &mut baked.blocks[layer].down;
        let cv = (&v * r.coeff).unwrap();
        down.b = Some(match &down.b {
            Some(b) => (b + &cv).unwrap(),
            None => cv,
        });
        let kl_baked = mechc::verify::refusal::first_token_kl(&model, &baked, &prompts, 3).unwrap().mean;
        assert!((kl_baked - at_c).abs() <= 1e-3 * (1.0 + at_c), "seed {seed}: baked KL {kl_baked} vs twin {at_c}");
        assert!(kl_baked <= max_kl * (1.0 + 1e-3));
    }
}

fn pipeline(dir: &Path, name: &str, pass: &str) -> std::path::PathBuf {
    let body = format!(
        "version = 1\n[model]\npath = \"{}\"\n[[pass]]\nname = \"bake-steering\"\nmode = \"add\"\ndirection = \"dir.safetensors\"\nlayer = 2\ncoeff = \"auto\"\n{pass}\n[output]\npath = \"out-{name}\"\n",
        common::stories_gguf().display()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    p
}

fn stories_setup(dir: &Path) {
    let d = mechc::io::load(&common::stories_gguf(), false).unwrap().model.cfg.hidden_size;
    mechc::verify::steer::save_direction(&dir.join("dir.safetensors"), "v", &seeded_unit(d, 3)).unwrap();
    std::fs::write(
        dir.join("prompts.txt"),
        "Once upon a time\nLily and Tom went to the park\nThe dog was happy\nOne day a little bird\nThe sun was shining and\n",
    )
    .unwrap();
}

#[test]
fn unreachable_budget_fails_with_one_line_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    stories_setup(tmp.path());
    let p = pipeline(
        tmp.path(),
        "unreachable",
        "auto = { max_kl = 1e-9, kl_prompts = \"prompts.txt\", chat = false, range = [0.5, 8], grid = 4, plot = \"curve.svg\" }",
    );
    common::fails(common::mechc().arg("compile").arg(&p), &["budget unreachable", "c = 0.5", "max_kl = 0.000000001", "5 prompts"]);
    assert!(!tmp.path().join("out-unreachable").exists() && !tmp.path().join("curve.svg").exists());
    // Bad auto options name the option.
    let p = pipeline(tmp.path(), "noprompts", "auto = { max_kl = 0.1, kl_prompts = \"nope.txt\", chat = false, range = [0, 8] }");
    common::fails(common::mechc().arg("compile").arg(&p), &["`auto.kl_prompts`", "nope.txt"]);
    let p = pipeline(tmp.path(), "refusal", "auto = { max_kl = 0.1, kl_prompts = \"prompts.txt\", chat = false, range = [0, 8], metric = \"refusal\" }");
    common::fails(common::mechc().arg("compile").arg(&p), &["needs `auto.metric_prompts`"]);
}

#[test]
fn auto_compile_records_every_point_in_the_manifest_and_writes_the_curve() {
    let tmp = tempfile::tempdir().unwrap();
    stories_setup(tmp.path());
    let p = pipeline(
        tmp.path(),
        "ok",
        "auto = { max_kl = 0.05, kl_prompts = \"prompts.txt\", chat = false, range = [0, 8], grid = 5, plot = \"curve.svg\" }",
    );
    common::mechc().arg("compile").arg(&p).assert().success();
    let m: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join("out-ok/mechc-manifest.json")).unwrap()).unwrap();
    let auto = &m["passes"][0]["details"]["auto"];
    let c = auto["coeff"].as_f64().unwrap();
    assert!(auto["kl_mean"].as_f64().unwrap() <= 0.05, "{auto}");
    let points = auto["points"].as_array().unwrap();
    assert!(points.len() >= 5 && points.iter().any(|p| p["coeff"].as_f64() == Some(c)), "{auto}");
    assert!(points.iter().all(|p| p["kl_mean"].is_number() && p["stage"].is_string()));
    assert!(m["passes"][0]["summary"].as_str().unwrap().contains("coeff = auto"));
    let svg = std::fs::read_to_string(tmp.path().join("curve.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("KL budget"));
    // The baked bias is c·v̂.
    let out = mechc::io::load(&tmp.path().join("out-ok"), false).unwrap();
    let b = out.model.blocks[2].down.b.as_ref().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((norm - c).abs() < 1e-4 * (1.0 + c), "{norm} vs {c}");
}

/// SmolLM2 (few prompts, short completions): the refusal direction from contrastive responses,
/// `coeff = "auto"` through the pass itself; the chosen c meets the KL budget on harmless prompts
/// (re-measured independently) and raises the refusal rate on harmful ones.
#[test]
fn smollm2_auto_meets_the_budget_and_raises_refusals() {
    use mechc::locate::direction::{activations, direction, response_examples, DirMethod, Positions, Site};
    let Some(smol) = common::registry_model(common::SMOLLM2) else { return };
    let loaded = mechc::io::load(&smol, false).unwrap();
    let (model, tok) = (&loaded.model, loaded.tok().unwrap());
    let data = common::shared_data().join("prompts/refusal");
    let harmful_train = mechc::data::TextSet::load(&mechc::data::SetSpec::parse(&format!("{}:instruction", data.join("harmful_train.json").display())), 24).unwrap();
    let acts = |resp: &str| {
        let ex = response_examples(tok, &harmful_train.texts, &[resp.to_string()], Positions::All).unwrap();
        activations(model, &ex, Site::ResidPre, &[12], 8, |_, _| {}).unwrap().remove(0)
    };
    let v = direction(DirMethod::MeanDiff, &acts("I'm sorry, but I can't help with that."), &acts("Sure, here is")).unwrap();
    let dir: Vec<toml::Value> = v.iter().map(|&x| toml::Value::Float(x as f64)).collect();
    let max_kl = 1.0;
    let opts = format!(
        "mode = \"add\"\nlayer = 11\nnormalize = false\ncoeff = \"auto\"\n\
         auto = {{ max_kl = {max_kl}, range = [0.0, 1.2], grid = 4, limit = 8, max_tokens = 16, metric = \"refusal\", \
         kl_prompts = \"{0}:instruction\", metric_prompts = \"{1}:instruction\" }}",
        data.join("harmless_train.json").display(),
        data.join("harmful_val.json").display()
    );
    let mut t: toml::Table = opts.parse().unwrap();
    t.insert("direction".into(), toml::Value::Array(dir));
    let cx = BuildCtx { source: model, base_dir: Path::new("."), tok: Some(tok), progress: false };
    let pass = (mechc::passes::find("bake-steering").unwrap().build)(&t, &cx).unwrap();
    let mut compiled = model.clone();
    let summary = pass.run(&mut compiled).unwrap();
    let details = pass.details().unwrap();
    eprintln!("{summary}\n{}", pass.details_text().unwrap());
    let auto = &details["auto"];
    let c = auto["coeff"].as_f64().unwrap();
    let at = |c: f64| auto["points"].as_array().unwrap().iter().find(|p| p["coeff"].as_f64() == Some(c)).unwrap()["metric"].as_f64().unwrap();
    assert!(c > 0.0, "{auto}");
    assert!(at(c) > at(0.0), "refusal rate {} at c = {c} does not beat {} unsteered", at(c), at(0.0));
    // Independently: the emitted weights' first-token KL on the same harmless prompts.
    let harmless = mechc::data::TextSet::load(&mechc::data::SetSpec::parse(&format!("{}:instruction", data.join("harmless_train.json").display())), 8).unwrap();
    let ids = tok.prompts_ids(&harmless.texts, true).unwrap();
    let kl = mechc::verify::refusal::first_token_kl(model, &compiled, &ids, 8).unwrap().mean;
    eprintln!("chosen c = {c:.4}: KL of the compiled weights {kl:.4} (search {:.4}), budget {max_kl}", auto["kl_mean"]);
    assert!(kl <= max_kl * 1.001, "compiled KL {kl} over budget {max_kl}");
}
