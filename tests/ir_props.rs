//! Property tests of the component IR on random tiny models, some with per-layer pruned widths.

use mechc::ir::{Component, Ir, Kind};
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::{Linear, Model};
use mechc::runtime::HookPoint;
use proptest::prelude::*;

fn narrow(lin: &Linear, axis: usize, len: usize) -> Linear {
    let w = lin.w().narrow(axis, 0, len).unwrap();
    // A bias runs along the output axis (0): narrowed only when the rows are.
    let b = lin
        .b
        .as_ref()
        .map(|b| if axis == 0 { b.narrow(0, 0, len).unwrap() } else { b.clone() });
    Linear::new(&w, b).unwrap()
}

/// Keep the first `heads` query heads (a multiple of the kv heads) and `d_ff` neurons of block `l`.
fn prune(m: &mut Model, l: usize, heads: usize, d_ff: usize) {
    let hd = m.cfg.head_dim;
    let b = &mut m.blocks[l];
    b.q = narrow(&b.q, 0, heads * hd);
    b.o = narrow(&b.o, 1, heads * hd);
    b.gate = narrow(&b.gate, 0, d_ff);
    b.up = narrow(&b.up, 0, d_ff);
    b.down = narrow(&b.down, 1, d_ff);
}

fn component() -> impl Strategy<Value = Component> {
    let i = 0usize..5000;
    prop_oneof![
        Just(Component::Embed),
        Just(Component::Unembed),
        i.clone().prop_map(Component::Block),
        i.clone().prop_map(Component::Attn),
        i.clone().prop_map(Component::Mlp),
        i.clone().prop_map(Component::Direction),
        (i.clone(), i.clone()).prop_map(|(layer, head)| Component::Head { layer, head }),
        (i.clone(), 0usize..100_000).prop_map(|(layer, n)| Component::Neuron { layer, n }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn component_names_round_trip(c in component()) {
        let s = c.to_string();
        prop_assert_eq!(s.parse::<Component>().unwrap(), c);
        let json = serde_json::to_string(&c).unwrap();
        prop_assert_eq!(json.clone(), format!("\"{s}\""));
        prop_assert_eq!(serde_json::from_str::<Component>(&json).unwrap(), c);
    }

    #[test]
    fn ir_text_and_json_round_trip(seed in 0u64..10_000, prune_seed in 0u64..1000, n_dirs in 0usize..3) {
        let spec = RandomSpec::from_seed(seed);
        let mut m = random_model(spec.config(), seed).unwrap();
        // Prune some layers to per-layer widths, as prune-heads/prune-neurons leave them.
        let mut pruned = vec![];
        for l in 0..m.blocks.len() {
            let s = prune_seed.wrapping_mul(31).wrapping_add(l as u64 * 7);
            if s % 3 == 0 {
                let heads = spec.kv_heads * (1 + (s as usize / 3) % spec.group);
                let d_ff = 1 + (s as usize / 5) % spec.d_ff;
                prune(&mut m, l, heads, d_ff);
                pruned.push((l, heads, d_ff));
            }
        }
        let mut ir = Ir::from_model(&m);
        for i in 0..n_dirs {
            let site = if i % 2 == 0 { HookPoint::ResidPost(i % m.blocks.len()) } else { HookPoint::Embed };
            ir.add_direction(site, &format!("dir \"{i}\" with spaces"));
        }
        let text = ir.to_text();
        let back = Ir::parse(&text).map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
        prop_assert_eq!(&back, &ir, "text:\n{}", text);
        let json = serde_json::to_string(&ir).unwrap();
        prop_assert_eq!(&serde_json::from_str::<Ir>(&json).unwrap(), &ir);

        // Widths come from the weights, and the counts add up to the stored parameters.
        prop_assert_eq!(ir.params(), m.param_count());
        for (l, heads, d_ff) in pruned {
            prop_assert_eq!(ir.layers[l].heads, heads);
            prop_assert_eq!(ir.layers[l].d_ff, d_ff);
        }
        let comps = ir.components();
        let n_heads: usize = ir.layers.iter().map(|l| l.heads).sum();
        prop_assert_eq!(comps.iter().filter(|c| c.kind() == Kind::Head).count(), n_heads);
        for c in &comps {
            prop_assert!(ir.contains(*c), "{} listed but not contained", c);
        }
        for (l, li) in ir.layers.iter().enumerate() {
            let (past_head, past_neuron) = (Component::Head { layer: l, head: li.heads }, Component::Neuron { layer: l, n: li.d_ff });
            prop_assert!(!ir.contains(past_head) && !ir.contains(past_neuron), "{} or {} contained", past_head, past_neuron);
            // Every kv group is read by the same number of query heads.
            let mut per_group = vec![0; li.kv_heads];
            for h in 0..li.heads { per_group[li.kv_group(h)] += 1; }
            prop_assert!(per_group.iter().all(|&g| g == li.heads / li.kv_heads), "{:?}", per_group);
            // Heads and neurons own disjoint parameters inside their block part.
            let head_p: usize = (0..li.heads).map(|h| ir.info(Component::Head { layer: l, head: h }).unwrap().params).sum();
            let neuron_p: usize = (0..li.d_ff).map(|n| ir.info(Component::Neuron { layer: l, n }).unwrap().params).sum();
            prop_assert!(head_p <= li.attn_params && neuron_p <= li.mlp_params);
        }
        prop_assert!(!ir.contains(Component::Block(ir.layers.len())));
        prop_assert!(!ir.contains(Component::Direction(n_dirs)));
    }
}
