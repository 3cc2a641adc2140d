//! Attribution patching: its gradients against finite differences of the same metric on random
//! models, exact zeros where clean and corrupted activations are equal, sign agreement with real
//! patching on the top sites, the rank agreement with `patch` over every head of SmolLM2, the
//! CLI (and its bad input), and an `#[ignore]`d benchmark against patching.

mod common;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{IndexOp, Tensor};
use mechc::locate::attribute::{self as at, Attribution};
use mechc::locate::patch::{self as ap, Metric, PatchSite};
use mechc::model::decoder::Fwd;
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::Model;
use mechc::runtime::{Batch, HookPoint, Hooks, Op};

fn tiny(seed: u64) -> Model {
    let mut spec = RandomSpec::from_seed(seed);
    spec.layers = 3;
    random_model(spec.config(), seed).unwrap()
}

/// The metric as patch defines it, on the inference forward's last-position logits.
fn metric_of(m: &Model, ids: &[u32], hooks: &mut Hooks, metric: Metric, answer: u32, wrong: u32) -> f64 {
    let logits = m.forward(&Batch::single(ids), None, hooks, Fwd { last_only: true, ..Fwd::default() }).unwrap();
    let last: Vec<f32> = logits.flatten_all().unwrap().to_vec1().unwrap();
    match metric {
        Metric::LogitDiff => (last[answer as usize] - last[wrong as usize]) as f64,
        Metric::Prob => {
            let max = last.iter().fold(f32::MIN, |a, &b| a.max(b)) as f64;
            let z: f64 = last.iter().map(|&x| (x as f64 - max).exp()).sum();
            (last[answer as usize] as f64 - max).exp() / z
        }
    }
}

fn capture(m: &Model, ids: &[u32], p: HookPoint) -> Tensor {
    let mut h = Hooks::new();
    h.capture(p);
    m.forward(&Batch::single(ids), None, &mut h, Fwd { last_only: true, ..Fwd::default() }).unwrap();
    h.captured[&p].clone()
}

/// (clean − corrupt) at `p`, zero outside the unit selected by `keep(flat index)`.
fn direction(m: &Model, clean: &[u32], corrupt: &[u32], p: HookPoint, keep: impl Fn(&[usize], usize) -> bool) -> Tensor {
    let d = (capture(m, clean, p) - capture(m, corrupt, p)).unwrap();
    let dims = d.dims().to_vec();
    let mut v: Vec<f32> = d.flatten_all().unwrap().to_vec1().unwrap();
    for (i, x) in v.iter_mut().enumerate() {
        if !keep(&dims, i) {
            *x = 0.0;
        }
    }
    Tensor::from_vec(v, dims, &candle_core::Device::Cpu).unwrap()
}

fn pair(m: &Model, seed: u64) -> (Vec<u32>, Vec<u32>, usize) {
    let v = m.cfg.vocab_size as u32;
    let clean: Vec<u32> = (0..6).map(|i| (i * 5 + seed as u32) % v).collect();
    let mut corrupt = clean.clone();
    let p = 2;
    corrupt[p] = (clean[p] + 1) % v;
    (clean, corrupt, p)
}

/// The unnormalised attribution of a unit is ∇M · (a_clean − a_corrupt restricted to it): check it
/// against the central difference (M(a + εv) − M(a − εv)) / 2ε of the inference forward.
#[test]
fn attribution_equals_finite_difference_of_the_metric() {
    let mut checked = 0;
    for seed in 0..6u64 {
        let m = tiny(seed);
        let (clean, corrupt, _) = pair(&m, seed);
        for metric in [Metric::LogitDiff, Metric::Prob] {
            let (answer, wrong) = (1u32, 2u32);
            let r = at::attribute(&m, &clean, &corrupt, Some(answer), Some(wrong), metric).unwrap();
            let gap = r.m_clean - r.m_corrupt;
            assert!((r.m_corrupt - metric_of(&m, &corrupt, &mut Hooks::new(), metric, answer, wrong)).abs() < 1e-5);
            let fd = |p: HookPoint, v: &Tensor| -> f64 {
                let eps = 1e-2;
                let at_eps = |s: f64| {
                    let d = (v * s).unwrap();
                    let mut h = Hooks::new();
                    h.intervene(p, Op::Func(Arc::new(move |x: &Tensor| x.broadcast_add(&d))));
                    metric_of(&m, &corrupt, &mut h, metric, answer, wrong)
                };
                (at_eps(eps) - at_eps(-eps)) / (2.0 * eps)
            };
            // Every head, the first few neurons, and the residual stream at the changed position.
            let mut pairs: Vec<(String, f64, f64)> = vec![];
            for l in 0..m.cfg.num_layers {
                let heads = r.heads.iter().filter(|row| row[l].is_finite()).count();
                let hd = m.cfg.head_dim;
                for h in 0..heads {
                    let v = direction(&m, &clean, &corrupt, HookPoint::AttnZ(l), |_, i| (i / hd) % heads == h);
                    pairs.push((format!("L{l}.H{h}"), r.heads[h][l] * gap, fd(HookPoint::AttnZ(l), &v)));
                }
                let dff = m.cfg.intermediate_size;
                for n in 0..dff.min(4) {
                    let v = direction(&m, &clean, &corrupt, HookPoint::MlpPost(l), |_, i| i % dff == n);
                    pairs.push((format!("L{l}.N{n}"), r.neurons[l][n] * gap, fd(HookPoint::MlpPost(l), &v)));
                }
                let d = m.cfg.hidden_size;
                let v = direction(&m, &clean, &corrupt, HookPoint::ResidPre(l), |_, i| i / d == 2);
                pairs.push((format!("resid L{l} pos 2"), r.resid[2][l] * gap, fd(HookPoint::ResidPre(l), &v)));
                let v = direction(&m, &clean, &corrupt, HookPoint::MlpOut(l), |_, i| i / d == 5);
                pairs.push((format!("mlp L{l} pos 5"), r.mlp[5][l] * gap, fd(HookPoint::MlpOut(l), &v)));
            }
            let scale = pairs.iter().fold(0f64, |a, p| a.max(p.1.abs()));
            for (name, got, want) in &pairs {
                assert!(
                    (got - want).abs() <= 1e-2 * scale + 1e-3,
                    "seed {seed} {metric:?} {name}: attribution {got} vs finite difference {want} (scale {scale})"
                );
                checked += 1;
            }
        }
    }
    assert!(checked > 100, "{checked}");
}

/// Positions before the changed token have bitwise-equal activations in both runs: their
/// attribution is exactly 0. The first-order estimate agrees in sign with real patching on
/// the heads it ranks highest, and the input checks are patch's.
#[test]
fn zero_where_equal_and_sign_agrees_with_patching() {
    let (mut agree, mut total) = (0, 0);
    for seed in 0..6u64 {
        let m = tiny(seed);
        let (clean, corrupt, p) = pair(&m, seed);
        let r: Attribution = at::attribute(&m, &clean, &corrupt, Some(1), Some(2), Metric::LogitDiff).unwrap();
        for l in 0..m.cfg.num_layers {
            for q in 0..p {
                assert_eq!(r.resid[q][l], 0.0, "seed {seed} resid L{l} pos {q}");
                assert_eq!(r.mlp[q][l], 0.0, "seed {seed} mlp L{l} pos {q}");
            }
        }
        let real = ap::patch(&m, &clean, &corrupt, Some(1), Some(2), Metric::LogitDiff, &[PatchSite::Head], |_, _| {}).unwrap();
        assert!((real.m_clean - r.m_clean).abs() < 1e-4 && (real.m_corrupt - r.m_corrupt).abs() < 1e-4);
        let top = at::top_heads(&r, 3);
        let patched = ap::patch_heads(&m, &clean, &corrupt, Some(1), Some(2), Metric::LogitDiff, &top).unwrap();
        for (&(l, h), &x) in top.iter().zip(&patched) {
            // patch_heads is patch's head grid.
            assert!((x - real.grids[0].1[h][l]).abs() < 1e-9);
            if x.abs() > 0.05 {
                total += 1;
                agree += (x.signum() == r.heads[h][l].signum()) as usize;
                eprintln!("seed {seed} L{l}.H{h}: attribution {:.4} patch {x:.4}", r.heads[h][l]);
            }
        }
        // Input checks: lengths, equal answers, nothing to restore.
        assert!(at::attribute(&m, &clean, &corrupt[..5], None, None, Metric::Prob).is_err());
        assert!(at::attribute(&m, &clean, &corrupt, Some(1), Some(1), Metric::LogitDiff).is_err());
        assert!(at::attribute(&m, &clean, &clean, Some(1), Some(2), Metric::LogitDiff).is_err());
    }
    eprintln!("sign agreement on the top-3 heads with |patch| > 0.05: {agree}/{total}");
    assert!(total >= 6, "{total}");
    assert_eq!(agree, total, "sign disagreements on the top heads");
}

#[test]
fn spearman_basics() {
    assert!((at::spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]) - 1.0).abs() < 1e-12);
    assert!((at::spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
    // Ties take their mean rank: ranks (0.5, 0.5, 2) vs (0, 1, 2).
    let r = at::spearman(&[1.0, 1.0, 5.0], &[1.0, 2.0, 3.0]);
    assert!((r - 0.866_025_403_784_438_6).abs() < 1e-12, "{r}");
    assert!(at::spearman(&[1.0], &[2.0]).is_nan());
}

/// A known_1000 pair on SmolLM2. Chosen by a fixed rule, not by its result: the relation
/// "{} is located in the country of" (one-token country answers, the subject is the only
/// difference); the clean prompt is the first such record the model answers right (greedy =
/// the attribute's first token), the corrupted one the next record with the same token length
/// and a different answer that the model also answers right. Metric: logit(clean answer) −
/// logit(corrupted answer).
fn smollm2_pair(m: &Model, tok: &mechc::tokenizer::Tok) -> (Vec<u32>, Vec<u32>, u32, u32, String) {
    let set = mechc::data::RecordSet::load(&common::shared_data().join("prompts/facts/known_1000.json"), 0).unwrap();
    let mut clean: Option<(Vec<u32>, u32, String)> = None;
    for i in 0..set.records.len() {
        if set.str_field(i, "template").unwrap() != "{} is located in the country of" {
            continue;
        }
        let prompt = set.str_field(i, "prompt").unwrap().to_string();
        let ids = tok.prompt_ids(&prompt, false).unwrap();
        let answer = tok.encode(&format!(" {}", set.str_field(i, "attribute").unwrap()), false).unwrap()[0];
        if let Some((c, a, _)) = &clean {
            if ids.len() != c.len() || answer == *a {
                continue;
            }
        }
        let logits = m.forward(&Batch::single(&ids), None, &mut Hooks::new(), Fwd { last_only: true, ..Fwd::default() }).unwrap();
        if logits.flatten_all().unwrap().argmax(0).unwrap().to_scalar::<u32>().unwrap() != answer {
            continue;
        }
        match clean.take() {
            None => clean = Some((ids, answer, prompt)),
            Some((c, a, cp)) => return (c, ids, a, answer, format!("{cp:?} / {prompt:?}")),
        }
    }
    panic!("no pair found");
}

fn smollm2() -> Option<mechc::io::Loaded> {
    let path = common::registry_model(common::SMOLLM2)?;
    if std::env::var_os("MECHC_CACHE").is_none() {
        std::env::set_var("MECHC_CACHE", common::cache());
    }
    Some(mechc::io::load(&path, false).unwrap())
}

fn all_heads(a: &Attribution, p: &ap::Patching) -> (Vec<f64>, Vec<f64>) {
    let grid = &p.grids[0].1;
    let (mut x, mut y) = (vec![], vec![]);
    for (h, row) in a.heads.iter().enumerate() {
        for (l, &v) in row.iter().enumerate() {
            x.push(v);
            y.push(grid[h][l]);
        }
    }
    (x, y)
}

#[test]
fn smollm2_attribution_ranks_heads_like_patching() {
    let Some(loaded) = smollm2() else { return };
    let (m, tok) = (&loaded.model, loaded.tok().unwrap());
    let (clean, corrupt, answer, wrong, which) = smollm2_pair(m, tok);
    eprintln!("pair: {which}, {} tokens, answer {answer} wrong {wrong}", clean.len());
    let a = at::attribute(m, &clean, &corrupt, Some(answer), Some(wrong), Metric::LogitDiff).unwrap();
    let p = ap::patch(m, &clean, &corrupt, Some(answer), Some(wrong), Metric::LogitDiff, &[PatchSite::Head], |_, _| {}).unwrap();
    let (x, y) = all_heads(&a, &p);
    assert_eq!(x.len(), 30 * 9);
    let rho = at::spearman(&x, &y);
    let top = at::top_heads(&a, 10);
    for &(l, h) in &top {
        eprintln!("L{l}.H{h}: attribution {:.4} patch {:.4}", a.heads[h][l], p.grids[0].1[h][l]);
    }
    eprintln!("m_clean {:.3} m_corrupt {:.3}; Spearman over all {} heads: {rho:.3}", a.m_clean, a.m_corrupt, x.len());
    assert!(rho >= 0.7, "Spearman {rho}");
}

#[test]
fn cli_on_stories260k() {
    let h = common::mechc().args(["locate", "attribute", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&h.stdout);
    for opt in ["--model", "--clean", "--corrupted", "--chat", "--answer", "--wrong", "--metric", "--neurons", "--verify-top", "--out", "--plot", "--force"] {
        assert!(help.contains(opt), "{opt} undocumented:\n{help}");
    }
    let model = common::stories_gguf();
    if !model.exists() {
        eprintln!("SKIPPED: {} is missing", model.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (out, plot) = (dir.path().join("a.json"), dir.path().join("a.svg"));
    let base = ["locate", "attribute", "--model", model.to_str().unwrap()];
    let o = common::mechc()
        .args(base)
        .args(["--clean", "Ben went to the park. He", "--corrupted", "Tom went to the park. He", "--metric", "prob", "--verify-top", "5"])
        .args(["--out", out.to_str().unwrap(), "--plot", plot.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = mechc::ir::Findings::read(&out).unwrap();
    assert_eq!(f.method, "attribute");
    let count = |k: mechc::ir::Kind| f.scores.iter().filter(|s| s.component.kind() == k).count();
    assert_eq!(count(mechc::ir::Kind::Head), 5 * 8, "5 layers × 8 heads");
    assert_eq!(count(mechc::ir::Kind::Neuron), 200);
    assert_eq!(f.summary["verify"]["k"], 5);
    assert!(f.summary["grids"]["head"].is_array());
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));

    // Bad input: mismatched token lengths → one-line error naming both flags, nothing written.
    let out2 = dir.path().join("b.json");
    common::fails(
        common::mechc().args(base).args(["--clean", "Lily went to the park", "--corrupted", "Tom went", "--out", out2.to_str().unwrap()]),
        &["--clean", "--corrupted", "same token length"],
    );
    assert!(!out2.exists(), "output written despite the error");
    // An existing output is not replaced without --force.
    common::fails(
        common::mechc().args(base).args(["--clean", "Ben went", "--corrupted", "Tom went", "--out", out.to_str().unwrap()]),
        &["already exists"],
    );
}

/// Benchmark (run with `cargo test --release --test locate_attribute -- --ignored --nocapture`):
/// attribution of every head, neuron, resid and mlp site vs real patching of every head, both as
/// `locate patch` batches it (one batch per layer) and one full forward per head.
#[test]
#[ignore]
fn bench_attribute_vs_patch_smollm2() {
    let Some(loaded) = smollm2() else { return };
    let (m, tok) = (&loaded.model, loaded.tok().unwrap());
    let (clean, corrupt, answer, wrong, which) = smollm2_pair(m, tok);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("pair {which}, {} tokens; loadavg before: {}", clean.len(), load.trim());
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let runs = 3;
    let mut t_attr = vec![];
    let mut t_patch = vec![];
    let mut t_naive = vec![];
    for _ in 0..runs {
        let s = Instant::now();
        let a = at::attribute(m, &clean, &corrupt, Some(answer), Some(wrong), Metric::LogitDiff).unwrap();
        t_attr.push(s.elapsed().as_secs_f64());
        std::hint::black_box(&a);
        let s = Instant::now();
        let p = ap::patch(m, &clean, &corrupt, Some(answer), Some(wrong), Metric::LogitDiff, &[PatchSite::Head], |_, _| {}).unwrap();
        t_patch.push(s.elapsed().as_secs_f64());
        std::hint::black_box(&p);
        // One full corrupted forward per head, the clean z of that head patched in.
        let s = Instant::now();
        for l in 0..m.blocks.len() {
            let zc = capture(m, &clean, HookPoint::AttnZ(l));
            let heads = zc.dim(2).unwrap();
            for h in 0..heads {
                let z = zc.clone();
                let f = move |x: &Tensor| {
                    let parts: Vec<Tensor> = (0..heads).map(|j| if j == h { &z } else { x }.i((.., .., j..j + 1, ..)).unwrap()).collect();
                    Tensor::cat(&parts, 2)
                };
                let mut hooks = Hooks::new();
                hooks.intervene(HookPoint::AttnZ(l), Op::Func(Arc::new(f)));
                std::hint::black_box(metric_of(m, &corrupt, &mut hooks, Metric::LogitDiff, answer, wrong));
            }
        }
        t_naive.push(s.elapsed().as_secs_f64());
    }
    let (a, p, n) = (median(t_attr), median(t_patch), median(t_naive));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    eprintln!("attribute (270 heads + 46080 neurons + resid/mlp × positions): {a:.3} s (median of {runs})");
    eprintln!("patch --sites head (270 heads, one batch per layer): {p:.3} s → {:.1}× attribute", p / a);
    eprintln!("one forward per head (270 forwards): {n:.3} s → {:.1}× attribute", n / a);
    eprintln!("patching every neuron one forward each would take ~{:.0} s ({:.0}× attribute)", n / 270.0 * 46080.0, n / 270.0 * 46080.0 / a);
    eprintln!("loadavg after: {}", load.trim());
}
