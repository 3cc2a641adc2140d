//! `conditional-steer` (a steering vector behind a concept key, `src/rome/concept.rs`): the key
//! solves its least squares; the pass built from a pipeline table equals its runtime twin; where
//! the key is absent (uᵀk = 0 at every position) the compiled model's outputs equal the
//! source's, up to rounding; the key fires more on the positive prompts than on the negative
//! ones; bad options fail in one line.

mod common;

use std::path::Path;

use common::rel_diff;
use mechc::model::decoder::Fwd;
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::Model;
use mechc::passes::{self, BuildCtx, Pass};
use mechc::rome::concept;
use mechc::rome::covariance::Covariance;
use mechc::runtime::hooks::project_out;
use mechc::runtime::{Batch, HookPoint, Hooks, Op};
use nalgebra::{DMatrix, DVector};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn randn(r: &mut StdRng, n: usize) -> Vec<f32> {
    (0..n).map(|_| r.gen_range(-1.0f32..1.0)).collect()
}

/// A random symmetric positive definite C = A Aᵀ/n + 0.1 I.
fn random_cov(r: &mut StdRng, n: usize) -> Covariance {
    let a = DMatrix::<f64>::from_fn(n, n, |_, _| r.gen_range(-1.0..1.0));
    let c = &a * a.transpose() / n as f64 + DMatrix::identity(n, n) * 0.1;
    Covariance { layer: 0, dim: n, mom2: c.transpose().as_slice().to_vec(), count: 1 }
}

/// Word prompts (`w{i}` is token i of the test tokenizer) written to `dir/name.txt`, one a line.
fn prompts(dir: &Path, name: &str, r: &mut StdRng, vocab: usize, n: usize) -> String {
    let lines: Vec<String> = (0..n)
        .map(|_| (0..r.gen_range(3..7)).map(|_| format!("w{}", r.gen_range(1..vocab))).collect::<Vec<_>>().join(" "))
        .collect();
    let p = dir.join(format!("{name}.txt"));
    std::fs::write(&p, lines.join("\n")).unwrap();
    p.display().to_string()
}

/// The pass from a pipeline table, on `m` with the word tokenizer, prompts in `dir`.
fn build(m: &Model, dir: &Path, extra: &str) -> Result<Box<dyn Pass>, String> {
    let tok = common::word_tokenizer(m.cfg.vocab_size);
    let table: toml::Table = format!("{extra}\nchat = false\ncovariance = \"identity\"").parse().map_err(|e| format!("{e}"))?;
    let cx = BuildCtx { source: m, base_dir: dir, tok: Some(&tok), progress: false };
    (passes::find("conditional-steer").unwrap().build)(&table, &cx).map_err(|e| e.to_string())
}

fn inline(v: &[f32]) -> String {
    format!("[{}]", v.iter().map(|x| format!("{x}")).collect::<Vec<_>>().join(", "))
}

fn sequences(seed: u64, vocab: u32) -> Batch {
    let seqs = vec![(0..6).map(|i| (seed as u32 + 5 * i) % vocab).collect::<Vec<_>>(), vec![1 % vocab, 2 % vocab, 3 % vocab]];
    Batch::right_padded(&seqs, 0)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, ..ProptestConfig::default() })]

    /// u solves (KKᵀ + quiet·n·C) u = K y (y = 1 positive, 0 negative), and the reported firing
    /// is uᵀk over each set.
    #[test]
    fn key_solves_its_normal_equations(seed in 0u64..100_000) {
        let mut r = StdRng::seed_from_u64(seed);
        let d = r.gen_range(3..20);
        let (np, nn) = (r.gen_range(1..6), r.gen_range(1..6));
        let pos: Vec<Vec<f32>> = (0..np).map(|_| randn(&mut r, d)).collect();
        let neg: Vec<Vec<f32>> = (0..nn).map(|_| randn(&mut r, d)).collect();
        let c = random_cov(&mut r, d);
        let quiet = r.gen_range(0.01..10.0);
        let key = concept::fit(&pos, &neg, &c, quiet).unwrap();
        let all: Vec<&Vec<f32>> = pos.iter().chain(&neg).collect();
        let n = all.len();
        let k = DMatrix::<f64>::from_fn(d, n, |i, j| all[j][i] as f64);
        let u = DVector::from_iterator(d, key.u.iter().map(|&x| x as f64));
        let y = DVector::from_fn(n, |j, _| if j < np { 1.0 } else { 0.0 });
        let lhs = (&k * k.transpose() + DMatrix::from_row_slice(d, d, &c.mom2) * (quiet * n as f64)) * &u;
        let rhs = &k * y;
        prop_assert!((&lhs - &rhs).amax() <= 1e-4 * (rhs.amax() + 1e-9), "normal equations off by {}", (&lhs - &rhs).amax());
        let fp = concept::firing(&key.u, &pos);
        prop_assert!((fp.iter().sum::<f64>() / np as f64 - key.positive.0).abs() < 1e-4);
        let fnn = concept::firing(&key.u, &neg);
        prop_assert!((fnn.iter().sum::<f64>() / nn as f64 - key.negative.0).abs() < 1e-4);
    }

    /// The compiled model equals the pass's twin; and with u projected out of the layer's
    /// `mlp.hook_post` (the key absent at every position) it equals the source, while without
    /// that projection it does not.
    #[test]
    fn write_equals_twin_and_is_silent_where_the_key_is_absent(seed in 0u64..100_000) {
        let m = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
        let mut r = StdRng::seed_from_u64(seed);
        let dir = tempfile::tempdir().unwrap();
        let vocab = m.cfg.vocab_size;
        let pos = prompts(dir.path(), "pos", &mut r, vocab, 6);
        let neg = prompts(dir.path(), "neg", &mut r, vocab, 6);
        let layer = r.gen_range(0..m.cfg.num_layers);
        let v = randn(&mut r, m.cfg.hidden_size);
        let coeff = r.gen_range(0.5..4.0);
        let opts = format!(
            "layer = {layer}\ndirection = {}\ncoeff = {coeff}\npositive = \"{pos}\"\nnegative = \"{neg}\"\nlast = {}\nquiet = {}",
            inline(&v), r.gen_range(1..3), r.gen_range(0.05..2.0)
        );
        let pass = build(&m, dir.path(), &opts).unwrap();
        let mut compiled = m.clone();
        let line = pass.run(&mut compiled).unwrap();
        prop_assert!(line.contains("concept key"), "{line}");
        let batch = sequences(seed, vocab as u32);
        let got = compiled.forward(&batch, None, &mut Hooks::new(), Fwd::default()).unwrap();
        let want = m.forward(&batch, None, &mut pass.twin(&m).unwrap(), Fwd::default()).unwrap();
        prop_assert!(rel_diff(&got, &want) < 1e-5, "twin: rel diff {}", rel_diff(&got, &want));

        // u, recovered from the weights: ΔW = c·v uᵀ, so u ∝ ΔWᵀ v.
        let dw = (compiled.blocks[layer].down.w() - m.blocks[layer].down.w()).unwrap();
        let vt = candle_core::Tensor::from_slice(&v, (1, v.len()), &candle_core::Device::Cpu).unwrap();
        let u = vt.matmul(&dw).unwrap().squeeze(0).unwrap();
        let un = u.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
        prop_assume!(un > 1e-6);
        let u = (u / un as f64).unwrap();
        let absent = |u: candle_core::Tensor| {
            let mut h = Hooks::new();
            h.intervene(HookPoint::MlpPost(layer), Op::Func(std::sync::Arc::new(move |x: &candle_core::Tensor| project_out(x, &u, 1.0))));
            h
        };
        let a = compiled.forward(&batch, None, &mut absent(u.clone()), Fwd::default()).unwrap();
        let b = m.forward(&batch, None, &mut absent(u), Fwd::default()).unwrap();
        prop_assert!(rel_diff(&a, &b) < 1e-5, "key absent: rel diff {}", rel_diff(&a, &b));
        let base = m.forward(&batch, None, &mut Hooks::new(), Fwd::default()).unwrap();
        prop_assert!(rel_diff(&got, &base) > 1e-5, "the write changed nothing");
    }
}

/// Keys that differ by a consistent offset: the fitted u fires near 1 on the positives and near
/// 0 on the negatives, also on fresh keys of each kind.
#[test]
fn key_separates_a_concept_it_was_fitted_on() {
    let mut r = StdRng::seed_from_u64(7);
    let d = 32;
    let concept: Vec<f32> = randn(&mut r, d).iter().map(|x| x * 3.0).collect();
    let draw = |r: &mut StdRng, with: bool| -> Vec<f32> {
        randn(r, d).iter().zip(&concept).map(|(x, c)| x + if with { *c } else { 0.0 }).collect()
    };
    let pos: Vec<Vec<f32>> = (0..200).map(|_| draw(&mut r, true)).collect();
    let neg: Vec<Vec<f32>> = (0..200).map(|_| draw(&mut r, false)).collect();
    let text: Vec<Vec<f32>> = (0..500).map(|_| draw(&mut r, false)).collect();
    let mut c = DMatrix::<f64>::zeros(d, d);
    for k in &text {
        let k = DVector::from_iterator(d, k.iter().map(|&x| x as f64));
        c += &k * k.transpose() / text.len() as f64;
    }
    let cov = Covariance { layer: 0, dim: d, mom2: c.transpose().as_slice().to_vec(), count: text.len() };
    let key = concept::fit(&pos, &neg, &cov, 0.1).unwrap();
    assert!(key.positive.0 > 0.8 && key.negative.0.abs() < 0.1, "{key:?}");
    let mean = |xs: Vec<f64>| xs.iter().sum::<f64>() / xs.len() as f64;
    let fresh_pos = mean(concept::firing(&key.u, &(0..100).map(|_| draw(&mut r, true)).collect::<Vec<_>>()));
    let fresh_neg = mean(concept::firing(&key.u, &(0..100).map(|_| draw(&mut r, false)).collect::<Vec<_>>()));
    assert!(fresh_pos > 0.7 && fresh_neg.abs() < 0.15, "held out: {fresh_pos} vs {fresh_neg}");
}

/// The held-out report is the key fitted on prompts 0, 1, 2, 4, 5, 6, … firing on prompts 3, 7,
/// …, all of a prompt's keys together; fewer than 4 prompts in a set is an error.
#[test]
fn held_out_firing_is_measured_on_prompts_the_fit_never_saw() {
    let mut r = StdRng::seed_from_u64(11);
    let (d, per) = (12, 3);
    let pos: Vec<Vec<f32>> = (0..8 * per).map(|_| randn(&mut r, d).iter().map(|x| x + 1.0).collect()).collect();
    let neg: Vec<Vec<f32>> = (0..9 * per).map(|_| randn(&mut r, d)).collect();
    let c = random_cov(&mut r, d);
    let got = concept::held_out(&pos, &neg, per, &c, 0.5).unwrap();
    let split = |keys: &[Vec<f32>]| {
        let held: Vec<Vec<f32>> = keys.chunks(per).skip(3).step_by(4).flatten().cloned().collect();
        let fit: Vec<Vec<f32>> = keys.chunks(per).enumerate().filter(|(i, _)| i % 4 != 3).flat_map(|(_, k)| k.to_vec()).collect();
        (fit, held)
    };
    let ((pf, ph), (nf, nh)) = (split(&pos), split(&neg));
    assert_eq!((ph.len(), nh.len()), (2 * per, 2 * per));
    let key = concept::fit(&pf, &nf, &c, 0.5).unwrap();
    let mean = |xs: Vec<f64>| xs.iter().sum::<f64>() / xs.len() as f64;
    assert!((mean(concept::firing(&key.u, &ph)) - got.positive.0).abs() < 1e-9, "{got:?}");
    assert!((mean(concept::firing(&key.u, &nh)) - got.negative.0).abs() < 1e-9, "{got:?}");
    let err = concept::held_out(&pos[..3 * per], &neg, per, &c, 0.5).unwrap_err().to_string();
    assert!(err.contains("at least 4 prompts"), "{err}");
}

#[test]
fn bad_options_fail_in_one_line() {
    let m = random_model(RandomSpec::from_seed(3).config(), 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut r = StdRng::seed_from_u64(3);
    let pos = prompts(dir.path(), "pos", &mut r, m.cfg.vocab_size, 4);
    let neg = prompts(dir.path(), "neg", &mut r, m.cfg.vocab_size, 4);
    let v = inline(&vec![0.5; m.cfg.hidden_size]);
    let ok = format!("layer = 0\ndirection = {v}\ncoeff = 1.0\npositive = \"{pos}\"\nnegative = \"{neg}\"");
    assert!(build(&m, dir.path(), &ok).is_ok());
    let cases = [
        (format!("layer = 0\ndirection = [1.0, 2.0]\ncoeff = 1.0\npositive = \"{pos}\"\nnegative = \"{neg}\""), "d_model"),
        (format!("layer = 99\ndirection = {v}\ncoeff = 1.0\npositive = \"{pos}\"\nnegative = \"{neg}\""), "does not exist"),
        (format!("layer = 0\ndirection = {v}\ncoeff = 1.0\npositive = \"{pos}\"\nnegative = \"nope.txt\""), "nope.txt"),
        (format!("layer = 0\ndirection = {v}\ncoeff = 1.0\npositive = \"{pos}\"\nnegative = \"{neg}\"\nskip = 10"), "no prompts left"),
        (format!("layer = 0\ndirection = {v}\ncoeff = 1.0\npositive = \"{pos}\"\nnegative = \"{neg}\"\nquiet = 0"), "quiet"),
        (format!("layer = 0\ndirection = {v}\ncoeff = 1.0\npositive = \"{pos}\"\nnegative = \"{neg}\"\nlast = 50"), "last"),
        (format!("layer = 0\ndirection = {v}\ncoeff = \"auto\"\npositive = \"{pos}\"\nnegative = \"{neg}\""), "auto"),
    ];
    for (opts, needle) in cases {
        let err = build(&m, dir.path(), &opts).err().unwrap_or_else(|| panic!("accepted: {opts}"));
        assert!(err.contains(needle) && !err.contains('\n'), "{needle}: {err}");
    }
}
