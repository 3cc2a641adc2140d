//! Causal tracing: the restart-from-a-layer forward equals the full forward; the fast trace
//! equals the naive one (a full forward with hooks per restored state) on random models; exact
//! limits (noise 0, restoring the last layer's output); determinism; the CLI on stories260K; and
//! the qualitative result on SmolLM2 (skipped when the model is missing).

mod common;

use std::ops::Range;

use candle_core::IndexOp;
use mechc::locate::causal_trace::{self as ct, Options, TraceKind};
use mechc::model::decoder::Fwd;
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::Model;
use mechc::runtime::{Batch, HookPoint, Hooks, KvCache, Op};

fn tiny(seed: u64, layers: usize) -> Model {
    let mut spec = RandomSpec::from_seed(seed);
    spec.layers = layers;
    random_model(spec.config(), seed).unwrap()
}

fn tokens(m: &Model, n: usize, salt: usize) -> Vec<u32> {
    (0..n).map(|i| ((i * 7 + salt * 3 + 1) % m.cfg.vocab_size) as u32).collect()
}

fn opts(noise: f64, window: usize) -> Options {
    Options { samples: 4, noise, window, seed: 3, kinds: TraceKind::ALL.to_vec() }
}

#[test]
fn forward_from_a_layer_equals_the_full_forward() {
    for seed in 0..6u64 {
        let m = tiny(seed, 4);
        let seqs = vec![tokens(&m, 9, 0), tokens(&m, 9, 5)];
        let batch = Batch { ids: seqs.clone(), valid: vec![vec![true; 9]; 2] };
        let mut hooks = Hooks::new();
        for l in 0..4 {
            hooks.capture(HookPoint::ResidPre(l));
        }
        let full = m.forward(&batch, None, &mut hooks, Fwd::default()).unwrap();
        for l in 0..4 {
            // From the residual stream entering block l, all positions.
            let x = hooks.captured[&HookPoint::ResidPre(l)].clone();
            let y = m.forward_from(x.clone(), l..4, 0, None, &mut Hooks::new(), Fwd::default()).unwrap();
            let logits = m.unembed(y, &mut Hooks::new(), Fwd::default()).unwrap();
            assert!(common::max_abs_diff(&logits, &full) < 1e-5, "seed {seed} layer {l}");
            // The positions after a prefix of 4, with the prefix's keys and values cached.
            let prefix = Batch { ids: seqs.iter().map(|s| s[..4].to_vec()).collect(), valid: vec![vec![true; 4]; 2] };
            let mut cache = KvCache::new(4);
            m.forward(&prefix, Some(&mut cache), &mut Hooks::new(), Fwd::default()).unwrap();
            let y = m.forward_from(x.narrow(1, 4, 5).unwrap(), l..4, 4, Some(&mut cache), &mut Hooks::new(), Fwd::default()).unwrap();
            let logits = m.unembed(y, &mut Hooks::new(), Fwd::default()).unwrap();
            assert!(common::max_abs_diff(&logits, &full.narrow(1, 4, 5).unwrap()) < 1e-5, "seed {seed} layer {l}, cached");
            // A past that the cache does not hold is an error, not a panic.
            assert!(m.forward_from(x.clone(), l..4, 3, None, &mut Hooks::new(), Fwd::default()).is_err());
        }
        assert!(m.forward_from(hooks.captured[&HookPoint::ResidPre(0)].clone(), 0..5, 0, None, &mut Hooks::new(), Fwd::default()).is_err());
    }
}

/// p(target) with the states of `kind` for column `l` restored at position `i`, by a full
/// forward of the corrupted batch with hooks.
fn naive(m: &Model, ids: &[u32], subject: &Range<usize>, target: u32, opt: &Options, kind: TraceKind, i: usize, l: usize) -> f64 {
    let point = |k: usize| match kind {
        TraceKind::Resid => HookPoint::ResidPost(k),
        TraceKind::Mlp => HookPoint::MlpOut(k),
        TraceKind::Attn => HookPoint::AttnOut(k),
    };
    let layers = kind.layers(l, opt.window, m.blocks.len());
    let mut clean = Hooks::new();
    for k in layers.clone() {
        clean.capture(point(k));
    }
    m.forward(&Batch::single(ids), None, &mut clean, Fwd::default()).unwrap();
    let mut hooks = Hooks::new();
    hooks.intervene(HookPoint::Embed, Op::Add(ct::noise_tensor(m, ids.len(), subject, opt).unwrap()));
    for k in layers {
        let v = clean.captured[&point(k)].repeat((opt.samples, 1, 1)).unwrap();
        hooks.intervene_at(point(k), Op::Replace(v), vec![i]);
    }
    let batch = Batch { ids: vec![ids.to_vec(); opt.samples], valid: vec![vec![true; ids.len()]; opt.samples] };
    let logits = m.forward(&batch, None, &mut hooks, Fwd { last_only: true, ..Fwd::default() }).unwrap();
    let p = candle_nn::ops::softmax_last_dim(&logits.i((.., 0, ..)).unwrap()).unwrap();
    let p: Vec<f32> = p.i((.., target as usize)).unwrap().to_vec1().unwrap();
    p.iter().map(|&x| x as f64).sum::<f64>() / p.len() as f64
}

#[test]
fn the_fast_trace_equals_the_naive_one() {
    for (seed, window) in [(1u64, 3usize), (2, 10), (3, 1), (4, 4)] {
        let m = tiny(seed, 5);
        let ids = tokens(&m, 7, seed as usize);
        let subject = 2..4;
        let opt = opts(2.0, window);
        let tr = ct::causal_trace(&m, &ids, subject.clone(), None, &opt, |_, _| {}).unwrap();
        assert!((tr.p_clean - tr.p_corrupt).abs() > 1e-4, "the noise should matter: {tr:?}");
        for &kind in &TraceKind::ALL {
            let g = tr.grid(kind).unwrap();
            assert_eq!((g.len(), g[0].len()), (7, 5));
            for (i, row) in g.iter().enumerate() {
                for (l, &p) in row.iter().enumerate() {
                    let want = naive(&m, &ids, &subject, tr.target, &opt, kind, i, l);
                    assert!((p - want).abs() < 2e-5, "seed {seed} {kind:?} pos {i} layer {l}: {p} vs naive {want}");
                }
            }
        }
        // Restoring the last block's output at the last position gives back the clean run.
        let g = tr.grid(TraceKind::Resid).unwrap();
        assert!((g[6][4] - tr.p_clean).abs() < 1e-6, "{} vs {}", g[6][4], tr.p_clean);
        // Deterministic for a seed; another seed draws other noise.
        let again = ct::causal_trace(&m, &ids, subject.clone(), None, &opt, |_, _| {}).unwrap();
        assert_eq!(tr.grids, again.grids);
        let other = ct::causal_trace(&m, &ids, subject.clone(), None, &Options { seed: 4, ..opt.clone() }, |_, _| {}).unwrap();
        assert_ne!(tr.p_corrupt, other.p_corrupt);
    }
}

#[test]
fn without_noise_every_restoration_is_the_clean_probability() {
    let m = tiny(9, 4);
    let ids = tokens(&m, 6, 1);
    let tr = ct::causal_trace(&m, &ids, 1..3, Some(5), &opts(0.0, 3), |_, _| {}).unwrap();
    assert_eq!(tr.target, 5);
    assert!((tr.p_corrupt - tr.p_clean).abs() < 1e-6);
    for (kind, g) in &tr.grids {
        for p in g.iter().flatten() {
            assert!((p - tr.p_clean).abs() < 1e-5, "{kind:?}: {p} vs {}", tr.p_clean);
        }
    }
    // Bad input is an error.
    assert!(ct::causal_trace(&m, &ids, 4..7, None, &opts(1.0, 3), |_, _| {}).is_err());
    assert!(ct::causal_trace(&m, &ids, 2..2, None, &opts(1.0, 3), |_, _| {}).is_err());
    assert!(ct::causal_trace(&m, &ids, 1..2, Some(1 << 20), &opts(1.0, 3), |_, _| {}).is_err());
    assert!(ct::causal_trace(&m, &ids, 1..2, None, &opts(f64::NAN, 3), |_, _| {}).is_err());
}

#[test]
fn token_classes() {
    // Subject 1..4 in 8 tokens: first 1, middle 2, last 3, first subsequent 4, further 5..7, last 7.
    assert_eq!(ct::class_positions(&(1..4), 8), [1..2, 2..3, 3..4, 4..5, 5..7, 7..8]);
    // A one-token subject just before the last token: no middle, no subsequent, no further.
    let c = ct::class_positions(&(0..1), 2);
    assert_eq!((c[0].clone(), c[2].clone(), c[5].clone()), (0..1, 0..1, 1..2));
    assert!(c[1].is_empty() && c[3].is_empty() && c[4].is_empty());
}

#[test]
fn cli_on_stories260k() {
    let h = common::mechc().args(["locate", "causal-trace", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&h.stdout);
    for opt in ["--prompt", "--subject", "--facts", "--ids", "--limit", "--target", "--kinds", "--samples", "--noise", "--window", "--seed", "--out", "--plot"] {
        assert!(help.contains(opt), "{opt} undocumented:\n{help}");
    }
    let model = common::stories_gguf();
    if !model.exists() {
        eprintln!("SKIPPED: {} is missing", model.display());
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = model.to_str().unwrap();
    let (out, plot) = (dir.path().join("ct.json"), dir.path().join("ct.svg"));
    let prompt = "Once upon a time, there was a little girl named Lily. She";
    let base = ["locate", "causal-trace", "--model", m, "--samples", "3", "--force"];
    let o = common::mechc()
        .args(base)
        .args(["--prompt", prompt, "--subject", "little girl", "--window", "3", "--out", out.to_str().unwrap(), "--plot", plot.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = mechc::ir::Findings::read(&out).unwrap();
    assert_eq!(f.method, "causal-trace");
    assert_eq!(f.scores.len(), 3 * 5, "3 kinds × 5 layers");
    let fact = &f.summary["facts"][0];
    let tokens: Vec<String> = serde_json::from_value(fact["tokens"].clone()).unwrap();
    let [a, b]: [usize; 2] = serde_json::from_value(fact["subject_tokens"].clone()).unwrap();
    // (Tokens decoded one by one lose SentencePiece's word-initial space.)
    assert_eq!(tokens[a..b].concat().replace(' ', ""), "littlegirl", "{tokens:?}");
    assert_eq!(fact["grids"]["mlp"].as_array().unwrap().len(), tokens.len());
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(svg.contains("<svg") && svg.contains("little*") && svg.contains("ir*") && !svg.contains("named*"), "subject tokens are starred");
    // The same run again gives the same bytes.
    let out2 = dir.path().join("ct2.json");
    let o = common::mechc().args(base).args(["--prompt", prompt, "--subject", "little girl", "--window", "3", "--out", out2.to_str().unwrap()]).output().unwrap();
    assert!(o.status.success());
    assert!(std::fs::read(&out).unwrap() == std::fs::read(&out2).unwrap(), "not deterministic");

    // Several facts: the aggregate over token classes.
    let facts = dir.path().join("facts.json");
    let rec = |id: u32, prompt: &str, subject: &str| serde_json::json!({"known_id": id, "prompt": prompt, "subject": subject, "attribute": "x"});
    let list = serde_json::json!([rec(0, prompt, "Lily"), rec(1, "Tom had a big red ball and a small", "Tom"), rec(2, "A cat sat", "dog")]);
    std::fs::write(&facts, list.to_string()).unwrap();
    let o = common::mechc()
        .args(base)
        .args(["--facts", facts.to_str().unwrap(), "--include-wrong", "--kinds", "mlp", "--out", out.to_str().unwrap(), "--plot", plot.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = mechc::ir::Findings::read(&out).unwrap();
    assert_eq!(f.summary["facts_traced"], 2);
    assert_eq!(f.options["skipped"]["subject_not_in_prompt"], 1);
    assert_eq!(f.scores.len(), 5);
    assert!(f.scores[0].extra["classes"]["last subject token"].is_number());
    assert!(std::fs::read_to_string(&plot).unwrap().contains("last subject token"));

    // Bad input: one-line errors naming the culprit.
    common::fails(common::mechc().args(base).args(["--prompt", prompt, "--subject", "Paris"]), &["\"Paris\"", "not in the prompt"]);
    common::fails(common::mechc().args(base).args(["--prompt", prompt, "--subject", "Lily", "--window", "0"]), &["--window"]);
    common::fails(common::mechc().args(base), &["--prompt", "--facts"]);
    common::fails(common::mechc().args(base).args(["--facts", "/nonexistent.json"]), &["/nonexistent.json"]);
    common::fails(common::mechc().args(base).args(["--facts", facts.to_str().unwrap(), "--ids", "7"]), &["--ids"]);
}

/// ROME's qualitative result on SmolLM2, on the first few short known_1000 facts the model
/// answers right.
#[test]
fn smollm2_mlp_restoration_peaks_at_the_last_subject_token() {
    let Some(path) = common::registry_model(common::SMOLLM2) else { return };
    if std::env::var_os("MECHC_CACHE").is_none() {
        std::env::set_var("MECHC_CACHE", common::cache());
    }
    let loaded = mechc::io::load(&path, false).unwrap();
    let (m, tok) = (&loaded.model, loaded.tok().unwrap());
    let set = mechc::data::RecordSet::load(&common::shared_data().join("prompts/facts/known_1000.json"), 0).unwrap();
    let opt = Options { samples: 10, noise: ct::default_noise(m).unwrap(), window: 10, seed: 1, kinds: vec![TraceKind::Mlp] };
    let mut traces = vec![];
    for i in 0..set.records.len() {
        if traces.len() == 3 {
            break;
        }
        let field = |f: &str| set.str_field(i, f).unwrap().to_string();
        let ids = tok.prompt_ids(&field("prompt"), false).unwrap();
        let answer = tok.encode(&format!(" {}", field("attribute")), false).unwrap()[0];
        if ids.len() > 8 || ct::greedy(m, &ids).unwrap() != answer {
            continue;
        }
        let subject = ct::subject_range(tok, &ids, &field("subject")).unwrap();
        let tr = ct::causal_trace(m, &ids, subject, None, &opt, |_, _| {}).unwrap();
        assert_eq!(tr.target, answer);
        assert!(tr.p_corrupt < tr.p_clean, "{tr:?}");
        traces.push(tr);
    }
    assert_eq!(traces.len(), 3);
    let (avg, _) = ct::class_effects(&traces, TraceKind::Mlp);
    let layers = m.blocks.len();
    let peak = |row: &[f64], range: std::ops::Range<usize>| range.map(|l| row[l]).fold(f64::MIN, f64::max);
    let (first, last_subject) = (&avg[0], &avg[2]);
    let best = (0..layers).max_by(|&a, &b| last_subject[a].total_cmp(&last_subject[b])).unwrap();
    eprintln!("MLP AIE at the last subject token: {last_subject:.3?}");
    // The peak is in the first two thirds of the layers, clearly above zero, and it fades by
    // the last layers (restoring late MLPs at the subject does little).
    assert!(best < 2 * layers / 3, "peak at layer {best}: {last_subject:?}");
    let early = peak(last_subject, 0..2 * layers / 3);
    assert!(early > 0.05, "{last_subject:?}");
    assert!(peak(last_subject, layers - 5..layers) < 0.5 * early, "{last_subject:?}");
    // The last subject token carries more than the first one.
    assert!(early > peak(first, 0..layers), "first {first:?} last {last_subject:?}");
}
