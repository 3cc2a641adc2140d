//! bake-steering: commit a residual-stream direction into the weights, as an additive shift
//! (mode `add`) or as directional ablation (mode `ablate`). The help text is [`DOC`].

use candle_core::{DType, Device, Tensor};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use serde::Deserialize;

use super::common::{direction, unit, vector};
use super::{options, BuildCtx, Pass, PassInfo};
use crate::error::{Error, Result};
use crate::io::control_vector::{self, Direction};
use crate::model::decoder::Linear;
use crate::model::{Arch, Model, Proj};
use crate::runtime::hooks::project_out;
use crate::runtime::{HookPoint, Hooks, Op};

pub const INFO: PassInfo = PassInfo {
    name: "bake-steering",
    doc: DOC,
    build,
    example,
};

const DOC: &str = r#"Bake a steering direction into the weights: add it (mode add) or ablate it (mode ablate).

Options:
  mode = "add" | "ablate"
  direction = "dir.safetensors[:tensor]"   a 1-D float tensor of d_model values (relative paths
              resolve against the pipeline file's directory), or { by = ID [, layer = L] }: a
              [[locate]] direction step's vector (its best layer's, or layer L's), or inline:
              direction = [0.1, -0.3, ...] (d_model numbers)
  mode add:
    layer = 12          block (0-based) whose output gets c·v at every position
    coeff = 4.0         the coefficient c, or coeff = "auto" with an `auto` table (below)
    normalize = true    scale v to unit length first (default true)
    control_vector = "steer.gguf"   also export c·v as a llama.cpp control vector
                        (`direction.{layer}`; llama.cpp cannot steer block 0's output)
  mode ablate:
    layers = [0, 1, ...]  blocks whose o_proj and down_proj are orthogonalised (default: all)
    weights = [1.0, ...]  per-layer strength λ (default 1): W ← (I − λ r rᵀ) W
    kernel = { attn = K, mlp = K }   instead of layers/weights: λ per layer and per component
                          (attn: o_proj, mlp: down_proj) from a kernel (heretic's
                          parametrisation), K = { max_weight = 1.0, max_weight_position = 14.5,
                          min_weight = 0.2, min_weight_distance = 6.0 }: at distance
                          t = |layer − max_weight_position| ≤ min_weight_distance,
                          λ = max_weight + (t / min_weight_distance)(min_weight − max_weight);
                          farther layers, and a component left out, are not written
    norm_preserving = false   keep each output row's norm of every written matrix: rows scaled
                          to unit length, projected, rescaled to their old length (heretic's
                          row_normalization = "full", exact here rather than low-rank)
    embed = true          orthogonalise the embedding too (default true)
    direction = { by = ID, layer = 13.4 }   a fractional layer mixes the two layers' unit
                          vectors (0.6·v̂13 + 0.4·v̂14, renormalised; compile/select.rs)
    params = "auto"       the kernel (and the direction's layer) searched, with an `auto` table:
    auto = { max_kl = 0.2, kl_prompts = "harmless.json:instruction",
             metric_prompts = "harmful.json:instruction" }
    max_kl = 0.2          budget on the mean first-token KL (nats) over kl_prompts (required)
    kl_prompts, metric_prompts = "F[:FIELD]"   harmless prompts for the KL, harmful ones for the
                          refusal score (required)
    confirm_prompts = "F[:FIELD]"   harmful prompts for the confirming refusal rate (default
                          metric_prompts)
    skip = 0              use each set's prompts after the first N (those a [[locate]] used)
    limit = 24            then the next N of each set
    trials = 48, startup = 16, seed = 0   TPE trials, the first `startup` uniformly random
    components = ["attn", "mlp"]   the kernels searched (a component left out is not written)
    direction_layers = [lo, hi]   also search the direction's fractional layer (needs
                          direction = { by = ID }, a [[locate]] step with per-layer vectors)
    refusal_tokens = ["I", "As"]  the refusal score's tokens (log-odds at the first response
                          position)
    confirm = 3           in-budget Pareto points (lowest score first) whose greedy refusal
                          rate is measured; the lowest rate wins (0: the lowest score wins)
    max_tokens = 48, batch = 16, chat = true, plot = "pareto.svg"
  Search space and rule: `src/search/kernel.rs` (heretic's ranges; a budget no trial meets fails
  the compile, nothing written). Every trial goes into the manifest (`passes[i].search`, its
  point in `params`) and is printed as a table under the pass's line.

  mode add, coeff = "auto": a parameter search (`src/search/coeff.rs`) that the compile driver
  runs just before this pass, on the model as the pass receives it, and that hands the pass an
  explicit coeff: the c that maximises a behaviour metric subject to a budget on the mean
  first-token KL(unsteered ‖ steered) over neutral prompts, every candidate measured with this
  pass's runtime twin (no weight rewrite per candidate):
    auto = { max_kl = 0.5, kl_prompts = "harmless.json:instruction", range = [0, 2],
             metric = "refusal", metric_prompts = "harmful.json:instruction" }
    max_kl = 0.5          budget on the mean first-token KL (nats) over kl_prompts (required)
    kl_prompts = "F[:FIELD]"   neutral prompts for the KL (required)
    range = [lo, hi]      coefficients searched, one sign (required: the scale depends on
                          normalize); lo is the smallest |c| you would accept
    metric = "projection" | "target" | "refusal"   what to maximise (default projection):
                          projection: mean last-token resid_post of the last layer on v̂;
                          target: mean log-prob of the first tokens of `targets`;
                          refusal: refusal-phrase rate of greedy completions (`mechc eval refusal`)
    metric_prompts = "F[:FIELD]"   prompts the metric is measured on (default: kl_prompts;
                          required for refusal)
    control_prompts = "F[:FIELD]"  optional: the metric also measured here and reported, not
                          optimised (e.g. refusal on harmless prompts: over-refusal)
    targets = [" happy"]  for metric = "target"
    limit = 20            first N prompts of each set (0 = all)
    chat = true           chat template on every set (default true)
    max_tokens = 32       new tokens per completion (refusal)
    grid = 8              evenly spaced coefficients over range, ends included
    tol = 0.02            the budget's edge is refined to a bracket narrower than tol·|c|
    batch = 8             sequences per forward pass
    plot = "curve.svg"    also write the trade-off curve (KL, metric, control vs c) as an SVG
  Search: the KL and the metric at every grid point (the whole curve, for the record); if even
  lo breaks the budget the compile fails (nothing written); the KL is close to monotone in |c|,
  so the first grid point over budget and the one before it bracket the budget's edge, which
  Brent's root finder (argmin BrentRoot on KL(c) − max_kl) narrows to tol; the chosen c is the
  in-budget point (grid points before the first violation, and the refined edge) with the
  highest metric, ties to the smaller |c|. Every trial (c, KL, metric, control) and the chosen c
  go into the manifest (`passes[i].search`, with `passes[i].options.coeff` the chosen c) and are
  printed as a table under the pass's line.

add: layers[layer].mlp.down_proj.bias += c·v. Llama only: the config gets mlp_bias = true, so
HF creates gate/up/down biases in every layer; the others are written as zeros. Qwen2 is refused:
HF's Qwen2 MLP and o_proj have no bias option (use mode ablate there).
ablate (Arditi et al.; per-layer λ as heretic): with r the unit direction, every matrix that
writes into the residual stream loses its component along r: embed_tokens E ← E (I − r rᵀ),
each chosen o_proj and down_proj W ← (I − λ r rᵀ) W and their biases b ← b − λ (r·b) r. The
unembedding is left alone; a tied embedding is therefore untied (lm_head keeps the original).
norm_preserving: with n the row norms of W and s = 1/n (0 for a zero row), W ← diag(n·d) P diag(s) W
and b ← diag(n·d) P diag(s) b, d the inverse row norms of P diag(s) W (P = I − λ r rᵀ).

Runtime twin: add: add c·v at blocks.{layer}.hook_resid_post at every position. ablate: project
r out (x ← x − λ (x·r) r) at hook_embed and at each written block's hook_attn_out (o_proj) and
hook_mlp_out (down_proj), with norm_preserving x ← n·d ⊙ P(s ⊙ x) there. Exact up to float
rounding.

Example (ablate a [[locate]] step's refusal direction everywhere):
    [[pass]]
    name = "bake-steering"
    mode = "ablate"
    direction = { by = "refusal" }

Example (ablate a direction from a file in layers 10-14, half strength at the ends):
    [[pass]]
    name = "bake-steering"
    mode = "ablate"
    direction = "refusal_dir.safetensors:v"
    layers = [10, 11, 12, 13, 14]
    weights = [0.5, 1.0, 1.0, 1.0, 0.5]

Example (heretic's kernel: attention outputs around layer 14, MLPs lightly, row norms kept):
    [[pass]]
    name = "bake-steering"
    mode = "ablate"
    direction = "refusal_dir.safetensors:v"
    kernel = { attn = { max_weight = 1.2, max_weight_position = 14.0, min_weight = 0.3, min_weight_distance = 8.0 }, mlp = { max_weight = 0.4, max_weight_position = 16.0, min_weight = 0.0, min_weight_distance = 4.0 } }
    norm_preserving = true
    embed = false

Example (the kernel searched under a KL budget: TPE trials through the twin, the Pareto front
of refusal score vs KL, the best confirmed by generation; configs/qwen-abliterate.toml also
searches the direction's layer with direction = { by = ID } and auto.direction_layers):
    [[pass]]
    name = "bake-steering"
    mode = "ablate"
    direction = "refusal_dir.safetensors:v"
    params = "auto"
    auto = { max_kl = 0.2, kl_prompts = "harmless.json:instruction", metric_prompts = "harmful.json:instruction", trials = 40, startup = 12 }

Example (add an inline vector of d_model numbers after block 1, 4 times its unit length):
    [[pass]]
    name = "bake-steering"
    mode = "add"
    direction = [0.12, -0.05, 0.31, 0.0]
    layer = 1
    coeff = 4.0

Example (add layer 9's happiness vector after block 8, coeff searched under a KL budget):
    [[pass]]
    name = "bake-steering"
    mode = "add"
    direction = { by = "happiness", layer = 9 }
    layer = 8
    normalize = false
    coeff = "auto"
    auto = { max_kl = 0.3, range = [0.0, 12.0], grid = 7, kl_prompts = "harmless.json:instruction", metric = "projection", metric_prompts = "happy_sad.json" }"#;


#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Opts {
    mode: String,
    direction: toml::Value,
    layer: Option<usize>,
    coeff: Option<toml::Value>,
    normalize: Option<bool>,
    control_vector: Option<String>,
    layers: Option<Vec<usize>>,
    weights: Option<Vec<f64>>,
    kernel: Option<Kernels>,
    norm_preserving: Option<bool>,
    embed: Option<bool>,
}

/// A per-layer ablation weight: peak `max_weight` at `max_weight_position` (fractional), falling
/// linearly to `min_weight` at `min_weight_distance` layers away, 0 beyond (heretic's kernel).
#[derive(Deserialize, Debug, Clone, Copy, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    pub max_weight: f64,
    pub max_weight_position: f64,
    pub min_weight: f64,
    pub min_weight_distance: f64,
}

impl Kernel {
    /// λ at `layer` (0 = not written).
    pub fn weight(&self, layer: usize) -> f64 {
        let t = (layer as f64 - self.max_weight_position).abs();
        if t > self.min_weight_distance {
            return 0.0;
        }
        self.max_weight + t / self.min_weight_distance * (self.min_weight - self.max_weight)
    }

    fn check(&self, what: &str) -> Result<()> {
        let k = self;
        if ![k.max_weight, k.max_weight_position, k.min_weight, k.min_weight_distance].iter().all(|x| x.is_finite()) {
            return Err(invalid(format!("`kernel.{what}`: every value must be finite")));
        }
        if k.min_weight_distance <= 0.0 {
            return Err(invalid(format!("`kernel.{what}.min_weight_distance` = {}: must be > 0", k.min_weight_distance)));
        }
        Ok(())
    }

    /// (layer, λ) for the layers it writes (λ ≠ 0).
    fn layers(&self, n: usize) -> Vec<(usize, f64)> {
        (0..n).map(|l| (l, self.weight(l))).filter(|&(_, w)| w != 0.0).collect()
    }
}

/// `kernel = { attn = K, mlp = K }`: a component left out is not written.
#[derive(Deserialize, Debug, Clone, Copy, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Kernels {
    pub attn: Option<Kernel>,
    pub mlp: Option<Kernel>,
}

enum Mode {
    /// `v` (unit if normalize) times the coefficient.
    Add {
        layer: usize,
        v: Tensor,
        coeff: f64,
        control_vector: Option<std::path::PathBuf>,
    },
    /// Unit `r`; (block, λ) pairs sorted by block, for o_proj (`attn`) and down_proj (`mlp`).
    Ablate {
        r: Tensor,
        attn: Vec<(usize, f64)>,
        mlp: Vec<(usize, f64)>,
        embed: bool,
        norm_preserving: bool,
    },
}

struct BakeSteering {
    mode: Mode,
    arch: Arch,
}

fn invalid(m: impl Into<String>) -> Error {
    Error::invalid(m)
}

fn build(t: &toml::Table, cx: &BuildCtx) -> Result<Box<dyn Pass>> {
    let m = cx.source;
    let o: Opts = options(t)?;
    let (n, d) = (m.cfg.num_layers, m.cfg.hidden_size);
    let only = |names: &[(&str, bool)], mode: &str| -> Result<()> {
        match names.iter().find(|(_, set)| *set) {
            Some((name, _)) => Err(invalid(format!("`{name}` does not apply to mode = \"{mode}\""))),
            None => Ok(()),
        }
    };
    let mode = match o.mode.as_str() {
        "add" => {
            only(
                &[
                    ("layers", o.layers.is_some()),
                    ("weights", o.weights.is_some()),
                    ("kernel", o.kernel.is_some()),
                    ("norm_preserving", o.norm_preserving.is_some()),
                    ("embed", o.embed.is_some()),
                ],
                "add",
            )?;
            if m.cfg.arch != Arch::Llama {
                return Err(invalid(format!(
                    "mode = \"add\" is Llama-only: HF's {} has no MLP or o_proj bias to bake into (use mode = \"ablate\")",
                    m.cfg.arch.name()
                )));
            }
            let layer = o
                .layer
                .ok_or_else(|| invalid("mode = \"add\" needs `layer` (the block whose output is steered)"))?;
            if layer >= n {
                return Err(invalid(format!(
                    "`layer` = {layer} does not exist (the model has layers 0..{})",
                    n - 1
                )));
            }
            let coeff = match &o.coeff {
                None => return Err(invalid("mode = \"add\" needs `coeff` (a number, or \"auto\" with an `auto` table)")),
                Some(toml::Value::Float(c)) => *c,
                Some(toml::Value::Integer(c)) => *c as f64,
                Some(toml::Value::String(s)) if s == "auto" => {
                    return Err(invalid(
                        "`coeff = \"auto\"` is a search the compile driver runs before the pass is built (`mechc::search`; a pipeline's [[pass]] with an `auto` table)",
                    ))
                }
                Some(other) => return Err(invalid(format!("`coeff` must be a number or \"auto\", found {other}"))),
            };
            if !coeff.is_finite() {
                return Err(invalid("`coeff` must be finite"));
            }
            let v = vector(&o.direction, o.normalize.unwrap_or(true), cx)?;
            let control_vector = match &o.control_vector {
                Some(p) if layer == 0 => {
                    return Err(invalid(format!(
                        "`control_vector` = \"{p}\": llama.cpp cannot steer block 0's output (direction.0 is invalid)"
                    )))
                }
                Some(p) => Some(cx.path(p)),
                None => None,
            };
            Mode::Add {
                layer,
                v,
                coeff,
                control_vector,
            }
        }
        "ablate" => {
            only(
                &[
                    ("layer", o.layer.is_some()),
                    ("coeff", o.coeff.is_some()),
                    ("normalize", o.normalize.is_some()),
                    ("control_vector", o.control_vector.is_some()),
                ],
                "ablate",
            )?;
            let r = unit(&direction(&o.direction, d, cx)?)?;
            let (embed, norm_preserving) = (o.embed.unwrap_or(true), o.norm_preserving.unwrap_or(false));
            if let Some(k) = o.kernel {
                if o.layers.is_some() || o.weights.is_some() {
                    return Err(invalid("`kernel` and `layers`/`weights` both given: pick one"));
                }
                let of = |k: Option<Kernel>, what: &str| -> Result<Vec<(usize, f64)>> {
                    k.map(|k| k.check(what).map(|_| k.layers(n))).unwrap_or(Ok(vec![]))
                };
                let (attn, mlp) = (of(k.attn, "attn")?, of(k.mlp, "mlp")?);
                let mode = Mode::Ablate { r, attn, mlp, embed, norm_preserving };
                return Ok(Box::new(BakeSteering { mode, arch: m.cfg.arch }));
            }
            let layers = o.layers.unwrap_or_else(|| (0..n).collect());
            if let Some(&bad) = layers.iter().find(|&&l| l >= n) {
                return Err(invalid(format!(
                    "`layers`: layer {bad} does not exist (the model has layers 0..{})",
                    n - 1
                )));
            }
            let mut seen = layers.clone();
            seen.sort_unstable();
            seen.dedup();
            if seen.len() != layers.len() {
                return Err(invalid("`layers` names a layer twice"));
            }
            let weights = o.weights.unwrap_or_else(|| vec![1.0; layers.len()]);
            if weights.len() != layers.len() {
                return Err(invalid(format!(
                    "`weights` has {} values for {} layers",
                    weights.len(),
                    layers.len()
                )));
            }
            if weights.iter().any(|w| !w.is_finite()) {
                return Err(invalid("`weights` must be finite"));
            }
            let mut layers: Vec<(usize, f64)> = layers.into_iter().zip(weights).collect();
            layers.sort_by_key(|p| p.0);
            Mode::Ablate { r, attn: layers.clone(), mlp: layers, embed, norm_preserving }
        }
        other => return Err(invalid(format!("unknown `mode` = \"{other}\" (modes: add, ablate)"))),
    };
    Ok(Box::new(BakeSteering { mode, arch: m.cfg.arch }))
}

fn example(m: &Model, seed: u64) -> Option<toml::Table> {
    use toml::Value as V;
    let mut r = rand::rngs::StdRng::seed_from_u64(seed ^ 0x57ee_12a9);
    let n = m.cfg.num_layers;
    let dir: Vec<V> = (0..m.cfg.hidden_size)
        .map(|_| V::Float((r.gen_range(-0.3f64..0.3) * 1e4).round() / 1e4))
        .collect();
    let mut t = toml::Table::new();
    t.insert("direction".into(), V::Array(dir));
    if m.cfg.arch == Arch::Llama && r.gen_bool(0.5) {
        t.insert("mode".into(), V::String("add".into()));
        t.insert("layer".into(), V::Integer(r.gen_range(0..n) as i64));
        t.insert("coeff".into(), V::Float((r.gen_range(-3.0f64..3.0) * 100.0).round() / 100.0));
        if r.gen_bool(0.5) {
            t.insert("normalize".into(), V::Boolean(r.gen_bool(0.5)));
        }
    } else {
        t.insert("mode".into(), V::String("ablate".into()));
        let kernel = |r: &mut rand::rngs::StdRng| -> V {
            let mut k = toml::Table::new();
            let mut num = |k: &mut toml::Table, key: &str, lo: f64, hi: f64| {
                k.insert(key.into(), V::Float((r.gen_range(lo..hi) * 100.0).round() / 100.0));
            };
            num(&mut k, "max_weight", 0.0, 1.5);
            num(&mut k, "max_weight_position", 0.0, n as f64);
            num(&mut k, "min_weight", 0.0, 1.0);
            num(&mut k, "min_weight_distance", 0.5, n as f64);
            V::Table(k)
        };
        if r.gen_bool(0.3) {
            let mut k = toml::Table::new();
            for c in ["attn", "mlp"] {
                if r.gen_bool(0.8) {
                    k.insert(c.into(), kernel(&mut r));
                }
            }
            t.insert("kernel".into(), V::Table(k));
        } else if r.gen_bool(0.5) {
            let mut all: Vec<usize> = (0..n).collect();
            all.shuffle(&mut r);
            let k = r.gen_range(1..=n);
            t.insert(
                "layers".into(),
                V::Array(all[..k].iter().map(|&l| V::Integer(l as i64)).collect()),
            );
            if r.gen_bool(0.5) {
                t.insert(
                    "weights".into(),
                    V::Array(
                        (0..k)
                            .map(|_| V::Float((r.gen_range(0.0f64..1.5) * 100.0).round() / 100.0))
                            .collect(),
                    ),
                );
            }
        }
        if r.gen_bool(0.3) {
            t.insert("embed".into(), V::Boolean(false));
        }
        if r.gen_bool(0.4) {
            t.insert("norm_preserving".into(), V::Boolean(true));
        }
    }
    Some(t)
}

/// What a written matrix's outputs become: x ← out ⊙ P(inv ⊙ x) with P = I − λ r rᵀ, where
/// plain ablation has inv = out = 1 and norm_preserving takes inv = 1/n (n the row norms of W,
/// 0 for a zero row) and out = n/‖row of P diag(inv) W‖ (0 likewise).
#[derive(Clone)]
struct RowMap {
    r: Tensor,
    lambda: f64,
    /// (inv, out), each [d_model] f32; None: plain ablation.
    scales: Option<(Tensor, Tensor)>,
}

fn inverse_or_zero(n: &Tensor) -> Result<Tensor> {
    let v: Vec<f32> = n.to_vec1::<f32>()?.into_iter().map(|x| if x > 0.0 { 1.0 / x } else { 0.0 }).collect();
    Ok(Tensor::from_vec(v, n.dims1()?, n.device())?)
}

impl RowMap {
    fn new(lin: &Linear, r: &Tensor, lambda: f64, norm_preserving: bool) -> Result<RowMap> {
        let mut map = RowMap { r: r.clone(), lambda, scales: None };
        if norm_preserving {
            let w = lin.w().to_dtype(DType::F32)?;
            let n = w.sqr()?.sum(1)?.sqrt()?;
            let inv = inverse_or_zero(&n)?;
            map.scales = Some((inv.clone(), Tensor::ones_like(&inv)?));
            let projected = map.columns(&w)?;
            let out = (n * inverse_or_zero(&projected.sqr()?.sum(1)?.sqrt()?)?)?;
            map.scales = Some((inv, out));
        }
        Ok(map)
    }

    /// The map on activations [.., d_model] (the twin).
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match &self.scales {
            None => project_out(x, &self.r, self.lambda),
            Some((inv, out)) => {
                let y = project_out(&x.broadcast_mul(&inv.to_dtype(x.dtype())?)?, &self.r, self.lambda)?;
                y.broadcast_mul(&out.to_dtype(x.dtype())?)
            }
        }
    }

    /// The map on every column of W [d_model, d_in].
    fn columns(&self, w: &Tensor) -> candle_core::Result<Tensor> {
        self.apply(&w.t()?)?.t()?.contiguous()
    }

    /// The linear layer whose outputs are the map of `lin`'s.
    fn linear(&self, lin: &Linear) -> Result<Linear> {
        let w = self.columns(lin.w())?;
        let b = lin.b.as_ref().map(|b| self.apply(&b.unsqueeze(0)?)?.squeeze(0)).transpose()?;
        Linear::new(&w, b)
    }
}

impl Pass for BakeSteering {
    fn run(&self, m: &mut Model) -> Result<String> {
        match &self.mode {
            Mode::Add { layer, v, coeff, .. } => {
                let v = &(v * *coeff)?;
                let mut added = false;
                if !m.cfg.mlp_bias {
                    for b in m.blocks.iter_mut() {
                        for p in [Proj::Gate, Proj::Up, Proj::Down] {
                            let lin = b.proj_mut(p);
                            lin.b = Some(Tensor::zeros(lin.out_features(), DType::F32, &Device::Cpu)?);
                        }
                    }
                    m.cfg.mlp_bias = true;
                    added = true;
                }
                let down = &mut m.blocks[*layer].down;
                let b = down.b.as_ref().expect("mlp_bias set above");
                down.b = Some((b + v.to_dtype(b.dtype())?)?);
                let norm = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
                Ok(format!(
                    "added a vector of norm {norm:.4} to layers[{layer}].mlp.down_proj.bias{}",
                    if added {
                        " (mlp_bias turned on: zero gate/up/down biases in every other layer)"
                    } else {
                        ""
                    }
                ))
            }
            Mode::Ablate { r, attn, mlp, embed, norm_preserving } => {
                if *embed {
                    // In row blocks: project_out works in f64, and the whole embedding of a 128k
                    // vocabulary in f64 would be several GB of temporaries.
                    let vocab = m.embed.dim(0)?;
                    let blocks = (0..vocab)
                        .step_by(16_384)
                        .map(|s| project_out(&m.embed.narrow(0, s, 16_384.min(vocab - s))?, r, 1.0))
                        .collect::<candle_core::Result<Vec<_>>>()?;
                    let new = Tensor::cat(&blocks, 0)?;
                    if m.cfg.tie_word_embeddings {
                        m.lm_head = m.embed.clone();
                        m.cfg.tie_word_embeddings = false;
                    }
                    m.embed = new;
                }
                for &(l, lambda) in attn {
                    let b = &mut m.blocks[l];
                    b.o = RowMap::new(&b.o, r, lambda, *norm_preserving)?.linear(&b.o)?;
                }
                for &(l, lambda) in mlp {
                    let b = &mut m.blocks[l];
                    b.down = RowMap::new(&b.down, r, lambda, *norm_preserving)?.linear(&b.down)?;
                }
                let list = |ls: &[(usize, f64)]| -> String {
                    let partial = ls.iter().any(|&(_, w)| w != 1.0);
                    let items: Vec<String> = ls.iter().map(|&(l, w)| if partial { format!("{l}:{w:.2}") } else { l.to_string() }).collect();
                    format!("[{}]", items.join(", "))
                };
                let what = if attn == mlp {
                    format!("o_proj and down_proj of layers {}", list(attn))
                } else {
                    format!("o_proj of layers {} and down_proj of layers {}", list(attn), list(mlp))
                };
                Ok(format!(
                    "orthogonalised {}{what} against the direction{}",
                    if *embed { "the embedding (untied from lm_head if it was tied), " } else { "" },
                    if *norm_preserving { ", row norms kept" } else { "" }
                ))
            }
        }
    }

    fn twin(&self, source: &Model) -> Result<Hooks> {
        let mut h = Hooks::new();
        match &self.mode {
            Mode::Add { layer, v, coeff, .. } => {
                h.intervene(HookPoint::ResidPost(*layer), Op::Add((v * *coeff)?));
            }
            Mode::Ablate { r, attn, mlp, embed, norm_preserving } => {
                let op = |map: RowMap| -> Op {
                    if map.lambda == 1.0 && map.scales.is_none() {
                        return Op::ProjectOut(map.r);
                    }
                    Op::Func(std::sync::Arc::new(move |x: &Tensor| map.apply(x)))
                };
                if *embed {
                    h.intervene(HookPoint::Embed, Op::ProjectOut(r.clone()));
                }
                let n = source.blocks.len();
                for &(l, lambda) in attn.iter().filter(|p| p.0 < n) {
                    h.intervene(HookPoint::AttnOut(l), op(RowMap::new(&source.blocks[l].o, r, lambda, *norm_preserving)?));
                }
                for &(l, lambda) in mlp.iter().filter(|p| p.0 < n) {
                    h.intervene(HookPoint::MlpOut(l), op(RowMap::new(&source.blocks[l].down, r, lambda, *norm_preserving)?));
                }
            }
        }
        Ok(h)
    }

    fn side_files(&self) -> Result<Vec<(std::path::PathBuf, Vec<u8>)>> {
        let mut out = vec![];
        if let Mode::Add { layer, v, coeff, control_vector: Some(path) } = &self.mode {
            let dirs = [Direction {
                block: *layer,
                values: (v * *coeff)?.to_vec1::<f32>()?,
            }];
            out.push((path.clone(), control_vector::to_bytes(self.arch.name(), &dirs)?));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::{random_model, RandomSpec};

    fn model(arch: Arch) -> Model {
        for seed in 0.. {
            let spec = RandomSpec::from_seed(seed);
            if spec.arch == arch && spec.config().num_layers >= 2 {
                return random_model(spec.config(), seed).unwrap();
            }
        }
        unreachable!()
    }

    fn table(s: &str) -> toml::Table {
        s.parse().unwrap()
    }

    fn err(m: &Model, s: &str) -> String {
        let r = build(&table(s), &BuildCtx::new(m)).map(|_| ());
        match r {
            Ok(_) => panic!("{s} should fail"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn auto_reaching_the_pass_points_at_the_search() {
        let m = model(Arch::Llama);
        let dir = format!("[{}]", vec!["0.5"; m.cfg.hidden_size].join(", "));
        let e = match build(&table(&format!("mode = \"add\"\ndirection = {dir}\nlayer = 0\ncoeff = \"auto\"")), &BuildCtx::new(&m)) {
            Ok(_) => panic!("coeff = \"auto\" built without its search"),
            Err(e) => e.to_string(),
        };
        assert!(e.contains("compile driver") && e.contains("mechc::search"), "{e}");
    }

    #[test]
    fn bad_options_name_the_option() {
        let m = model(Arch::Llama);
        let d = m.cfg.hidden_size;
        let dir = format!("[{}]", vec!["0.5"; d].join(", "));
        assert!(err(&m, &format!("mode = \"scale\"\ndirection = {dir}")).contains("unknown `mode`"));
        assert!(err(&m, "mode = \"add\"\ndirection = [1.0]\nlayer = 0\ncoeff = 1").contains("has 1 values"));
        assert!(err(&m, &format!("mode = \"add\"\ndirection = {dir}\ncoeff = 1")).contains("`layer`"));
        assert!(err(&m, &format!("mode = \"add\"\ndirection = {dir}\nlayer = 0")).contains("`coeff`"));
        assert!(err(&m, &format!("mode = \"add\"\ndirection = {dir}\nlayer = 99\ncoeff = 1")).contains("`layer` = 99"));
        assert!(err(&m, &format!("mode = \"ablate\"\ndirection = {dir}\nlayer = 1")).contains("`layer` does not apply"));
        assert!(err(
            &m,
            &format!("mode = \"ablate\"\ndirection = {dir}\nlayers = [0]\nweights = [1, 2]")
        )
        .contains("`weights`"));
        assert!(err(&m, &format!("mode = \"ablate\"\ndirection = {dir}\nlayers = [0, 0]")).contains("twice"));
        assert!(err(&m, "mode = \"ablate\"\ndirection = \"/nonexistent/dir.safetensors\"").contains("no such file"));
        assert!(err(&m, &format!("mode = \"ablate\"\ndirection = [{}]", vec!["0"; d].join(", "))).contains("all zeros"));
        let e = err(
            &m,
            &format!("mode = \"add\"\ndirection = {dir}\nlayer = 0\ncoeff = 1\ncontrol_vector = \"x.gguf\""),
        );
        assert!(e.contains("block 0"), "{e}");
        let q = model(Arch::Qwen2);
        let qd = format!("[{}]", vec!["0.5"; q.cfg.hidden_size].join(", "));
        assert!(err(&q, &format!("mode = \"add\"\ndirection = {qd}\nlayer = 0\ncoeff = 1")).contains("Llama-only"));
        assert!(build(&table(&format!("mode = \"ablate\"\ndirection = {qd}")), &BuildCtx::new(&q)).is_ok());
    }

    #[test]
    fn add_turns_on_mlp_bias_with_zeros_elsewhere() {
        let mut m = model(Arch::Llama);
        m.cfg.mlp_bias = false;
        for b in m.blocks.iter_mut() {
            for p in [Proj::Gate, Proj::Up, Proj::Down] {
                b.proj_mut(p).b = None;
            }
        }
        let d = m.cfg.hidden_size;
        let dir = format!(
            "[{}]",
            (0..d).map(|i| format!("{}", i as f32 - 1.5)).collect::<Vec<_>>().join(", ")
        );
        let p = build(
            &table(&format!("mode = \"add\"\ndirection = {dir}\nlayer = 1\ncoeff = 2.0")),
            &BuildCtx::new(&m),
        )
        .unwrap();
        p.run(&mut m).unwrap();
        assert!(m.cfg.mlp_bias);
        let b1 = m.blocks[1].down.b.as_ref().unwrap();
        let n = b1
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((n - 2.0).abs() < 1e-5, "{n}");
        let z = m.blocks[0]
            .gate
            .b
            .as_ref()
            .unwrap()
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert_eq!(z, 0.0);
        crate::model::verifier::check(&m).unwrap();
    }

    #[test]
    fn the_kernel_peaks_falls_linearly_and_stops() {
        let k = Kernel { max_weight: 1.2, max_weight_position: 4.5, min_weight: 0.2, min_weight_distance: 2.0 };
        let w: Vec<f64> = (0..8).map(|l| k.weight(l)).collect();
        // distances 4.5, 3.5, 2.5, 1.5, 0.5, 0.5, 1.5, 2.5
        let expect = [0.0, 0.0, 0.0, 1.2 - 0.75, 1.2 - 0.25, 1.2 - 0.25, 1.2 - 0.75, 0.0];
        for (a, b) in w.iter().zip(expect) {
            assert!((a - b).abs() < 1e-12, "{w:?}");
        }
        assert_eq!(k.layers(8).iter().map(|p| p.0).collect::<Vec<_>>(), vec![3, 4, 5, 6]);
        let m = model(Arch::Llama);
        let dir = format!("[{}]", vec!["0.5"; m.cfg.hidden_size].join(", "));
        let kt = "{ max_weight = 1, max_weight_position = 0, min_weight = 0, min_weight_distance = 0 }";
        assert!(err(&m, &format!("mode = \"ablate\"\ndirection = {dir}\nkernel = {{ attn = {kt} }}")).contains("min_weight_distance"));
        let kt = "{ max_weight = 1, max_weight_position = 0, min_weight = 0, min_weight_distance = 1 }";
        assert!(err(&m, &format!("mode = \"ablate\"\ndirection = {dir}\nlayers = [0]\nkernel = {{ attn = {kt} }}")).contains("pick one"));
        assert!(err(&m, &format!("mode = \"add\"\ndirection = {dir}\nlayer = 0\ncoeff = 1\nkernel = {{ attn = {kt} }}")).contains("does not apply"));
    }

    #[test]
    fn norm_preserving_keeps_row_norms_of_the_written_matrices_only() {
        let mut m = model(Arch::Qwen2);
        let src = m.clone();
        let d = m.cfg.hidden_size;
        let dir = format!("[{}]", (0..d).map(|i| format!("{}", (i as f32 * 0.7).sin() + 0.1)).collect::<Vec<_>>().join(", "));
        let kt = "{ max_weight = 1.0, max_weight_position = 0.0, min_weight = 1.0, min_weight_distance = 100.0 }";
        let p = build(&table(&format!("mode = \"ablate\"\ndirection = {dir}\nnorm_preserving = true\nembed = false\nkernel = {{ attn = {kt} }}")), &BuildCtx::new(&m)).unwrap();
        p.run(&mut m).unwrap();
        let norms = |w: &Tensor| w.sqr().unwrap().sum(1).unwrap().sqrt().unwrap().to_vec1::<f32>().unwrap();
        for (b, s) in m.blocks.iter().zip(&src.blocks) {
            for (x, y) in norms(b.o.w()).iter().zip(norms(s.o.w())) {
                assert!((x - y).abs() <= 1e-4 * y.max(1.0), "{x} vs {y}");
            }
            // down_proj is not in the kernel: untouched.
            assert_eq!(b.down.w().to_vec2::<f32>().unwrap(), s.down.w().to_vec2::<f32>().unwrap());
            assert_ne!(b.o.w().to_vec2::<f32>().unwrap(), s.o.w().to_vec2::<f32>().unwrap());
        }
        assert_eq!(m.embed.to_vec2::<f32>().unwrap(), src.embed.to_vec2::<f32>().unwrap());
    }

    #[test]
    fn ablate_removes_the_direction_from_every_write_and_unties() {
        let mut m = model(Arch::Llama);
        m.cfg.tie_word_embeddings = true;
        m.lm_head = m.embed.clone();
        let head = m.lm_head.clone();
        let d = m.cfg.hidden_size;
        let dir = format!(
            "[{}]",
            (0..d).map(|i| format!("{}", (i as f32).cos())).collect::<Vec<_>>().join(", ")
        );
        let p = build(&table(&format!("mode = \"ablate\"\ndirection = {dir}")), &BuildCtx::new(&m)).unwrap();
        p.run(&mut m).unwrap();
        assert!(!m.cfg.tie_word_embeddings);
        assert_eq!(m.lm_head.to_vec2::<f32>().unwrap(), head.to_vec2::<f32>().unwrap());
        let r = unit(
            &direction(
                &toml::Value::Array((0..d).map(|i| toml::Value::Float((i as f64).cos())).collect()),
                d,
                &BuildCtx::new(&m),
            )
            .unwrap(),
        )
        .unwrap();
        let along = |w: &Tensor| {
            r.reshape((1, d))
                .unwrap()
                .matmul(w)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(along(&m.embed.t().unwrap().contiguous().unwrap()) < 1e-5);
        for b in &m.blocks {
            assert!(along(b.o.w()) < 1e-5 && along(b.down.w()) < 1e-5);
        }
    }
}
