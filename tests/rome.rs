//! ROME and MEMIT (`rank-one-edit`): the update's algebra (W'k* = v*, and W'k = Wk for every k
//! with kᵀC⁻¹k* = 0; MEMIT's per-layer least squares), the runtime twin, the v* / z optimisation
//! on random models, MEMIT writing its targets through a layer range, the covariance and its
//! cache; and on SmolLM2, compiled edits whose `[verify.edit]` numbers equal `mechc eval edit`
//! on the emitted checkpoint.

mod common;

use candle_core::{DType, IndexOp};
use common::rel_diff;
use mechc::model::decoder::Fwd;
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::Model;
use mechc::rome::covariance::Covariance;
use mechc::rome::{self, memit, Hparams, KeyValue, RankOne, Request};
use mechc::runtime::{Batch, HookPoint, Hooks};
use nalgebra::DMatrix;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn randn(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

/// A random symmetric positive definite C = A Aᵀ/n + 0.1 I.
fn random_cov(r: &mut StdRng, layer: usize, n: usize) -> Covariance {
    let a: Vec<f64> = (0..n * n).map(|_| r.gen_range(-1.0..1.0)).collect();
    let mut mom2 = vec![0.0; n * n];
    for i in 0..n {
        for j in 0..n {
            let dot: f64 = (0..n).map(|k| a[i * n + k] * a[j * n + k]).sum();
            mom2[i * n + j] = dot / n as f64 + if i == j { 0.1 } else { 0.0 };
        }
    }
    Covariance { layer, dim: n, mom2, count: 1 }
}

fn kv(layer: usize, k: Vec<f32>, v: Vec<f32>) -> KeyValue {
    KeyValue { layer, k, v, v0_norm: 1.0, delta_norm: 0.0, nll_first: 0.0, nll_last: 0.0, kl_last: 0.0, steps: 0, seconds: 0.0 }
}

/// down_proj(k) = W k + b of `layer`, in f64.
fn down(m: &Model, layer: usize, k: &[f32]) -> Vec<f64> {
    let lin = &m.blocks[layer].down;
    let w = lin.w().to_dtype(DType::F64).unwrap().to_vec2::<f64>().unwrap();
    let b = lin.b.as_ref().map(|b| b.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap());
    w.iter()
        .enumerate()
        .map(|(i, row)| row.iter().zip(k).map(|(a, &x)| a * x as f64).sum::<f64>() + b.as_ref().map_or(0.0, |b| b[i]))
        .collect()
}

fn max_rel(a: &[f64], b: &[f64]) -> f64 {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())) + 1e-6;
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// W'k* + b = v*, and keys C⁻¹-orthogonal to k* are untouched.
    #[test]
    fn update_writes_v_at_k_and_nothing_orthogonal(seed in 0u64..100_000) {
        let m = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
        let mut r = StdRng::seed_from_u64(seed);
        let layer = r.gen_range(0..m.cfg.num_layers);
        let (dff, dm) = (m.cfg.intermediate_size, m.cfg.hidden_size);
        let c = random_cov(&mut r, layer, dff);
        let k = randn(&mut r, dff);
        let v = randn(&mut r, dm);
        let ck = c.solve(&k, 0.0).unwrap();
        let u = rome::rank_one(&m, &kv(layer, k.clone(), v.clone()), &ck).unwrap();
        let mut edited = m.clone();
        u.apply(&mut edited).unwrap();
        let v64: Vec<f64> = v.iter().map(|&x| x as f64).collect();
        prop_assert!(max_rel(&down(&edited, layer, &k), &v64) < 1e-4);
        // k⊥ = x − (x·C⁻¹k*)/(k*·C⁻¹k*) k*  has k⊥ᵀC⁻¹k* = 0.
        let x = randn(&mut r, dff);
        let xw: f64 = x.iter().zip(&ck).map(|(&a, b)| a as f64 * b).sum();
        let kw: f64 = k.iter().zip(&ck).map(|(&a, b)| a as f64 * b).sum();
        let kp: Vec<f32> = x.iter().zip(&k).map(|(&a, &b)| (a as f64 - xw / kw * b as f64) as f32).collect();
        prop_assert!(max_rel(&down(&edited, layer, &kp), &down(&m, layer, &kp)) < 1e-4);
        // ... and any key moves by its C⁻¹-projection on k* times the change at k*:
        // W'x = Wx + (xᵀC⁻¹k*)/(k*ᵀC⁻¹k*) (v* − Wk*). (The edit did change k*'s output.)
        let (wk, wx) = (down(&m, layer, &k), down(&m, layer, &x));
        prop_assert!(max_rel(&wk, &v64) > 1e-3, "v* already was Wk*");
        let predicted: Vec<f64> = wx.iter().zip(wk.iter().zip(&v64)).map(|(a, (b, c))| a + xw / kw * (c - b)).collect();
        prop_assert!(max_rel(&down(&edited, layer, &x), &predicted) < 1e-4);
    }

    /// Sequential rank-one edits equal their runtime twin (a rank-k adapter beside down_proj).
    #[test]
    fn edits_equal_their_twin(seed in 0u64..100_000, n in 1usize..4) {
        let m = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
        let mut r = StdRng::seed_from_u64(seed);
        let (dff, dm) = (m.cfg.intermediate_size, m.cfg.hidden_size);
        let mut edited = m.clone();
        let mut ups: Vec<RankOne> = vec![];
        for _ in 0..n {
            let layer = r.gen_range(0..m.cfg.num_layers);
            let k = randn(&mut r, dff);
            let u = rome::rank_one(&edited, &kv(layer, k.clone(), randn(&mut r, dm)), &k.iter().map(|&x| x as f64).collect::<Vec<_>>()).unwrap();
            u.apply(&mut edited).unwrap();
            ups.push(u);
        }
        let v = m.cfg.vocab_size as u32;
        let seqs = vec![(0..5).map(|i| (seed as u32 + 3 * i) % v).collect::<Vec<_>>(), vec![1 % v, 2 % v]];
        let batch = Batch::right_padded(&seqs, 0);
        let got = edited.forward(&batch, None, &mut Hooks::new(), Fwd::default()).unwrap();
        let want = m.forward(&batch, None, &mut rome::twin(&ups).unwrap(), Fwd::default()).unwrap();
        prop_assert!(rel_diff(&got, &want) < 1e-5, "rel diff {}", rel_diff(&got, &want));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// MEMIT's layer update ΔW = R Kᵀ(λC + KKᵀ)⁻¹ solves its normal equations
    /// ΔW (λC + KKᵀ) = R Kᵀ, and as λ → 0 writes every key's residual exactly (ΔW K = R).
    #[test]
    fn memit_layer_update_solves_its_least_squares(seed in 0u64..100_000, n in 1usize..5) {
        let mut r = StdRng::seed_from_u64(seed);
        let (d, dm) = (r.gen_range(n + 2..24), r.gen_range(2..10));
        let c = random_cov(&mut r, 0, d);
        let keys: Vec<Vec<f32>> = (0..n).map(|_| randn(&mut r, d)).collect();
        let resid: Vec<Vec<f32>> = (0..n).map(|_| randn(&mut r, dm)).collect();
        let lambda = r.gen_range(0.01..10.0);
        let dense = |ups: &[RankOne]| DMatrix::from_fn(dm, d, |i, j| ups.iter().map(|u| u.r[i] as f64 * u.u[j] as f64).sum::<f64>());
        let k = DMatrix::from_fn(d, n, |i, j| keys[j][i] as f64);
        let rm = DMatrix::from_fn(dm, n, |i, j| resid[j][i] as f64);
        let rel = |a: &DMatrix<f64>, b: &DMatrix<f64>| (a - b).amax() / (b.amax() + 1e-12);
        let ups = memit::layer_update(0, &keys, &resid, &c, lambda).unwrap();
        prop_assert_eq!(ups.len(), n);
        let m = DMatrix::from_row_slice(d, d, &c.mom2) * lambda + &k * k.transpose();
        let (lhs, rhs) = (dense(&ups) * m, &rm * k.transpose());
        prop_assert!(rel(&lhs, &rhs) < 1e-4, "normal equations off by {}", rel(&lhs, &rhs));
        let exact = memit::layer_update(0, &keys, &resid, &c, 1e-9).unwrap();
        prop_assert!(rel(&(dense(&exact) * &k), &rm) < 1e-3, "λ → 0 does not write R at K");
        // A regularised update writes less than R (it trades the keys against C).
        prop_assert!(rel(&(dense(&ups) * &k), &rm) > 1e-6);
    }
}

/// MEMIT end to end on random models: z is the residual plus the optimised δ (Anchor::Resid),
/// the updates spread over the range write z after the last layer (λ → 0, one context), they
/// lower the target's loss, and the edited model equals its runtime twin.
#[test]
fn memit_writes_its_targets_through_the_layer_range_and_equals_its_twin() {
    for seed in [2u64, 13, 31] {
        let mut spec = RandomSpec::from_seed(seed);
        spec.layers = 3;
        let m = random_model(spec.config(), seed).unwrap();
        // Edit blocks 0 and 1; block 2's attention carries δ from the subject token to the target.
        let (layers, last) = ([0usize, 1], 1);
        let reqs: Vec<Request> = (0..2).map(|i| request(&m, seed * 10 + i)).collect();
        let hp = Hparams { steps: 25, weight_decay: 1e-3, ..Hparams::default() };
        let kvs: Vec<KeyValue> = reqs.iter().map(|q| rome::key_value(&m, last, q, &hp, rome::Anchor::Resid).unwrap()).collect();
        for (q, kv) in reqs.iter().zip(&kvs) {
            assert!(kv.nll_last < kv.nll_first, "seed {seed}: NLL {} → {}", kv.nll_first, kv.nll_last);
            // v = h + δ with h the unedited residual after `last` at the subject token.
            let h = memit::key_and_resid(&m, last, last, q).unwrap().1;
            let moved: f64 = h.iter().zip(&kv.v).map(|(a, b)| ((b - a) as f64).powi(2)).sum::<f64>().sqrt();
            assert!((moved - kv.delta_norm).abs() <= 1e-4 * kv.delta_norm.max(1e-6), "seed {seed}: ‖z − h‖ {moved} vs ‖δ‖ {}", kv.delta_norm);
        }
        let zs: Vec<Vec<f32>> = kvs.iter().map(|kv| kv.v.clone()).collect();
        let dff = m.cfg.intermediate_size;
        let covs: Vec<Covariance> = layers.iter().map(|&l| Covariance::identity(l, dff)).collect();
        let ups = memit::updates(&m, &layers, &reqs, &zs, &covs, 1e-9, |_| {}).unwrap();
        assert_eq!(ups.len(), layers.len() * reqs.len());
        assert!(ups.iter().all(|u| u.r.iter().any(|&x| x != 0.0)), "every layer takes a share");
        let mut edited = m.clone();
        rome::apply(&ups, &mut edited).unwrap();
        for (q, z) in reqs.iter().zip(&zs) {
            let h = memit::key_and_resid(&edited, last, last, q).unwrap().1;
            let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
            assert!(max_rel(&f64s(&h), &f64s(z)) < 1e-3, "seed {seed}: the residual after L{last} is not z");
        }
        let batch = Batch::right_padded(&reqs.iter().map(|q| q.contexts[0].clone()).collect::<Vec<_>>(), 0);
        let got = edited.forward(&batch, None, &mut Hooks::new(), Fwd::default()).unwrap();
        let want = m.forward(&batch, None, &mut rome::twin(&ups).unwrap(), Fwd::default()).unwrap();
        assert!(rel_diff(&got, &want) < 1e-5, "seed {seed}: twin rel diff {}", rel_diff(&got, &want));
    }
}

/// A request in token ids on a random model: one context (so k* is that context's key).
fn request(m: &Model, seed: u64) -> Request {
    let v = m.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..6).map(|i| (seed as u32 * 7 + 5 * i + 1) % v).collect();
    Request { contexts: vec![ids.clone()], lookup: vec![3], target: vec![(ids[5] + 1) % v, 2 % v], kl_prompt: ids[..4].to_vec(), kl_lookup: 3 }
}

#[test]
fn v_star_optimisation_lowers_the_target_loss_and_the_edit_writes_it() {
    for seed in [3u64, 11, 29] {
        // Two layers, edit the first: δ at the subject token reaches the target positions only
        // through a later block's attention.
        let mut spec = RandomSpec::from_seed(seed);
        spec.layers = 2;
        let m = random_model(spec.config(), seed).unwrap();
        let layer = 0;
        let req = request(&m, seed);
        // Random models have tiny MLP outputs: ROME's weight decay (0.5·‖δ‖/‖v₀‖²) would pin δ
        // at 0, so use EasyEdit's Llama value.
        let hp = Hparams { steps: 25, weight_decay: 1e-3, ..Hparams::default() };
        let kv = rome::key_value(&m, layer, &req, &hp, rome::Anchor::MlpOut).unwrap();
        assert!(kv.nll_last < kv.nll_first, "seed {seed}: NLL {} → {}", kv.nll_first, kv.nll_last);
        assert!(kv.delta_norm <= hp.clamp * kv.v0_norm * (1.0 + 1e-5), "δ exceeds the clamp");
        // Deterministic.
        assert_eq!(rome::key_value(&m, layer, &req, &hp, rome::Anchor::MlpOut).unwrap().v, kv.v);
        // k* is the MLP input at the subject token; the edit makes the MLP output there v*.
        let k: Vec<f64> = kv.k.iter().map(|&x| x as f64).collect();
        let mut edited = m.clone();
        rome::rank_one(&m, &kv, &k).unwrap().apply(&mut edited).unwrap();
        let mut h = Hooks::new();
        h.capture(HookPoint::MlpPost(layer)).capture(HookPoint::MlpOut(layer));
        edited.forward(&Batch::single(&req.contexts[0]), None, &mut h, Fwd::default()).unwrap();
        let post = h.captured[&HookPoint::MlpPost(layer)].i((0, 3)).unwrap().to_vec1::<f32>().unwrap();
        let f64s = |v: &[f32]| v.iter().map(|&x| x as f64).collect::<Vec<_>>();
        assert!(max_rel(&f64s(&post), &f64s(&kv.k)) < 1e-5, "k* must be the MLP input at the lookup token");
        let out: Vec<f64> = h.captured[&HookPoint::MlpOut(layer)].i((0, 3)).unwrap().to_dtype(DType::F64).unwrap().to_vec1().unwrap();
        let want: Vec<f64> = kv.v.iter().map(|&x| x as f64).collect();
        assert!(max_rel(&out, &want) < 1e-4, "seed {seed}: mlp_out at k* is not v*");
        // And the target's NLL on the edited model is the optimised one (the δ it reproduces).
        let logits = edited.forward(&Batch::single(&[req.contexts[0].clone(), vec![req.target[0]]].concat()), None, &mut Hooks::new(), Fwd::default()).unwrap();
        let lp = candle_nn::ops::log_softmax(&logits.i(0).unwrap(), 1).unwrap();
        let nll = -(lp.i((5, req.target[0] as usize)).unwrap().to_scalar::<f32>().unwrap() + lp.i((6, req.target[1] as usize)).unwrap().to_scalar::<f32>().unwrap()) / 2.0;
        assert!((nll as f64) < kv.nll_first, "seed {seed}: edited NLL {nll} vs unedited {}", kv.nll_first);
    }
}

#[test]
fn covariance_is_the_mean_outer_product_and_is_cached() {
    let seed = 5;
    let m = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
    let layer = 0;
    let v = m.cfg.vocab_size as u32;
    let ids: Vec<u32> = (0..23).map(|i| (i * 7 + 2) % v).collect();
    let c = Covariance::collect(&m, layer, &ids, 10, |_, _| {}).unwrap();
    // Direct: full forward of each window, every key's outer product.
    let dff = m.cfg.intermediate_size;
    let mut want = vec![0f64; dff * dff];
    for w in ids.chunks(10) {
        let mut h = Hooks::new();
        h.capture(HookPoint::MlpPost(layer));
        m.forward(&Batch::single(w), None, &mut h, Fwd::default()).unwrap();
        for k in h.captured[&HookPoint::MlpPost(layer)].i(0).unwrap().to_vec2::<f32>().unwrap() {
            for i in 0..dff {
                for j in 0..dff {
                    want[i * dff + j] += k[i] as f64 * k[j] as f64 / ids.len() as f64;
                }
            }
        }
    }
    assert_eq!(c.count, ids.len());
    assert!(max_rel(&c.mom2, &want) < 1e-5);

    let dir = tempfile::tempdir().unwrap();
    let (a, hit) = Covariance::cached(&m, layer, &ids, 10, dir.path(), |_, _| {}).unwrap();
    assert!(!hit);
    let (b, hit) = Covariance::cached(&m, layer, &ids, 10, dir.path(), |_, _| {}).unwrap();
    assert!(hit, "the second call must read the cache");
    assert_eq!(a.mom2, b.mom2);
    // Other tokens, or other weights, are another key.
    assert!(!Covariance::cached(&m, layer, &ids[1..], 10, dir.path(), |_, _| {}).unwrap().1);
    let mut m2 = m.clone();
    let k: Vec<f32> = vec![1.0; dff];
    rome::rank_one(&m2.clone(), &kv(layer, k.clone(), vec![0.0; m.cfg.hidden_size]), &k.iter().map(|&x| x as f64).collect::<Vec<_>>())
        .unwrap()
        .apply(&mut m2)
        .unwrap();
    // An edit of down_proj does not change C (its input) ... and is not part of the key.
    assert!(Covariance::cached(&m2, layer, &ids, 10, dir.path(), |_, _| {}).unwrap().1);
    let mut m3 = m.clone();
    m3.embed = (&m3.embed * 2.0).unwrap();
    assert!(!Covariance::cached(&m3, layer, &ids, 10, dir.path(), |_, _| {}).unwrap().1, "other weights, same key");
}

/// Use case 3 in small, on the real model: two CounterFact edits compiled into SmolLM2 (C = I to
/// keep CI short; configs/smollm2-rome-facts.toml uses the covariance). The compile's
/// `[verify.edit]` numbers are what `mechc eval edit` measures on the emitted checkpoint, and
/// the edits took: both new targets now win on their prompts, which the source preferred less.
#[test]
fn smollm2_compiled_edits_are_what_eval_edit_measures() {
    compiled_edits_are_what_eval_edit_measures("ROME, 2 edits at L4 (C = I)", "layer = 4");
}

/// The same with MEMIT: both facts written jointly through layers 3 and 4.
#[test]
fn smollm2_compiled_memit_edits_are_what_eval_edit_measures() {
    if let Some(summary) = compiled_edits_are_what_eval_edit_measures("MEMIT, 2 edits over L3,L4 (C = I)", "method = \"memit\"\nlayers = [3, 4]") {
        assert!(summary.contains("MEMIT"), "{summary}");
    }
}

/// Compiles the two edits with the pass options `edit_opts`, checks them, returns the pass summary
/// (None when the registry model is not fetched).
fn compiled_edits_are_what_eval_edit_measures(label: &str, edit_opts: &str) -> Option<String> {
    let model = common::registry_model(common::SMOLLM2)?;
    let tmp = tempfile::tempdir().unwrap();
    let facts = common::shared_data().join("prompts/counterfact/counterfact-edit.json");
    let out = tmp.path().join("out");
    let p = tmp.path().join("p.toml");
    std::fs::write(
        &p,
        format!(
            "version = 1\n[model]\npath = \"{m}\"\n[[pass]]\nname = \"rank-one-edit\"\nfacts = \"{f}\"\nids = [0, 4]\n{edit_opts}\ncovariance = \"identity\"\n\
             [verify.edit]\nrecords = \"{f}\"\nids = [\"0\", \"4\"]\nmin_efficacy = 100\n[output]\npath = \"{o}\"\n",
            m = model.display(),
            f = facts.display(),
            o = out.display()
        ),
    )
    .unwrap();
    common::mechc().arg("compile").arg(&p).assert().success();
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(out.join("mechc-manifest.json")).unwrap()).unwrap();
    let metric = |k: &str| manifest["verify"]["metrics"][k].as_f64().unwrap_or_else(|| panic!("{k} missing"));
    let o = common::mechc()
        .args(["eval", "edit", "--model"])
        .arg(&out)
        .arg("--records")
        .arg(&facts)
        .args(["--ids", "0,4", "--json"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let m = &r["model"];
    assert_eq!(m["n"], 2);
    for (k, name) in [("efficacy", "edit_efficacy"), ("paraphrase", "edit_paraphrase"), ("neighbourhood", "edit_neighbourhood")] {
        assert_eq!(m[k]["rate"].as_f64().unwrap(), metric(name), "{k}");
    }
    assert_eq!(m["score"].as_f64().unwrap(), metric("edit_score"));
    assert_eq!(metric("edit_efficacy"), 100.0);
    assert!(metric("edit_efficacy_source") < 100.0, "the source already preferred both new targets");
    let summary = manifest["passes"][0]["summary"].as_str().unwrap().to_string();
    eprintln!("{label}: {summary}");
    Some(summary)
}
