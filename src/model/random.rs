//! Tiny random models from a seed, for property tests (here and in the passes' tests).

use candle_core::{Device, Tensor};
use rand::{rngs::StdRng, Rng, SeedableRng};
use rand_distr_shim::normal;

use super::{Arch, Model, ModelConfig, TensorRole};
use crate::error::Result;

/// Shape knobs of a random model; `RandomSpec::from_seed` picks them at random.
#[derive(Debug, Clone)]
pub struct RandomSpec {
    pub arch: Arch,
    pub layers: usize,
    pub kv_heads: usize,
    pub group: usize,
    pub head_dim: usize,
    pub d_model: usize,
    pub d_ff: usize,
    pub vocab: usize,
    pub tied: bool,
    pub attention_bias: bool,
    pub mlp_bias: bool,
}

impl RandomSpec {
    pub fn from_seed(seed: u64) -> Self {
        let mut r = StdRng::seed_from_u64(seed ^ 0x5eed);
        let arch = if r.gen_bool(0.5) { Arch::Llama } else { Arch::Qwen2 };
        let kv_heads = r.gen_range(1..=2);
        let group = r.gen_range(1..=3);
        let head_dim = 2 * r.gen_range(1..=4);
        RandomSpec {
            arch,
            layers: r.gen_range(1..=3),
            kv_heads,
            group,
            head_dim,
            // transformers insists on hidden_size % heads == 0 even with an explicit head_dim.
            d_model: kv_heads * group * r.gen_range(2..=5),
            d_ff: r.gen_range(4..=24),
            vocab: r.gen_range(16..=48),
            tied: r.gen_bool(0.5),
            attention_bias: arch == Arch::Llama && r.gen_bool(0.5),
            mlp_bias: arch == Arch::Llama && r.gen_bool(0.5),
        }
    }

    pub fn config(&self) -> ModelConfig {
        let heads = self.kv_heads * self.group;
        ModelConfig {
            arch: self.arch,
            hidden_size: self.d_model,
            intermediate_size: self.d_ff,
            num_layers: self.layers,
            num_heads: heads,
            num_kv_heads: self.kv_heads,
            head_dim: self.head_dim,
            vocab_size: self.vocab,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: None,
            max_position_embeddings: 512,
            tie_word_embeddings: self.tied,
            qkv_bias: self.arch == Arch::Qwen2 || self.attention_bias,
            o_bias: self.attention_bias,
            mlp_bias: self.mlp_bias,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            raw: Default::default(),
        }
    }
}

/// A model with the given config and weights drawn from a seeded normal distribution
/// (norm weights around 1, so activations stay O(1)).
pub fn random_model(cfg: ModelConfig, seed: u64) -> Result<Model> {
    let mut r = StdRng::seed_from_u64(seed);
    let path = std::path::PathBuf::from("<random>");
    let c = cfg.clone();
    Model::from_tensors(cfg, &path, |role| {
        let shape = role.shape(&c);
        let n: usize = shape.iter().product();
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        let v: Vec<f32> = match role {
            TensorRole::FinalNorm | TensorRole::AttnNorm(_) | TensorRole::MlpNorm(_) => {
                (0..n).map(|_| 1.0 + 0.2 * normal(&mut r)).collect()
            }
            TensorRole::Embed | TensorRole::LmHead => (0..n).map(|_| normal(&mut r)).collect(),
            TensorRole::Bias(..) => (0..n).map(|_| 0.1 * normal(&mut r)).collect(),
            TensorRole::Weight(..) => (0..n).map(|_| normal(&mut r) / fan_in.sqrt()).collect(),
        };
        Ok(Some(Tensor::from_vec(v, shape, &Device::Cpu)?))
    })
}

pub(crate) mod rand_distr_shim {
    use rand::Rng;
    /// A standard normal sample (Box–Muller); avoids a dependency for one function.
    pub fn normal(r: &mut impl Rng) -> f32 {
        let u1: f32 = r.gen_range(f32::EPSILON..1.0);
        let u2: f32 = r.gen();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f32::consts::PI * u2).cos()
    }
}

