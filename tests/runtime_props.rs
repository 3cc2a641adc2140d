//! Property tests of the runtime on tiny random models (config and weights from a seed).

mod common;

use candle_core::{Device, Tensor, D};
use common::{max_abs_diff, rel_diff};
use mechc::model::decoder::Fwd;
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::Model;
use mechc::runtime::generate::{generate, generate_batch, GenOpts};
use mechc::runtime::{Batch, HookPoint, Hooks, KvCache, Op};
use proptest::prelude::*;

fn model(seed: u64) -> Model {
    random_model(RandomSpec::from_seed(seed).config(), seed).unwrap()
}

fn tokens(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    (0..n).map(|i| ((seed.wrapping_mul(2654435761).wrapping_add(i as u64 * 40503)) % vocab as u64) as u32).collect()
}

fn run(m: &Model, ids: &[u32], hooks: &mut Hooks) -> Tensor {
    m.forward(&Batch::single(ids), None, hooks, Fwd::default()).unwrap()
}

fn cfg() -> ProptestConfig {
    ProptestConfig { cases: 24, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(cfg())]

    /// Replacing any hook's activation by its captured value changes nothing (bit for bit).
    #[test]
    fn replace_with_capture_is_identity(seed in 0u64..10_000, len in 1usize..9, site in 0usize..1000) {
        let m = model(seed);
        let ids = tokens(seed, len, m.cfg.vocab_size);
        let mut cap = Hooks::new();
        cap.capture_all();
        let clean = run(&m, &ids, &mut cap);
        let points = HookPoint::all(m.cfg.num_layers);
        let p = points[site % points.len()];
        let mut h = Hooks::new();
        h.intervene(p, Op::Replace(cap.captured[&p].clone()));
        let patched = run(&m, &ids, &mut h);
        prop_assert_eq!(max_abs_diff(&clean, &patched), 0.0, "hook {}", p);
    }

    /// A right- or left-padded batch gives each row the logits it gets alone.
    #[test]
    fn padded_batch_equals_one_by_one(seed in 0u64..10_000, lens in prop::collection::vec(1usize..8, 1..4)) {
        let m = model(seed);
        let seqs: Vec<Vec<u32>> = lens.iter().enumerate().map(|(i, &n)| tokens(seed + i as u64, n, m.cfg.vocab_size)).collect();
        let right = m.forward(&Batch::right_padded(&seqs, 0), None, &mut Hooks::new(), Fwd::default()).unwrap();
        let left = m.forward(&Batch::left_padded(&seqs, 0), None, &mut Hooks::new(), Fwd::default()).unwrap();
        let t = right.dim(1).unwrap();
        for (r, s) in seqs.iter().enumerate() {
            let alone = run(&m, s, &mut Hooks::new()).squeeze(0).unwrap();
            let rr = right.get(r).unwrap().narrow(0, 0, s.len()).unwrap();
            let ll = left.get(r).unwrap().narrow(0, t - s.len(), s.len()).unwrap();
            prop_assert!(rel_diff(&rr, &alone) < 1e-5, "right-padded row {} differs by {}", r, rel_diff(&rr, &alone));
            prop_assert!(rel_diff(&ll, &alone) < 1e-5, "left-padded row {} differs by {}", r, rel_diff(&ll, &alone));
        }
    }

    /// Feeding tokens through the KV cache in chunks gives the logits of the full forward.
    #[test]
    fn kv_cache_equals_full_recomputation(seed in 0u64..10_000, len in 2usize..12, split in 1usize..11) {
        let m = model(seed);
        let ids = tokens(seed, len, m.cfg.vocab_size);
        let full = run(&m, &ids, &mut Hooks::new()).squeeze(0).unwrap();
        let split = split.min(len - 1);
        let mut cache = KvCache::new(m.cfg.num_layers);
        let mut parts = vec![m.forward(&Batch::single(&ids[..split]), Some(&mut cache), &mut Hooks::new(), Fwd::default()).unwrap()];
        for &t in &ids[split..] {
            parts.push(m.forward(&Batch::single(&[t]), Some(&mut cache), &mut Hooks::new(), Fwd::default()).unwrap());
        }
        let inc = Tensor::cat(&parts, 1).unwrap().squeeze(0).unwrap();
        prop_assert!(rel_diff(&inc, &full) < 1e-5, "cached vs full: {}", rel_diff(&inc, &full));
    }

    /// Greedy generation with the cache picks what argmax over full recomputation picks, and the
    /// batched (left-padded) generator agrees with the single-prompt one.
    #[test]
    fn generation_matches_recomputation(seed in 0u64..10_000, len in 1usize..6) {
        let m = model(seed);
        let prompt = tokens(seed, len, m.cfg.vocab_size);
        let opts = GenOpts { max_tokens: 6, ..GenOpts::default() };
        let got = generate(&m, &prompt, &opts, &mut Hooks::new(), |_| Ok(())).unwrap();
        let mut seq = prompt.clone();
        for _ in 0..6 {
            let logits = run(&m, &seq, &mut Hooks::new());
            let last = logits.squeeze(0).unwrap().get(seq.len() - 1).unwrap();
            // Skip the (measure-zero in practice) case of a near-tie, where float order may differ.
            let mut v = last.to_vec1::<f32>().unwrap();
            v.sort_by(|a, b| b.partial_cmp(a).unwrap());
            prop_assume!(v[0] - v[1] > 1e-4);
            seq.push(last.argmax(D::Minus1).unwrap().to_scalar::<u32>().unwrap());
        }
        prop_assert_eq!(&got[..], &seq[prompt.len()..]);
        let other = tokens(seed + 7, len + 2, m.cfg.vocab_size);
        let batch = generate_batch(&m, &[prompt.clone(), other], &opts, &mut Hooks::new(), 0).unwrap();
        prop_assert_eq!(&batch[0], &got);
    }

    /// Skipping block l makes resid_post(l) equal resid_pre(l), and equals the model without
    /// that block's contribution downstream.
    #[test]
    fn skip_block_passes_residual_through(seed in 0u64..10_000, len in 1usize..6, l in 0usize..3) {
        let m = model(seed);
        let l = l % m.cfg.num_layers;
        let ids = tokens(seed, len, m.cfg.vocab_size);
        let mut h = Hooks::new();
        h.skip_block(l).capture(HookPoint::ResidPre(l)).capture(HookPoint::ResidPost(l)).capture(HookPoint::MlpOut(l));
        run(&m, &ids, &mut h);
        prop_assert_eq!(max_abs_diff(&h.captured[&HookPoint::ResidPre(l)], &h.captured[&HookPoint::ResidPost(l)]), 0.0);
        prop_assert!(!h.captured.contains_key(&HookPoint::MlpOut(l)), "the skipped block's inner hooks must not run");
    }

    /// Zeroing a head zeroes its slice of hook_z, leaves the other heads, and o_proj sees it.
    #[test]
    fn scale_zeroes_one_head(seed in 0u64..10_000, len in 1usize..6, head in 0usize..8) {
        let m = model(seed);
        let l = 0;
        let n = m.cfg.num_heads;
        let head = head % n;
        let ids = tokens(seed, len, m.cfg.vocab_size);
        let mut clean = Hooks::new();
        clean.capture(HookPoint::AttnZ(l));
        run(&m, &ids, &mut clean);
        let mut f = vec![1.0; n];
        f[head] = 0.0;
        let mut h = Hooks::new();
        h.intervene(HookPoint::AttnZ(l), Op::Scale(f)).capture(HookPoint::AttnZ(l)).capture(HookPoint::AttnOut(l));
        run(&m, &ids, &mut h);
        let z = &h.captured[&HookPoint::AttnZ(l)];
        let z0 = &clean.captured[&HookPoint::AttnZ(l)];
        prop_assert_eq!(max_abs_diff(&z.narrow(2, head, 1).unwrap(), &z.narrow(2, head, 1).unwrap().zeros_like().unwrap()), 0.0);
        for other in (0..n).filter(|&o| o != head) {
            prop_assert_eq!(max_abs_diff(&z.narrow(2, other, 1).unwrap(), &z0.narrow(2, other, 1).unwrap()), 0.0);
        }
        // attn_out = z_flat @ Woᵀ (+ b): the ablated head contributes nothing.
        let blk = &m.blocks[l];
        let zf = z.flatten_from(2).unwrap();
        let mut want = zf.broadcast_matmul(&blk.o.w().t().unwrap()).unwrap();
        if let Some(b) = &blk.o.b { want = want.broadcast_add(b).unwrap(); }
        prop_assert!(rel_diff(&h.captured[&HookPoint::AttnOut(l)], &want) < 1e-5);
    }

    /// Add at a site adds exactly there (and only at the chosen positions when restricted).
    #[test]
    fn add_steers_the_residual(seed in 0u64..10_000, len in 2usize..6, pos in 0usize..6) {
        let m = model(seed);
        let d = m.cfg.hidden_size;
        let l = m.cfg.num_layers - 1;
        let pos = pos % len;
        let ids = tokens(seed, len, m.cfg.vocab_size);
        let v = Tensor::arange(0f32, d as f32, &Device::Cpu).unwrap();
        let mut clean = Hooks::new();
        clean.capture(HookPoint::ResidPost(l));
        run(&m, &ids, &mut clean);
        let mut h = Hooks::new();
        h.intervene_at(HookPoint::ResidPost(l), Op::Add(v.clone()), vec![pos]).capture(HookPoint::ResidPost(l));
        run(&m, &ids, &mut h);
        let c = clean.captured[&HookPoint::ResidPost(l)].squeeze(0).unwrap();
        let s = h.captured[&HookPoint::ResidPost(l)].squeeze(0).unwrap();
        for t in 0..len {
            let want = if t == pos { (c.get(t).unwrap() + &v).unwrap() } else { c.get(t).unwrap() };
            prop_assert_eq!(max_abs_diff(&s.get(t).unwrap(), &want), 0.0, "position {}", t);
        }
    }

    /// Projecting a direction out of every residual write leaves nothing along it in any write.
    #[test]
    fn project_out_removes_the_direction(seed in 0u64..10_000, len in 1usize..6) {
        let m = model(seed);
        let d = m.cfg.hidden_size;
        let r = Tensor::from_vec((0..d).map(|i| ((i * 7 + seed as usize) % 5) as f32 - 2.0).collect::<Vec<_>>(), d, &Device::Cpu).unwrap();
        prop_assume!(r.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() > 0.0);
        let ids = tokens(seed, len, m.cfg.vocab_size);
        let mut h = Hooks::new();
        h.project_out_everywhere(&r, m.cfg.num_layers).capture_all();
        run(&m, &ids, &mut h);
        let unit = (&r / r.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap() as f64).unwrap();
        let mut writes = vec![HookPoint::Embed];
        for l in 0..m.cfg.num_layers { writes.push(HookPoint::AttnOut(l)); writes.push(HookPoint::MlpOut(l)); writes.push(HookPoint::ResidPost(l)); }
        for p in writes {
            let x = &h.captured[&p];
            let along = x.broadcast_mul(&unit).unwrap().sum(D::Minus1).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            let scale = x.abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap();
            prop_assert!(along <= 1e-5 * (1.0 + scale) * d as f32, "{} keeps {} along r", p, along);
        }
    }

    /// A model written as an HF directory loads back with identical weights and logits.
    #[test]
    fn save_load_roundtrip(seed in 0u64..10_000) {
        let m = model(seed);
        let dir = tempfile::tempdir().unwrap();
        mechc::io::hf::save_model(&m, dir.path(), candle_core::DType::F32, &Default::default()).unwrap();
        let back = mechc::io::hf::load_model(dir.path()).unwrap();
        let ids = tokens(seed, 5, m.cfg.vocab_size);
        prop_assert_eq!(max_abs_diff(&run(&m, &ids, &mut Hooks::new()), &run(&back, &ids, &mut Hooks::new())), 0.0);
    }
}

#[test]
fn hook_names_round_trip() {
    for p in HookPoint::all(3) {
        assert_eq!(HookPoint::parse(&p.to_string()).unwrap(), p);
    }
    assert!(HookPoint::parse("blocks.x.hook_resid_pre").is_err());
    assert!(HookPoint::parse("blocks.0.hook_nope").is_err());
}

#[test]
fn glob_patterns_select_hooks() {
    let m = model(3);
    let ids = tokens(3, 4, m.cfg.vocab_size);
    let mut h = Hooks::new();
    h.capture_matching(&["blocks.*.hook_resid_post".into(), "hook_embed".into()]).unwrap();
    run(&m, &ids, &mut h);
    let names: Vec<String> = h.captured.keys().map(|p| p.to_string()).collect();
    let mut want = vec!["hook_embed".to_string()];
    want.extend((0..m.cfg.num_layers).map(|l| format!("blocks.{l}.hook_resid_post")));
    assert_eq!(names, want);
}
