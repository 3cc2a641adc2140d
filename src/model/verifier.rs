//! The structural verifier the pass manager (`compile::Plan`) runs after every pass: shapes agree with each other
//! and with the config, GQA groups are whole, every weight is finite.

use crate::error::{Error, Result};
use crate::model::{Model, Proj};

pub fn check(m: &Model) -> Result<()> {
    let c = &m.cfg;
    let (d, hd) = (c.hidden_size, c.head_dim);
    let bad = |what: String| Err(Error::invalid(what));
    if m.blocks.len() != c.num_layers {
        return bad(format!("{} blocks but num_hidden_layers = {}", m.blocks.len(), c.num_layers));
    }
    if m.embed.dims() != [c.vocab_size, d] || m.lm_head.dims() != [c.vocab_size, d] || m.norm.dims() != [d] {
        return bad(format!("embedding/head/norm shapes {:?} {:?} {:?} disagree with vocab {} × d_model {d}", m.embed.dims(), m.lm_head.dims(), m.norm.dims(), c.vocab_size));
    }
    for (l, b) in m.blocks.iter().enumerate() {
        let (q, k, v, o) = (shape(b, Proj::Q), shape(b, Proj::K), shape(b, Proj::V), shape(b, Proj::O));
        let (g, u, dn) = (shape(b, Proj::Gate), shape(b, Proj::Up), shape(b, Proj::Down));
        if q.1 != d || k.1 != d || v.1 != d || g.1 != d || u.1 != d || o.0 != d || dn.0 != d {
            return bad(format!("layer {l}: a projection does not read or write d_model = {d}"));
        }
        if q.0 % hd != 0 || k.0 % hd != 0 || k.0 != v.0 || o.1 != q.0 {
            return bad(format!("layer {l}: q {q:?}, k {k:?}, v {v:?}, o {o:?} are not whole heads of {hd}"));
        }
        let (nq, nkv) = (q.0 / hd, k.0 / hd);
        if nkv == 0 || nq == 0 || nq % nkv != 0 {
            return bad(format!("layer {l}: {nq} query heads do not form whole groups over {nkv} kv heads"));
        }
        if g != u || dn.1 != g.0 {
            return bad(format!("layer {l}: gate {g:?}, up {u:?}, down {dn:?} disagree on d_ff"));
        }
        if b.attn_norm.dims() != [d] || b.mlp_norm.dims() != [d] {
            return bad(format!("layer {l}: norm weights are not [{d}]"));
        }
        for p in Proj::ALL {
            if let Some(bias) = &b.proj(p).b {
                if bias.dims() != [b.proj(p).out_features()] {
                    return bad(format!("layer {l}: {p:?} bias {:?} does not match its {} outputs", bias.dims(), b.proj(p).out_features()));
                }
            }
        }
    }
    for (role, t) in m.tensors() {
        crate::model::check_finite(&t, &role.hf_name(), std::path::Path::new("<compiled>"))?;
    }
    Ok(())
}

fn shape(b: &crate::model::decoder::Block, p: Proj) -> (usize, usize) {
    let s = b.proj(p).w().dims();
    (s[0], s[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::{random_model, RandomSpec};

    #[test]
    fn accepts_models_and_catches_broken_ones() {
        for seed in 0..8 {
            let m = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
            check(&m).unwrap();
            let mut broken = m.clone();
            broken.cfg.num_layers += 1;
            assert!(check(&broken).is_err());
            let mut broken = m.clone();
            let w = broken.blocks[0].gate.w().narrow(0, 1, m.cfg.intermediate_size - 1).unwrap();
            broken.blocks[0].gate = crate::model::decoder::Linear::new(&w, None).unwrap();
            assert!(check(&broken).unwrap_err().to_string().contains("d_ff"));
            let mut broken = m.clone();
            let w = (broken.blocks[0].up.w() * f64::NAN).unwrap();
            broken.blocks[0].up = crate::model::decoder::Linear::new(&w, broken.blocks[0].up.b.clone()).unwrap();
            assert!(check(&broken).unwrap_err().to_string().contains("NaN"));
        }
    }
}
