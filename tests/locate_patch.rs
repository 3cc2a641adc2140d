//! Activation patching: the batched patches equal full forwards with one hook each on random
//! models, exact limits (patching the only differing embedding restores the clean run; earlier
//! positions have no effect), and the CLI on stories260K.

mod common;

use candle_core::{IndexOp, Tensor};
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

fn last_logits(m: &Model, ids: &[u32], hooks: &mut Hooks) -> Vec<f32> {
    let logits = m.forward(&Batch::single(ids), None, hooks, Fwd { last_only: true, ..Fwd::default() }).unwrap();
    logits.flatten_all().unwrap().to_vec1().unwrap()
}

fn capture(m: &Model, ids: &[u32], p: HookPoint) -> Tensor {
    let mut h = Hooks::new();
    h.capture(p);
    last_logits(m, ids, &mut h);
    h.captured[&p].clone()
}

#[test]
fn batched_patches_equal_one_hooked_forward_each() {
    for seed in 0..5u64 {
        let m = tiny(seed);
        let v = m.cfg.vocab_size as u32;
        let clean: Vec<u32> = (0..6).map(|i| (i * 5 + seed as u32) % v).collect();
        let mut corrupt = clean.clone();
        let p = 2;
        corrupt[p] = (clean[p] + 1) % v;
        let (answer, wrong) = (1u32, 2u32);
        let metric = |logits: &[f32]| (logits[answer as usize] - logits[wrong as usize]) as f64;
        let r = ap::patch(&m, &clean, &corrupt, Some(answer), Some(wrong), Metric::LogitDiff, &PatchSite::ALL, |_, _| {}).unwrap();
        assert!((r.m_clean - metric(&last_logits(&m, &clean, &mut Hooks::new()))).abs() < 1e-5);
        let norm = |x: f64| (x - r.m_corrupt) / (r.m_clean - r.m_corrupt);
        let tol = 1e-4 * (r.m_clean - r.m_corrupt).abs().recip().max(1.0);
        let resid = &r.grids[0].1;
        for l in 0..3 {
            // Positions before the changed token are the same in both runs: no effect.
            for q in 0..p {
                assert!(resid[q][l].abs() < tol, "seed {seed} resid pos {q} layer {l}: {}", resid[q][l]);
            }
            // Full forwards with one hook.
            for (site, point) in [(1usize, HookPoint::MlpOut(l)), (0, HookPoint::ResidPre(l))] {
                let value = capture(&m, &clean, point);
                for q in 0..6 {
                    let mut h = Hooks::new();
                    h.intervene_at(point, Op::Replace(value.clone()), vec![q]);
                    let want = norm(metric(&last_logits(&m, &corrupt, &mut h)));
                    let got = r.grids[site].1[q][l];
                    assert!((got - want).abs() < tol, "seed {seed} {point} pos {q}: {got} vs {want}");
                }
            }
            let z_clean = capture(&m, &clean, HookPoint::AttnZ(l));
            let z_corrupt = capture(&m, &corrupt, HookPoint::AttnZ(l));
            let heads = z_clean.dim(2).unwrap();
            for h in 0..heads {
                let parts: Vec<Tensor> =
                    (0..heads).map(|j| if j == h { &z_clean } else { &z_corrupt }.i((.., .., j..j + 1, ..)).unwrap()).collect();
                let mut hooks = Hooks::new();
                hooks.intervene(HookPoint::AttnZ(l), Op::Replace(Tensor::cat(&parts, 2).unwrap()));
                let want = norm(metric(&last_logits(&m, &corrupt, &mut hooks)));
                let got = r.grids[2].1[h][l];
                assert!((got - want).abs() < tol, "seed {seed} L{l}.H{h}: {got} vs {want}");
            }
        }
        // Patching the residual stream at the changed position before block 0 is the clean run.
        assert!((resid[p][0] - 1.0).abs() < tol, "{}", resid[p][0]);
        // p(answer) works too; mismatched lengths and equal answers are errors.
        let r = ap::patch(&m, &clean, &corrupt, Some(answer), None, Metric::Prob, &[PatchSite::Resid], |_, _| {}).unwrap();
        assert!((r.grids[0].1[p][0] - 1.0).abs() < 1e-3);
        assert!(ap::patch(&m, &clean, &corrupt[..5], None, None, Metric::Prob, &[PatchSite::Resid], |_, _| {}).is_err());
        assert!(ap::patch(&m, &clean, &corrupt, Some(1), Some(1), Metric::LogitDiff, &[PatchSite::Resid], |_, _| {}).is_err());
        assert!(ap::patch(&m, &clean, &clean, Some(1), Some(2), Metric::LogitDiff, &[PatchSite::Resid], |_, _| {}).is_err());
    }
}

#[test]
fn cli_on_stories260k() {
    let h = common::mechc().args(["locate", "patch", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&h.stdout);
    for opt in ["--clean", "--corrupted", "--answer", "--wrong", "--metric", "--sites", "--out", "--plot"] {
        assert!(help.contains(opt), "{opt} undocumented:\n{help}");
    }
    let model = common::stories_gguf();
    if !model.exists() {
        eprintln!("SKIPPED: {} is missing", model.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (out, plot) = (dir.path().join("p.json"), dir.path().join("p.svg"));
    let base = ["locate", "patch", "--model", model.to_str().unwrap()];
    let o = common::mechc()
        .args(base)
        .args(["--clean", "Ben went to the park. He", "--corrupted", "Tom went to the park. He", "--metric", "prob"])
        .args(["--out", out.to_str().unwrap(), "--plot", plot.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = mechc::ir::Findings::read(&out).unwrap();
    assert_eq!(f.method, "patch");
    let heads = f.scores.iter().filter(|s| matches!(s.component, mechc::ir::Component::Head { .. })).count();
    assert_eq!(heads, 5 * 8, "5 layers × 8 heads");
    assert!(std::fs::read_to_string(&plot).unwrap().contains("<svg"));
    common::fails(
        common::mechc().args(base).args(["--clean", "Lily went to the park", "--corrupted", "Tom went"]),
        &["--clean", "--corrupted", "same token length"],
    );
}
