//! Generation with the KV cache: greedy by default, temperature sampling with a seed.

use candle_core::{DType, Tensor, D};
use rand::{distributions::Distribution, rngs::StdRng, SeedableRng};

use super::{Batch, Hooks, KvCache};
use crate::error::Result;
use crate::model::decoder::Fwd;
use crate::model::Model;

#[derive(Debug, Clone)]
pub struct GenOpts {
    pub max_tokens: usize,
    /// 0 = greedy.
    pub temperature: f64,
    pub seed: u64,
    /// Generation stops after emitting any of these.
    pub stop: Vec<u32>,
}

impl Default for GenOpts {
    fn default() -> Self {
        GenOpts { max_tokens: 64, temperature: 0.0, seed: 0, stop: vec![] }
    }
}

struct Sampler {
    temperature: f64,
    rng: StdRng,
}

impl Sampler {
    fn new(o: &GenOpts) -> Self {
        Sampler { temperature: o.temperature, rng: StdRng::seed_from_u64(o.seed) }
    }

    /// Next token per row from logits [b, vocab].
    fn next(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        if self.temperature <= 0.0 {
            return Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
        }
        let probs = candle_nn::ops::softmax_last_dim(&(logits.to_dtype(DType::F32)? / self.temperature)?)?;
        let mut out = vec![];
        for row in probs.to_vec2::<f32>()? {
            let dist = rand::distributions::WeightedIndex::new(&row)
                .map_err(|e| crate::Error::invalid(format!("sampling: {e}")))?;
            out.push(dist.sample(&mut self.rng) as u32);
        }
        Ok(out)
    }
}

/// Generate from one prompt, calling `on_token` for every new token. Returns the new tokens.
pub fn generate(
    model: &Model,
    prompt: &[u32],
    opts: &GenOpts,
    hooks: &mut Hooks,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Vec<u32>> {
    let mut out = vec![];
    let mut sampler = Sampler::new(opts);
    let mut cache = KvCache::new(model.cfg.num_layers);
    let fwd = Fwd { last_only: true, ..Fwd::default() };
    let mut logits = model.forward(&Batch::single(prompt), Some(&mut cache), hooks, fwd)?;
    for _ in 0..opts.max_tokens {
        let next = sampler.next(&logits.squeeze(1)?)?[0];
        out.push(next);
        on_token(next)?;
        if opts.stop.contains(&next) {
            break;
        }
        logits = model.forward(&Batch::single(&[next]), Some(&mut cache), hooks, fwd)?;
    }
    Ok(out)
}

/// Greedy/sampled generation for several prompts at once (left padding). Each row stops at its
/// own stop token; returns the new tokens of every row (stop token included).
pub fn generate_batch(model: &Model, prompts: &[Vec<u32>], opts: &GenOpts, hooks: &mut Hooks, pad: u32) -> Result<Vec<Vec<u32>>> {
    let b = prompts.len();
    let mut out = vec![vec![]; b];
    let mut done = vec![false; b];
    let mut sampler = Sampler::new(opts);
    let mut cache = KvCache::new(model.cfg.num_layers);
    let fwd = Fwd { last_only: true, ..Fwd::default() };
    let mut logits = model.forward(&Batch::left_padded(prompts, pad), Some(&mut cache), hooks, fwd)?;
    for _ in 0..opts.max_tokens {
        let next = sampler.next(&logits.squeeze(1)?)?;
        for r in 0..b {
            if !done[r] {
                out[r].push(next[r]);
                done[r] = opts.stop.contains(&next[r]);
            }
        }
        if done.iter().all(|&d| d) {
            break;
        }
        // Finished rows keep decoding a padding token that nobody attends to.
        let step = Batch {
            ids: (0..b).map(|r| vec![if done[r] { pad } else { next[r] }]).collect(),
            valid: (0..b).map(|r| vec![!done[r]]).collect(),
        };
        logits = model.forward(&step, Some(&mut cache), hooks, fwd)?;
    }
    Ok(out)
}
