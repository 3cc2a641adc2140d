//! bake-steering: commit a residual-stream direction into the weights, as an additive shift
//! (mode `add`) or as directional ablation (mode `ablate`). The help text is [`DOC`].

use candle_core::{DType, Device, Tensor};
use rand::{seq::SliceRandom, Rng, SeedableRng};
use serde::Deserialize;

use super::{options, BuildCtx, Pass, PassInfo};
use crate::data::SetSpec;
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
    embed = true          orthogonalise the embedding too (default true)

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

Runtime twin: add: add c·v at blocks.{layer}.hook_resid_post at every position. ablate: project
r out (x ← x − λ (x·r) r) at hook_embed and at each chosen block's hook_attn_out and
hook_mlp_out. Both exact up to float rounding.

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
    embed: Option<bool>,
}

enum Mode {
    /// `v` (unit if normalize) times the coefficient.
    Add {
        layer: usize,
        v: Tensor,
        coeff: f64,
        control_vector: Option<std::path::PathBuf>,
    },
    /// Unit `r`; (block, λ) pairs sorted by block.
    Ablate {
        r: Tensor,
        layers: Vec<(usize, f64)>,
        embed: bool,
    },
}

struct BakeSteering {
    mode: Mode,
    arch: Arch,
}

fn invalid(m: impl Into<String>) -> Error {
    Error::invalid(m)
}

/// The direction from a file spec or an inline array, as f32 [d_model].
pub fn direction(v: &toml::Value, d: usize, cx: &BuildCtx) -> Result<Tensor> {
    match v {
        toml::Value::String(s) => {
            let mut spec = SetSpec::parse(s);
            spec.path = cx.path(&spec.path.to_string_lossy());
            if spec.field.is_none() && !spec.path.exists() {
                // `SetSpec::parse` only splits FILE:TENSOR when FILE:TENSOR is not itself a file.
                return Err(invalid(format!("`direction`: no such file {}", spec.path.display())));
            }
            crate::verify::steer::load_direction(&spec, d).map_err(|e| invalid(format!("`direction`: {e}")))
        }
        toml::Value::Array(a) => {
            let xs: Vec<f32> = a
                .iter()
                .map(|x| match x {
                    toml::Value::Float(f) => Ok(*f as f32),
                    toml::Value::Integer(i) => Ok(*i as f32),
                    other => Err(invalid(format!("`direction`: expected numbers, found {other}"))),
                })
                .collect::<Result<_>>()?;
            if xs.len() != d {
                return Err(invalid(format!(
                    "`direction` has {} values; the model needs {d} (d_model)",
                    xs.len()
                )));
            }
            if xs.iter().any(|x| !x.is_finite()) {
                return Err(invalid("`direction` has non-finite values"));
            }
            if xs.iter().all(|&x| x == 0.0) {
                return Err(invalid("`direction` is all zeros"));
            }
            Ok(Tensor::from_vec(xs, d, &Device::Cpu)?)
        }
        other => Err(invalid(format!(
            "`direction` must be a file path or an array of numbers, found {other}"
        ))),
    }
}

pub fn unit(v: &Tensor) -> Result<Tensor> {
    let n = v.sqr()?.sum_all()?.sqrt()?.to_scalar::<f32>()?;
    if !(n > 0.0 && n.is_finite()) {
        return Err(invalid("`direction` has no usable length"));
    }
    Ok((v / n as f64)?)
}

/// The vector mode add adds per unit of `coeff`: the direction, unit length if `normalize`
/// (default true). For searches over `coeff` (the `projection` metric projects on it).
pub fn steering_vector(options: &toml::Table, cx: &BuildCtx) -> Result<Tensor> {
    let dir = options.get("direction").ok_or_else(|| invalid("missing field `direction`"))?;
    let normalize = match options.get("normalize") {
        None => true,
        Some(toml::Value::Boolean(b)) => *b,
        Some(other) => return Err(invalid(format!("`normalize` must be true or false, found {other}"))),
    };
    vector(dir, normalize, cx)
}

fn vector(dir: &toml::Value, normalize: bool, cx: &BuildCtx) -> Result<Tensor> {
    let v = direction(dir, cx.source.cfg.hidden_size, cx)?;
    if normalize { unit(&v) } else { Ok(v) }
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
            Mode::Ablate {
                r,
                layers,
                embed: o.embed.unwrap_or(true),
            }
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
        if r.gen_bool(0.5) {
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
    }
    Some(t)
}

/// (I − λ r rᵀ) applied to what a linear layer writes: every column of W [d_model, d_in] and
/// the bias, with the runtime twin's own `project_out`.
fn ortho_linear(lin: &Linear, r: &Tensor, lambda: f64) -> Result<Linear> {
    let w = project_out(&lin.w().t()?, r, lambda)?.t()?.contiguous()?;
    let b = lin.b.as_ref().map(|b| project_out(&b.unsqueeze(0)?, r, lambda)?.squeeze(0)).transpose()?;
    Linear::new(&w, b)
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
            Mode::Ablate { r, layers, embed } => {
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
                for &(l, lambda) in layers {
                    let b = &mut m.blocks[l];
                    b.o = ortho_linear(&b.o, r, lambda)?;
                    b.down = ortho_linear(&b.down, r, lambda)?;
                }
                let list = layers.iter().map(|(l, _)| l.to_string()).collect::<Vec<_>>().join(", ");
                let partial = if layers.iter().any(|&(_, w)| w != 1.0) {
                    " with per-layer weights"
                } else {
                    ""
                };
                Ok(format!(
                    "orthogonalised {}o_proj and down_proj of layers [{list}]{partial} against the direction",
                    if *embed {
                        "the embedding (untied from lm_head if it was tied), "
                    } else {
                        ""
                    }
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
            Mode::Ablate { r, layers, embed } => {
                let op = |lambda: f64| -> Op {
                    if lambda == 1.0 {
                        return Op::ProjectOut(r.clone());
                    }
                    let r = r.clone();
                    Op::Func(std::sync::Arc::new(move |x: &Tensor| {
                        project_out(x, &r, lambda)
                    }))
                };
                if *embed {
                    h.intervene(HookPoint::Embed, op(1.0));
                }
                for &(l, lambda) in layers {
                    if l < source.blocks.len() {
                        h.intervene(HookPoint::AttnOut(l), op(lambda));
                        h.intervene(HookPoint::MlpOut(l), op(lambda));
                    }
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
