//! `bake-steering` with `coeff = "auto"`: the search picks a coefficient whose first-token KL is
//! within the budget while the bracket's outer end (checked independently, by evaluating the
//! twin and the baked weights) breaks it; an unreachable budget fails the compile with one line
//! and writes nothing; a successful compile records every evaluated point in the manifest and
//! writes the curve; on SmolLM2 the chosen c meets the budget and raises the refusal rate. The
//! search (`mechc::search`) measures candidates through the pass's twin: measuring baked weights
//! instead picks the same c, and the pass run with the chosen c explicitly reproduces the record.

mod common;

use std::path::Path;

use candle_core::{Device, Tensor};
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::Model;
use mechc::passes::BuildCtx;
use mechc::runtime::{HookPoint, Hooks, Op};
use mechc::search::coeff::{self as sa, SearchSpec};
use mechc::search::Builder;
use mechc::verify::refusal::{first_token_kl_fn, first_token_kl_hooked};
use mechc::verify::steer::{projection_hooked, unit_f64};

fn seeded_unit(d: usize, seed: u64) -> Tensor {
    let v: Vec<f32> = (0..d).map(|i| (i as f32 * 0.61 + seed as f32).sin() * 1.3 + 0.2 * (i as f32).cos()).collect();
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    Tensor::from_vec(v.into_iter().map(|x| x / n).collect::<Vec<_>>(), d, &Device::Cpu).unwrap()
}

/// c·v added after block `layer`: written here, independently of the pass and its twin.
fn steer_hooks(layer: usize, v: &Tensor, c: f64) -> Hooks {
    let mut h = Hooks::new();
    h.intervene(HookPoint::ResidPost(layer), Op::Add((v * c).unwrap()));
    h
}

/// bake-steering mode add of `v` (not normalised) after block `layer`, `coeff` left to a search.
fn add_builder(model: &Model, layer: usize, v: &Tensor) -> Builder {
    let dir: Vec<toml::Value> = v.to_vec1::<f32>().unwrap().into_iter().map(|x| toml::Value::Float(x as f64)).collect();
    let mut base: toml::Table = format!("mode = \"add\"\nlayer = {layer}\nnormalize = false").parse().unwrap();
    base.insert("direction".into(), toml::Value::Array(dir));
    Builder::new(mechc::passes::find("bake-steering").unwrap(), "coeff", base, &BuildCtx::new(model))
}

/// A random model, a seeded unit direction steering its last block's output (the projection
/// metric is then linear in c, slope 1, so the best in-budget c is the budget's edge), prompts.
fn random_setup(seed: u64) -> (Model, usize, Tensor, Vec<Vec<u32>>) {
    let model = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
    let (d, n, vocab) = (model.cfg.hidden_size, model.cfg.num_layers, model.cfg.vocab_size as u32);
    let v = seeded_unit(d, seed);
    let prompts: Vec<Vec<u32>> = (0..6u32).map(|i| (0..3 + i).map(|t| (t * 7 + i * 3 + 1) % vocab).collect()).collect();
    (model, n - 1, v, prompts)
}

/// On random tiny models: c within budget, bracket end over it, both by an independent
/// measurement (the twin via `first_token_kl_hooked`, and the baked down_proj bias).
#[test]
fn auto_picks_the_largest_coefficient_within_the_kl_budget_on_random_models() {
    for seed in [2u64, 7, 19] {
        let (model, layer, v, prompts) = random_setup(seed);
        let hi = 20.0;
        // Candidates under c·v added after `layer` (what bake-steering's twin does; some of these
        // random models are Qwen2, which the pass refuses for mode add).
        let twin = |c: f64| -> mechc::Result<Hooks> { Ok(steer_hooks(layer, &v, c)) };
        let mut probe = first_token_kl_fn(&model, &prompts, 4);
        let kl_hi = probe(&twin(hi).unwrap()).unwrap().0;
        let max_kl = kl_hi * 0.3;
        let spec = SearchSpec { max_kl, range: (0.0, hi), grid: 6, tol: 0.01 };
        let mut kl_of = first_token_kl_fn(&model, &prompts, 4);
        let mut kl = |c: f64| kl_of(&twin(c)?);
        let unit = unit_f64(&v).unwrap();
        let mut metric = |c: f64| Ok((projection_hooked(&model, &twin(c)?, &unit, &prompts, 4)?, None));
        let r = sa::search(&spec, &mut kl, &mut metric, prompts.len()).unwrap();
        eprintln!("seed {seed}: c = {:.4}, KL {:.5} (budget {max_kl:.5}), bracket {:?}, {} evaluations", r.value, r.kl, r.bracket, r.trials.len());
        let [ok, bad] = r.bracket.expect("the budget binds inside the range");
        assert_eq!(r.value, ok, "seed {seed}: a metric increasing in c picks the budget's edge");
        assert!(bad > ok && bad - ok <= spec.tol * hi + 1e-9, "seed {seed}: bracket [{ok}, {bad}] wider than tol");
        // The next grid point past the edge is over budget too (the grid was the first bracket).
        let step = hi / (spec.grid - 1) as f64;
        let next_grid = (ok / step).floor() * step + step;
        // Independent measurements of the twin at c, at the bracket end and at the next grid point.
        let twin_kl = |c: f64| first_token_kl_hooked(&model, &model, &steer_hooks(layer, &v, c), &prompts, 3).unwrap().mean;
        let (at_c, at_bad, at_next) = (twin_kl(r.value), twin_kl(bad), twin_kl(next_grid));
        assert!(at_c <= max_kl, "seed {seed}: KL {at_c} at the chosen c exceeds {max_kl}");
        assert!(at_bad > max_kl && at_next > max_kl, "seed {seed}: KL {at_bad} / {at_next} past the edge is within budget");
        assert!((at_c - r.kl).abs() <= 1e-4 * (1.0 + at_c), "seed {seed}: search KL {} vs {at_c}", r.kl);
        // The baked weights measure the same (the twin is exact).
        let mut baked = model.clone();
        let down = &mut baked.blocks[layer].down;
        let cv = (&v * r.value).unwrap();
        down.b = Some(match &down.b {
            Some(b) => (b + &cv).unwrap(),
            None => cv,
        });
        let kl_baked = mechc::verify::refusal::first_token_kl(&model, &baked, &prompts, 3).unwrap().mean;
        assert!((kl_baked - at_c).abs() <= 1e-3 * (1.0 + at_c), "seed {seed}: baked KL {kl_baked} vs twin {at_c}");
        assert!(kl_baked <= max_kl * (1.0 + 1e-3));
    }
}

/// The options have no `select` / `direction = { by }` forms to resolve.
fn as_written(t: &toml::Table) -> mechc::Result<toml::Table> {
    Ok(t.clone())
}

fn coeff(c: f64) -> toml::Table {
    toml::Table::from_iter([("coeff".to_string(), toml::Value::Float(c))])
}

/// The same search with every candidate measured on baked weights (the pass run on a copy, no
/// hooks) instead of through the twin: the same grid, the same choice. The twin is exact up to
/// float rounding, so the KLs agree to rounding and the chosen c (a grid point or Brent's edge,
/// which moves continuously with the KLs) agrees to far less than the search's own tolerance.
#[test]
fn the_search_picks_the_same_coefficient_on_the_twin_and_on_baked_weights() {
    // The first three seeds that give a Llama model (mode add is Llama-only).
    let seeds: Vec<u64> = (0u64..).filter(|&s| RandomSpec::from_seed(s).arch == mechc::model::Arch::Llama).take(3).collect();
    for seed in seeds {
        let (model, layer, v, prompts) = random_setup(seed);
        let b = add_builder(&model, layer, &v);
        let unit = unit_f64(&v).unwrap();
        let hi = 20.0;
        let max_kl = first_token_kl_fn(&model, &prompts, 4)(&steer_hooks(layer, &v, hi)).unwrap().0 * 0.3;
        let spec = SearchSpec { max_kl, range: (0.0, hi), grid: 6, tol: 0.01 };
        let twin = |c: f64| b.build(&coeff(c), &model, &as_written)?.twin(&model);
        let mut kl_of = first_token_kl_fn(&model, &prompts, 4);
        let mut kl = |c: f64| kl_of(&twin(c)?);
        let mut metric = |c: f64| Ok((projection_hooked(&model, &twin(c)?, &unit, &prompts, 4)?, None));
        let by_twin = sa::search(&spec, &mut kl, &mut metric, prompts.len()).unwrap();
        let baked = |c: f64| -> mechc::Result<Model> {
            let mut m = model.clone();
            b.build(&coeff(c), &model, &as_written)?.run(&mut m)?;
            Ok(m)
        };
        let mut kl = |c: f64| {
            let r = mechc::verify::refusal::first_token_kl(&model, &baked(c)?, &prompts, 4)?;
            Ok((r.mean, r.max))
        };
        let mut metric = |c: f64| Ok((projection_hooked(&baked(c)?, &Hooks::new(), &unit, &prompts, 4)?, None));
        let by_weights = sa::search(&spec, &mut kl, &mut metric, prompts.len()).unwrap();
        eprintln!("seed {seed}: twin c = {} ({} trials), baked c = {} ({} trials)", by_twin.value, by_twin.trials.len(), by_weights.value, by_weights.trials.len());
        assert!((by_twin.value - by_weights.value).abs() <= 1e-4 * spec.tol * hi, "seed {seed}: twin c {} vs baked c {}", by_twin.value, by_weights.value);
        let grid = |r: &sa::Outcome| r.trials.iter().filter(|t| t.stage == "grid").map(|t| (t.value, t.kl, t.metric.unwrap())).collect::<Vec<_>>();
        for ((c, k1, m1), (c2, k2, m2)) in grid(&by_twin).into_iter().zip(grid(&by_weights)) {
            assert_eq!(c, c2);
            assert!((k1 - k2).abs() <= 1e-4 * (1.0 + k1), "seed {seed}, c = {c}: KL twin {k1} vs baked {k2}");
            assert!((m1 - m2).abs() <= 1e-4 * (1.0 + m1.abs()), "seed {seed}, c = {c}: projection twin {m1} vs baked {m2}");
        }
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
    let auto = &m["passes"][0]["search"];
    let c = auto["chosen"].as_f64().unwrap();
    let points = auto["trials"].as_array().unwrap();
    let chosen = points.iter().find(|p| p["value"].as_f64() == Some(c)).unwrap_or_else(|| panic!("{auto}"));
    assert!(chosen["kl"].as_f64().unwrap() <= 0.05, "{auto}");
    assert!(points.len() >= 5 && points.iter().any(|p| p["value"].as_f64() == Some(c)), "{auto}");
    assert!(points.iter().all(|p| p["kl"].is_number() && p["stage"].is_string()));
    assert_eq!((auto["option"].as_str(), auto["method"].as_str()), (Some("coeff"), Some("grid+brent")));
    assert_eq!(m["passes"][0]["options"]["coeff"].as_f64(), Some(c), "the options as run hold the chosen c");
    assert!(m["passes"][0]["options"].get("auto").is_none());
    assert!(m["passes"][0]["summary"].as_str().unwrap().contains("coeff = auto"));
    let svg = std::fs::read_to_string(tmp.path().join("curve.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("KL budget"));
    // The baked bias is c·v̂.
    let out = mechc::io::load(&tmp.path().join("out-ok"), false).unwrap();
    let b = out.model.blocks[2].down.b.as_ref().unwrap();
    let norm = b.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap() as f64;
    assert!((norm - c).abs() < 1e-4 * (1.0 + c), "{norm} vs {c}");
}

/// Through the compile driver in-process (stories260K): the pass that ran is the pass built with
/// `coeff` = the record's chosen value, and re-measuring that pass's baked weights, independently
/// of the search, gives the KL and the projection the record holds for the chosen trial.
#[test]
fn the_pass_with_the_chosen_coefficient_reproduces_the_search_record() {
    use mechc::compile::{pipeline::PipelineFile, Plan};
    let tmp = tempfile::tempdir().unwrap();
    stories_setup(tmp.path());
    let p = pipeline(
        tmp.path(),
        "explicit",
        "auto = { max_kl = 0.05, kl_prompts = \"prompts.txt\", chat = false, range = [0, 8], grid = 5, batch = 4 }",
    );
    let loaded = mechc::io::load(&common::stories_gguf(), false).unwrap();
    let plan = Plan::new(PipelineFile::load(&p).unwrap(), None, false, &loaded, false, &|_| {}).unwrap();
    let (compiled, records) = plan.run_passes(&loaded.model, |_, _| {}).unwrap();
    let record = records[0].search.as_ref().expect("coeff = \"auto\" leaves a search record");
    let c = record.chosen;
    let chosen = record.chosen_trial();
    assert!(chosen.within_budget && chosen.kl <= 0.05, "{record:?}");
    // The options as run: coeff explicit, no `auto`; build the pass from them, as a user would.
    let opts = &records[0].options;
    assert_eq!(opts.get("coeff").and_then(|v| v.as_float()), Some(c));
    assert!(!opts.contains_key("auto"));
    let cx = BuildCtx { source: &loaded.model, base_dir: tmp.path(), tok: loaded.tok.as_ref(), progress: false };
    let pass = (mechc::passes::find("bake-steering").unwrap().build)(opts, &cx).unwrap();
    let mut explicit = loaded.model.clone();
    pass.run(&mut explicit).unwrap();
    assert_eq!(common::max_abs_diff(explicit.blocks[2].down.b.as_ref().unwrap(), compiled.blocks[2].down.b.as_ref().unwrap()), 0.0);
    // Re-measured on the explicit pass's weights (no hooks), on the same prompts.
    let tok = loaded.tok().unwrap();
    let texts: Vec<String> = std::fs::read_to_string(tmp.path().join("prompts.txt")).unwrap().lines().map(String::from).collect();
    let ids = tok.prompts_ids(&texts, false).unwrap();
    assert_eq!((record.budget.prompts, record.metric.prompts), (ids.len(), ids.len()));
    let kl = mechc::verify::refusal::first_token_kl(&loaded.model, &explicit, &ids, 4).unwrap().mean;
    let v = mechc::verify::steer::load_direction(&mechc::data::SetSpec::parse(&tmp.path().join("dir.safetensors").display().to_string()), loaded.model.cfg.hidden_size).unwrap();
    let proj = projection_hooked(&explicit, &Hooks::new(), &unit_f64(&v).unwrap(), &ids, 4).unwrap();
    eprintln!("c = {c}: record KL {} / projection {:?}; explicit pass KL {kl} / projection {proj}", chosen.kl, chosen.metric);
    assert!((kl - chosen.kl).abs() <= 1e-4 * (1.0 + kl), "KL {kl} vs record {}", chosen.kl);
    let m = chosen.metric.unwrap();
    assert!((proj - m).abs() <= 1e-4 * (1.0 + proj.abs()), "projection {proj} vs record {m}");
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
    let search = mechc::search::extract("bake-steering", &t, &as_written, &cx).unwrap().expect("coeff = \"auto\" is a search");
    let (pass, _, record) = search.run(model, model, &as_written).unwrap();
    let mut compiled = model.clone();
    let summary = pass.run(&mut compiled).unwrap();
    eprintln!("{}; {summary}\n{}", record.summary(), record.table());
    let auto = serde_json::to_value(&record).unwrap();
    let c = auto["chosen"].as_f64().unwrap();
    let at = |c: f64| auto["trials"].as_array().unwrap().iter().find(|p| p["value"].as_f64() == Some(c)).unwrap()["metric"].as_f64().unwrap();
    assert!(c > 0.0, "{auto}");
    assert!(at(c) > at(0.0), "refusal rate {} at c = {c} does not beat {} unsteered", at(c), at(0.0));
    // Independently: the emitted weights' first-token KL on the same harmless prompts.
    let harmless = mechc::data::TextSet::load(&mechc::data::SetSpec::parse(&format!("{}:instruction", data.join("harmless_train.json").display())), 8).unwrap();
    let ids = tok.prompts_ids(&harmless.texts, true).unwrap();
    let kl = mechc::verify::refusal::first_token_kl(model, &compiled, &ids, 8).unwrap().mean;
    eprintln!("chosen c = {c:.4}: KL of the compiled weights {kl:.4} (search {:.4}), budget {max_kl}", record.chosen_trial().kl);
    assert!(kl <= max_kl * 1.001, "compiled KL {kl} over budget {max_kl}");
}

/// `params = "auto"` (the ablation-kernel search, `mechc::search::kernel`) on SmolLM2 with a few
/// prompts: every trial is recorded, the front is what no trial beats on both refusal score and
/// KL, the chosen trial is on it, within budget, and the lowest confirmed refusal rate; the pass
/// built with the chosen options, its weights rewritten, reproduces the chosen trial's KL and
/// refusal score measured without hooks; a budget no trial meets fails with one line.
#[test]
fn smollm2_kernel_search_records_its_front_and_the_baked_choice_reproduces_it() {
    use mechc::locate::refusal_direction::refusal_score;
    use mechc::runtime::score::last_logprobs;
    let Some(smol) = common::registry_model(common::SMOLLM2) else { return };
    let loaded = mechc::io::load(&smol, false).unwrap();
    let (model, tok) = (&loaded.model, loaded.tok().unwrap());
    let data = common::shared_data().join("prompts/refusal");
    let dir: Vec<toml::Value> = seeded_unit(model.cfg.hidden_size, 7).to_vec1::<f32>().unwrap().into_iter().map(|x| toml::Value::Float(x as f64)).collect();
    let table = |max_kl: f64| -> toml::Table {
        let mut t: toml::Table = format!(
            "mode = \"ablate\"\nembed = false\nparams = \"auto\"\n\
             auto = {{ max_kl = {max_kl}, limit = 6, skip = 100, trials = 8, startup = 4, confirm = 2, max_tokens = 8, batch = 6, \
             kl_prompts = \"{0}:instruction\", metric_prompts = \"{1}:instruction\" }}",
            data.join("harmless_train.json").display(),
            data.join("harmful_train.json").display()
        )
        .parse()
        .unwrap();
        t.insert("direction".into(), toml::Value::Array(dir.clone()));
        t
    };
    let cx = BuildCtx { source: model, base_dir: Path::new("."), tok: Some(tok), progress: false };
    let search = mechc::search::extract("bake-steering", &table(0.5), &as_written, &cx).unwrap().expect("params = \"auto\" is a search");
    let (pass, options, record) = search.run(model, model, &as_written).unwrap();
    eprintln!("{}\n{}", record.summary(), record.table());
    assert_eq!(record.trials.len(), 8);
    assert_eq!(record.trials.iter().filter(|t| t.stage == "startup").count(), 4);
    let pts: Vec<(f64, f64)> = record.trials.iter().map(|t| (t.metric.unwrap(), t.kl)).collect();
    for (i, t) in record.trials.iter().enumerate() {
        let beaten = pts.iter().any(|&(s, k)| s <= pts[i].0 && k <= pts[i].1 && (s < pts[i].0 || k < pts[i].1));
        assert_eq!(record.front.contains(&t.value), !beaten, "trial {} front membership", t.value);
    }
    let chosen = record.chosen_trial().clone();
    assert!(record.front.contains(&chosen.value) && chosen.within_budget && chosen.kl <= 0.5);
    let rates: Vec<f64> = record.trials.iter().filter_map(|t| t.confirmed).collect();
    assert!(!rates.is_empty() && rates.len() <= 2);
    assert_eq!(chosen.confirmed, Some(rates.iter().cloned().fold(f64::INFINITY, f64::min)));
    assert!(options.contains_key("kernel") && !options.contains_key("params") && !options.contains_key("auto"));
    // Baked: the weights rewritten, measured with no hooks, on the same prompts.
    let mut baked = model.clone();
    pass.run(&mut baked).unwrap();
    let texts = |f: &str| mechc::data::TextSet::load(&mechc::data::SetSpec::parse(&format!("{}:instruction", data.join(f).display())), 106).unwrap().texts.split_off(100);
    let (harmless, harmful) = (tok.prompts_ids(&texts("harmless_train.json"), true).unwrap(), tok.prompts_ids(&texts("harmful_train.json"), true).unwrap());
    let kl = mechc::verify::refusal::first_token_kl(model, &baked, &harmless, 4).unwrap().mean;
    let tokens: Vec<u32> = ["I", "As"].iter().map(|t| tok.encode(t, false).unwrap()[0]).collect();
    let mut score = 0.0;
    last_logprobs(&baked, &harmful, &Hooks::new(), 4, |_, lp| score += refusal_score(lp, &tokens)).unwrap();
    score /= harmful.len() as f64;
    eprintln!("baked: KL {kl} (record {}), refusal score {score} (record {:?})", chosen.kl, chosen.metric);
    assert!((kl - chosen.kl).abs() <= 1e-3 * (1.0 + kl), "KL {kl} vs record {}", chosen.kl);
    assert!((score - chosen.metric.unwrap()).abs() <= 1e-3 * (1.0 + score.abs()), "score {score} vs record {:?}", chosen.metric);
    // A budget no trial meets: one clear line.
    let search = mechc::search::extract("bake-steering", &table(1e-9), &as_written, &cx).unwrap().unwrap();
    let e = search.run(model, model, &as_written).err().expect("an unreachable budget fails").to_string();
    assert!(e.contains("budget unreachable") && e.contains("max_kl") && !e.contains('\n'), "{e}");
}
