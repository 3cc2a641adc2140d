//! Block influence on the real SmolLM2-135M with WikiText-2: removing (at runtime) the layer it
//! ranks most redundant must hurt perplexity less than removing the most influential layer or a
//! typical random layer. Skips (with a message) if the model file is missing.

mod common;

use std::path::PathBuf;

use mechc::locate::block_influence::{block_influence, Options};
use mechc::runtime::Hooks;
use mechc::verify::perplexity::perplexity_with_hooks;
use rand::{rngs::StdRng, SeedableRng};

fn smollm() -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache/models/SmolLM2-135M-Instruct.Q4_1.gguf");
    if !p.exists() {
        eprintln!("SKIPPED: {} is missing", p.display());
        return None;
    }
    if std::env::var_os("MECHC_CACHE").is_none() {
        // Reuse the project's import of the GGUF instead of importing into ~/.cache.
        std::env::set_var("MECHC_CACHE", PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".cache"));
    }
    Some(p)
}

#[test]
fn removing_the_lowest_bi_layer_hurts_least() {
    let Some(path) = smollm() else { return };
    let text = common::shared_data().join("text/wikitext2-test.raw");
    let loaded = mechc::io::load(&path, false).unwrap();
    let model = &loaded.model;
    let ids = mechc::locate::text_ids(loaded.tok().unwrap(), &text, 3072).unwrap();
    // Calibrate on the first 2048 tokens, measure perplexity on the next 1024 (held out).
    let (calib, eval) = ids.split_at(2048);
    let r = block_influence(model, calib, Options { seq_len: 512, n: 1 }, &Hooks::new(), |_, _| {}).unwrap();
    let layers = model.blocks.len();
    assert_eq!(r.bi.len(), layers);
    assert!(r.bi.iter().all(|b| b.is_finite() && *b >= 0.0 && *b <= 2.0), "{:?}", r.bi);
    let order = |key: &dyn Fn(f64, f64) -> bool| (0..layers).reduce(|a, b| if key(r.bi[b], r.bi[a]) { b } else { a }).unwrap();
    let lowest = order(&|x, y| x < y);
    let highest = order(&|x, y| x > y);

    let ppl_without = |l: Option<usize>| {
        let mut h = Hooks::new();
        if let Some(l) = l {
            h.skip_block(l);
        }
        perplexity_with_hooks(model, eval, 256, 256, &h, |_, _| {})
            .unwrap()
            .perplexity
    };
    let base = ppl_without(None);
    let p_low = ppl_without(Some(lowest));
    let p_high = ppl_without(Some(highest));
    // Five random layers other than the two above, from a fixed seed.
    let others: Vec<usize> = (0..layers).filter(|&l| l != lowest && l != highest).collect();
    let mut rng = StdRng::seed_from_u64(2024);
    let picks: Vec<usize> = rand::seq::index::sample(&mut rng, others.len(), 5)
        .into_iter()
        .map(|i| others[i])
        .collect();
    let mut p_rand: Vec<(usize, f64)> = picks.iter().map(|&l| (l, ppl_without(Some(l)))).collect();
    p_rand.sort_by(|a, b| a.1.total_cmp(&b.1));
    let median = p_rand[2].1;
    eprintln!(
        "BI: lowest L{lowest} {:.4}, highest L{highest} {:.4}\nppl: base {base:.2}, without L{lowest} {p_low:.2}, \
         without L{highest} {p_high:.2}, random {p_rand:?} (median {median:.2})",
        r.bi[lowest], r.bi[highest]
    );
    // Measured (SmolLM2-135M-Instruct Q4_1, 2048 calibration tokens, the next 1024 held out, seq 256):
    // BI lowest L14 0.0267, highest L0 0.9769; ppl base 34.06, without L14 40.79, without L0 115490,
    // random layers 17/12/15/21/20 → 37.70/39.05/41.93/43.11/51.36 (median 41.93). The margin over the
    // median is small: BI is a heuristic, and two of the random layers hurt less than L14.
    assert!(
        p_low >= base * 0.99,
        "removing a layer should not help much: {p_low} vs {base}"
    );
    assert!(p_low < p_high, "lowest-BI removal {p_low} ≥ highest-BI removal {p_high}");
    assert!(
        p_low < median,
        "lowest-BI removal {p_low} ≥ median random removal {median} ({p_rand:?})"
    );
}
