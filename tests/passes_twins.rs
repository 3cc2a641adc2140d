//! Every registered pass equals its runtime twin: on random tiny models and random options
//! (each pass's `example`), forward(compiled) == forward(source with the twin's hooks) up to
//! float rounding, and the compiled model survives the emitter (save + reload) bit for bit.
//!
//! "Up to float rounding" is 1e-5 relative, or 8x the forward's own rounding noise where that is
//! larger. Random models include ill-conditioned ones: with d_model = 2 and a direction ablated,
//! the residual stream is one-dimensional and can nearly cancel before an RMSNorm, which then
//! blows a 1e-7 difference up to 1e-4. The noise is measured as the interop tests measure it: the
//! twin's forward again with every hook site's output perturbed by one f32 rounding (Monte Carlo
//! arithmetic), the largest logit move of 4 such runs. A sweep of 20,000 seeds: 12 pass/model
//! pairs beyond 1e-5 (10 ablations, 2 neuron prunes), at most 4.6x their noise, most below 1x;
//! a wrong twin is off by ~1e-2.

mod common;

use std::sync::Arc;

use candle_core::Tensor;
use common::rel_diff;
use mechc::model::verifier;
use mechc::model::decoder::Fwd;
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::Model;
use mechc::passes::REGISTRY;
use mechc::runtime::{Batch, HookPoint, Hooks, Op};
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

fn cfg() -> ProptestConfig {
    ProptestConfig { cases: 32, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn every_pass_equals_its_twin(seed in 0u64..100_000, lens in prop::collection::vec(1usize..7, 1..4)) {
        let source = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
        let v = source.cfg.vocab_size as u64;
        let seqs: Vec<Vec<u32>> = lens
            .iter()
            .enumerate()
            .map(|(r, &n)| (0..n).map(|i| ((seed + 31 * r as u64 + 7 * i as u64) % v) as u32).collect())
            .collect();
        let batch = Batch::right_padded(&seqs, 0);
        for info in REGISTRY {
            let Some(opts) = (info.example)(&source, seed) else { continue };
            let pass = (info.build)(&opts, &mechc::passes::BuildCtx::new(&source)).unwrap();
            let mut compiled = source.clone();
            pass.run(&mut compiled).unwrap();
            verifier::check(&compiled).unwrap();
            let got = compiled.forward(&batch, None, &mut Hooks::new(), Fwd::default()).unwrap();
            let dir = tempfile::tempdir().unwrap();
            mechc::io::hf::save_model(&compiled, dir.path(), candle_core::DType::F32, &Default::default()).unwrap();
            let back = mechc::io::hf::load_model(dir.path()).unwrap();
            let reloaded = back.forward(&batch, None, &mut Hooks::new(), Fwd::default()).unwrap();
            prop_assert_eq!(common::max_abs_diff(&got, &reloaded), 0.0, "{}: the emitted checkpoint differs", info.name);
            let mut twin = pass.twin(&source).unwrap();
            let want = source.forward(&batch, None, &mut twin, Fwd::default()).unwrap();
            let d = rel_diff(&got, &want);
            if d > 1e-5 {
                let noise = rounding_noise(&source, &batch, &twin, seed, &want);
                prop_assert!(d <= 8.0 * noise, "{}: options {:?}: rel diff {} (rounding noise {})", info.name, opts, d, noise);
            }
        }
    }
}

/// The largest relative logit change over 4 runs of `source` under `twin` with one random f32
/// rounding (relative ±2⁻²⁴) applied to every element at every hook site.
fn rounding_noise(source: &Model, batch: &Batch, twin: &Hooks, seed: u64, want: &Tensor) -> f32 {
    let mut worst = 0f32;
    for run in 0..4u64 {
        let mut h = twin.clone();
        for (i, p) in HookPoint::all(source.cfg.num_layers).into_iter().enumerate() {
            let site_seed = seed.wrapping_mul(1000).wrapping_add(run * 100 + i as u64);
            h.intervene(
                p,
                Op::Func(Arc::new(move |x: &Tensor| {
                    let mut r = StdRng::seed_from_u64(site_seed);
                    let f: Vec<f32> = (0..x.elem_count()).map(|_| 1.0 + r.gen_range(-1.0f32..1.0) * f32::EPSILON / 2.0).collect();
                    x * Tensor::from_vec(f, x.shape(), x.device())?
                })),
            );
        }
        let y = source.forward(batch, None, &mut h, Fwd::default()).unwrap();
        worst = worst.max(rel_diff(&y, want));
    }
    worst
}

/// The registry's contract: unique names, documented, and each pass's examples build.
#[test]
fn registry_is_well_formed() {
    let mut names: Vec<&str> = REGISTRY.iter().map(|p| p.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), REGISTRY.len(), "duplicate pass names");
    for p in REGISTRY {
        assert!(p.doc.contains("Options") && p.doc.contains("twin"), "{}: the doc must describe options and the twin", p.name);
        assert!(mechc::passes::find(p.name).is_some());
    }
}
