//! `mechc locate probe`: the logistic-regression probe on synthetic data (optimality of the fit,
//! no label leakage), the harmful/harmless probe on SmolLM2-135M-Instruct with a shuffled-label
//! control (skipped with a message when the model is missing), and the command line (help, a
//! findings file on stories260K, one-line errors on bad input).

mod common;

use std::path::PathBuf;
use std::time::Instant;

use mechc::ir::{Component, Findings};
use mechc::locate::direction::{self as dir, Positions};
use mechc::locate::probe::{self, Objective, Probe, ProbeSite, Sets, Validation};

/// Deterministic standard normals (splitmix64 + Box–Muller).
struct Normal(u64);

impl Normal {
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        ((z >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }
    fn sample(&mut self) -> f64 {
        let (u, v) = (self.uniform(), self.uniform());
        (-2.0 * u.ln()).sqrt() * (2.0 * std::f64::consts::PI * v).cos()
    }
}

/// Two Gaussian clusters (std `sd`) at ±`sep` along a fixed oblique direction, plus an
/// offset and unequal feature scales (so standardisation matters).
fn clusters(n: usize, d: usize, sep: f64, sd: f64, g: &mut Normal) -> (Vec<Vec<f32>>, Vec<bool>) {
    let dir: Vec<f64> = (0..d).map(|j| if j % 3 == 0 { 1.0 } else { 0.0 }).collect();
    let norm = dir.iter().map(|v| v * v).sum::<f64>().sqrt();
    let (mut x, mut y) = (vec![], vec![]);
    for i in 0..2 * n {
        let label = i % 2 == 0;
        let s = if label { sep } else { -sep };
        x.push((0..d).map(|j| ((s * dir[j] / norm + sd * g.sample()) * (1.0 + j as f64) + 3.0) as f32).collect());
        y.push(label);
    }
    (x, y)
}

#[test]
fn probe_fits_to_the_optimum_and_does_not_leak_labels() {
    let mut g = Normal(7);
    let (x, y) = clusters(100, 12, 4.0, 0.5, &mut g);
    let l2 = 1e-2;
    let p = Probe::fit(&x, &y, l2, 1000).unwrap();
    let (acc, loss) = p.score(&x, &y);
    eprintln!("separable: train accuracy {acc}, loss {loss:.5}, {} L-BFGS iterations", p.iters);
    assert_eq!(acc, 1.0);
    // Optimality: the gradient of the regularised objective vanishes at the fitted parameters.
    let (mean, scale) = probe::standardiser(&x);
    let xs: Vec<Vec<f64>> = x.iter().map(|r| r.iter().zip(&mean).zip(&scale).map(|((&v, m), s)| (v as f64 - m) / s).collect()).collect();
    let obj = Objective { x: &xs, y: &y, l2 };
    let theta: Vec<f64> = p.w.iter().copied().chain([p.b]).collect();
    let (f0, grad) = obj.loss_grad(&theta);
    let gnorm = grad.iter().map(|v| v * v).sum::<f64>().sqrt();
    eprintln!("objective {f0:.6}, ‖∇‖ = {gnorm:.2e}");
    assert!(gnorm < 1e-4, "‖∇‖ = {gnorm}");
    // And it is a minimum: small moves in any coordinate do not lower the objective.
    for j in 0..theta.len() {
        for h in [1e-3, -1e-3] {
            let mut t = theta.clone();
            t[j] += h;
            assert!(obj.loss_grad(&t).0 >= f0 - 1e-12, "coordinate {j}");
        }
    }
    // The analytic gradient matches finite differences (at a non-optimal point).
    let t: Vec<f64> = (0..theta.len()).map(|j| 0.1 * ((j as f64) * 0.7).sin()).collect();
    let (_, gt) = obj.loss_grad(&t);
    for j in [0, 5, 12] {
        let (mut a, mut b) = (t.clone(), t.clone());
        a[j] += 1e-6;
        b[j] -= 1e-6;
        let fd = (obj.loss_grad(&a).0 - obj.loss_grad(&b).0) / 2e-6;
        assert!((fd - gt[j]).abs() < 1e-6, "∂{j}: {fd} vs {}", gt[j]);
    }
    // Deterministic.
    assert_eq!(p, Probe::fit(&x, &y, l2, 1000).unwrap());

    // Random labels on random features: held-out accuracy near chance.
    let mut accs = vec![];
    for seed in 0..5u64 {
        let mut g = Normal(100 + seed);
        let mut rand_set = |n: usize| -> (Vec<Vec<f32>>, Vec<bool>) {
            let x = (0..n).map(|_| (0..20).map(|_| g.sample() as f32).collect()).collect();
            let y = (0..n).map(|_| g.uniform() < 0.5).collect();
            (x, y)
        };
        let (tx, ty) = rand_set(300);
        let (vx, vy) = rand_set(300);
        let p = Probe::fit(&tx, &ty, l2, 1000).unwrap();
        let (train, _) = p.score(&tx, &ty);
        let (val, _) = p.score(&vx, &vy);
        eprintln!("random labels, seed {seed}: train accuracy {train:.3}, held-out {val:.3}");
        assert!((val - 0.5).abs() <= 0.15, "held-out accuracy {val}");
        accs.push(val);
    }
    let mean = accs.iter().sum::<f64>() / accs.len() as f64;
    assert!((mean - 0.5).abs() < 0.06, "mean held-out accuracy on random labels {mean}");

    // The seeded split: disjoint, covering, the requested size, deterministic, seed-dependent.
    let (tr, va) = probe::split(100, 0.3, 0);
    assert_eq!(va.len(), 30);
    let mut all: Vec<usize> = tr.iter().chain(&va).copied().collect();
    all.sort_unstable();
    assert_eq!(all, (0..100).collect::<Vec<_>>());
    assert_eq!((tr.clone(), va.clone()), probe::split(100, 0.3, 0));
    assert_ne!(va, probe::split(100, 0.3, 1).1);
    // The shuffled labels are a permutation.
    let labels: Vec<bool> = (0..50).map(|i| i < 20).collect();
    let s = probe::shuffled(&labels, 3);
    assert_eq!(s.iter().filter(|&&t| t).count(), 20);
    assert_ne!(s, labels);

    // Bad input is an error, not a panic.
    assert!(Probe::fit(&[], &[], l2, 10).is_err());
    assert!(Probe::fit(&x, &y, 0.0, 10).is_err());
    assert!(Probe::fit(&x[..3], &y[..2], l2, 10).is_err());
}

fn refusal_data(file: &str) -> PathBuf {
    common::shared_data().join("prompts/refusal").join(file)
}

fn instructions(file: &str, n: usize) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(refusal_data(file)).unwrap()).unwrap();
    v.as_array().unwrap().iter().take(n).map(|r| r["instruction"].as_str().unwrap().to_string()).collect()
}

/// SmolLM2-135M-Instruct (30 layers): harmful vs harmless instructions (64 train each, the 39
/// held-out each), chat template, last token, resid_pre. Some layer's probe reaches ≥ 0.9
/// held-out accuracy; with the train labels shuffled the same probes stay near chance.
#[test]
fn smollm2_probe_decodes_harmfulness_and_shuffled_labels_do_not() {
    let Some(path) = common::registry_model(common::SMOLLM2) else { return };
    std::env::set_var("MECHC_CACHE", common::cache());
    let t0 = Instant::now();
    let loaded = mechc::io::load(&path, false).unwrap();
    let (model, tok) = (&loaded.model, loaded.tok().unwrap());
    let ex = |f: &str, n: usize| dir::prompt_examples(tok, &instructions(f, n), true, Positions::Last).unwrap();
    let sets = Sets {
        pos: ex("harmful_train.json", 64),
        neg: ex("harmless_train.json", 64),
        val: Validation::Sets(ex("harmful_val.json", 39), ex("harmless_val.json", 39)),
    };
    let o = probe::Options {
        site: ProbeSite::ResidPre,
        layers: (0..model.cfg.num_layers).collect(),
        l2: 1e-2,
        max_iters: 500,
        shuffle_labels: false,
        seed: 0,
        batch: 16,
    };
    let acts = probe::collect(model, &sets, &o, |_, _| {}).unwrap();
    eprintln!("activations: {:.0} s", t0.elapsed().as_secs_f64());
    let r = probe::fit_all(&acts, &o, model.cfg.head_dim, |_, _| {}).unwrap();
    eprint!("{}", probe::table(&r));
    let control = probe::fit_all(&acts, &probe::Options { shuffle_labels: true, ..o.clone() }, model.cfg.head_dim, |_, _| {}).unwrap();
    eprintln!("shuffled train labels (seed 0):");
    eprint!("{}", probe::table(&control));
    let best = r.best();
    let c = &control.units[r.best];
    let cmax = control.units.iter().map(|u| u.val_accuracy).fold(0.0, f64::max);
    let cmean = control.units.iter().map(|u| u.val_accuracy).sum::<f64>() / control.units.len() as f64;
    eprintln!(
        "best {} held-out {:.4} (train {:.4}); shuffled control there {:.4}, max over layers {cmax:.4}, mean {cmean:.4}; {:.0} s",
        best.component,
        best.val_accuracy,
        best.train_accuracy,
        c.val_accuracy,
        t0.elapsed().as_secs_f64()
    );
    assert_eq!((r.n_train, r.n_val), ((64, 64), (39, 39)));
    assert!(best.val_accuracy >= 0.9, "best held-out accuracy {}", best.val_accuracy);
    assert!(c.val_accuracy <= 0.7, "shuffled-label control at {}: {}", best.component, c.val_accuracy);
    assert!(cmax <= 0.7, "shuffled-label control, max over layers {cmax}");
    assert!((cmean - 0.5).abs() <= 0.1, "shuffled-label control, mean over layers {cmean}");
}

#[test]
fn locate_probe_cli() {
    let out = common::mechc().args(["locate", "probe", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for opt in [
        "--positive",
        "--negative",
        "--val-positive",
        "--val-negative",
        "--val-fraction",
        "--seed",
        "--limit",
        "--val-limit",
        "--chat",
        "--positions",
        "--site",
        "--layers",
        "--l2",
        "--max-iters",
        "--shuffle-labels",
        "--batch-size",
        "--out",
        "--force",
    ] {
        assert!(help.contains(opt), "{opt} undocumented:\n{help}");
    }

    let model = common::stories_gguf();
    let tmp = tempfile::tempdir().unwrap();
    let spec = |f: &str| format!("{}:instruction", refusal_data(f).display());
    let (pos, neg) = (spec("harmful_train.json"), spec("harmless_train.json"));
    let out = tmp.path().join("probe.json");
    let base = || {
        let mut c = common::mechc();
        c.args(["locate", "probe", "--model"]).arg(&model);
        c
    };

    // Bad input: one line naming the problem, nothing written.
    common::fails(
        base().args(["--positive", "/nonexistent/harmful.json:instruction", "--negative", &neg, "--out"]).arg(&out),
        &["/nonexistent/harmful.json"],
    );
    common::fails(base().args(["--positive", &pos, "--negative", "/nonexistent/harmless.json:instruction", "--out"]).arg(&out), &[
        "/nonexistent/harmless.json",
    ]);
    common::fails(base().args(["--positive", &pos, "--negative", &neg, "--val-fraction", "1.5", "--out"]).arg(&out), &[
        "--val-fraction",
        "1.5",
    ]);
    common::fails(base().args(["--positive", &pos, "--negative", &neg, "--val-positive", &pos]), &["--val-negative"]);
    common::fails(base().args(["--positive", &pos, "--negative", &neg, "--l2", "0"]), &["--l2"]);
    assert!(!out.exists(), "a failed run wrote {}", out.display());

    if !model.exists() {
        eprintln!("SKIPPED: {} is missing", model.display());
        return;
    }
    // A run on stories260K (5 layers): a seeded split, head probes; deterministic findings.
    let run = || {
        base()
            .args(["--positive", &pos, "--negative", &neg, "--limit", "20", "--val-fraction", "0.3", "--seed", "1"])
            .args(["--site", "head", "--layers", "1,3", "--force", "--out"])
            .arg(&out)
            .assert()
            .success();
        std::fs::read_to_string(&out).unwrap()
    };
    let first = run();
    assert_eq!(first, run(), "findings not deterministic");
    let f = Findings::read(&out).unwrap();
    assert_eq!(f.method, "probe");
    assert_eq!(f.model.sha256, mechc::io::sha256_file(&model).unwrap());
    assert_eq!(f.data.len(), 2);
    assert_eq!(f.summary["n_train"], serde_json::json!([14, 14]));
    assert_eq!(f.summary["n_val"], serde_json::json!([6, 6]));
    let heads = mechc::io::load(&model, false).unwrap().model.cfg.num_heads;
    let want: Vec<Component> = [1, 3].iter().flat_map(|&l| (0..heads).map(move |h| Component::Head { layer: l, head: h })).collect();
    assert_eq!(f.scores.iter().map(|s| s.component).collect::<Vec<_>>(), want);
    for s in &f.scores {
        assert!((0.0..=1.0).contains(&s.score));
        assert!(s.extra.contains_key("train_accuracy") && s.extra.contains_key("val_loss"));
    }
    // The existing output without --force.
    common::fails(base().args(["--positive", &pos, "--negative", &neg, "--out"]).arg(&out), &["probe.json", "--force"]);
}
