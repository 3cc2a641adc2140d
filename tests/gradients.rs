//! The gradient mode: composed ops whose backward is right (checked against finite differences
//! of the inference forward), and no gradients for frozen weights.

mod common;

use std::sync::Arc;

use candle_core::{Device, Tensor, Var, D};
use common::rel_diff;
use mechc::model::decoder::Fwd;
use mechc::model::random::{random_model, RandomSpec};
use mechc::runtime::{Batch, HookPoint, Hooks, Op};

/// NLL of `target` at the last position with `delta` added at `point` (last position only).
fn loss(m: &mechc::model::Model, ids: &[u32], point: HookPoint, delta: &Tensor, target: u32, grad: bool) -> Tensor {
    let t = ids.len();
    let mut h = Hooks::new();
    let d = delta.clone();
    h.intervene_at(point, Op::Func(Arc::new(move |x: &Tensor| x.broadcast_add(&d))), vec![t - 1]);
    let logits = m.forward(&Batch::single(ids), None, &mut h, Fwd { grad, ..Fwd::default() }).unwrap();
    let last = logits.squeeze(0).unwrap().get(t - 1).unwrap();
    let lp = candle_nn::ops::log_softmax(&last, D::Minus1).unwrap();
    lp.get(target as usize).unwrap().neg().unwrap()
}

#[test]
fn gradients_match_finite_differences() {
    for seed in [1u64, 2, 3, 4, 5, 6] {
        let m = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
        let ids: Vec<u32> = (0..6).map(|i| (i * 5 + seed as u32) % m.cfg.vocab_size as u32).collect();
        let target = 3;
        // One site on the residual stream, one per-head site, one per-neuron site.
        let sites = [
            (HookPoint::MlpOut(0), vec![m.cfg.hidden_size]),
            (HookPoint::AttnZ(0), vec![m.cfg.num_heads, m.cfg.head_dim]),
            (HookPoint::MlpPost(m.cfg.num_layers - 1), vec![m.cfg.intermediate_size]),
        ];
        for (point, shape) in sites {
            let n: usize = shape.iter().product();
            let init: Vec<f32> = (0..n).map(|i| 0.1 * ((i as f32 * 1.7).sin())).collect();
            let var = Var::from_vec(init.clone(), shape.clone(), &Device::Cpu).unwrap();
            let l = loss(&m, &ids, point, var.as_tensor(), target, true);
            let grads = l.backward().unwrap();
            let g = grads.get(var.as_tensor()).expect("gradient for the variable").flatten_all().unwrap().to_vec1::<f32>().unwrap();
            // Frozen weights must not get gradients (they cost a matmul each).
            assert!(grads.get(m.blocks[0].q.w()).is_none(), "q_proj weight got a gradient");
            assert!(grads.get(&m.lm_head).is_none(), "lm_head got a gradient");

            // Central differences on the inference (fused-kernel) forward.
            let h = 1e-2f32;
            let gmax = g.iter().fold(0f32, |a, &b| a.max(b.abs()));
            for i in 0..n.min(12) {
                let at = |s: f32| {
                    let mut v = init.clone();
                    v[i] += s;
                    let t = Tensor::from_vec(v, shape.clone(), &Device::Cpu).unwrap();
                    loss(&m, &ids, point, &t, target, false).to_scalar::<f32>().unwrap()
                };
                let fd = (at(h) - at(-h)) / (2.0 * h);
                assert!(
                    (fd - g[i]).abs() <= 1e-2 * gmax + 2e-3,
                    "seed {seed} {point} coord {i}: backprop {} vs finite difference {fd}",
                    g[i]
                );
            }
        }
    }
}

#[test]
fn gradient_mode_forward_equals_inference_forward() {
    for seed in 0..8u64 {
        let m = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
        let ids: Vec<u32> = (0..7).map(|i| (i * 3 + 1) % m.cfg.vocab_size as u32).collect();
        let a = m.forward(&Batch::single(&ids), None, &mut Hooks::new(), Fwd { grad: true, ..Fwd::default() }).unwrap();
        let b = m.forward(&Batch::single(&ids), None, &mut Hooks::new(), Fwd::default()).unwrap();
        assert!(rel_diff(&a, &b) < 1e-5, "seed {seed}: {}", rel_diff(&a, &b));
    }
}
