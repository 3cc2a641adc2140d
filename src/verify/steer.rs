//! Additive steering: add c·v to the residual stream after block L (`blocks.L.hook_resid_post`)
//! at every position, for a sweep of coefficients c, and measure the behaviour and its cost.
//!
//! Adding c·v after block L at every position is exactly what baking c·v into
//! `layers[L].mlp.down_proj.bias` does, so these numbers are those of the baked checkpoint
//! (up to float summation order).
//!
//! Per coefficient:
//! - `projection`: mean over prompts of the last token's resid_post at the measure layer
//!   (default: the last layer) projected on the unit direction v̂;
//! - `target`: mean log-prob (and prob) of the first token of each target string at the
//!   next-token position;
//! - the cost: KL(unsteered ‖ steered) of the next-token distributions, mean and max over prompts.
//!
//! [`mean_diff_direction`] is the last-token resid_post case of `locate::direction` (`mechc
//! locate direction`), which finds and scores directions for this sweep.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::data::SetSpec;
use crate::error::{Error, Result, WithPath};
use crate::model::Model;
use crate::runtime::{HookPoint, Hooks, Op};
use crate::tokenizer::Tok;
use crate::runtime::score::kl;

/// A steering direction from a safetensors file: `FILE[:TENSOR]`, a 1-D float tensor of
/// `d_model` values (returned as f32). Without a tensor name the file must hold one tensor.
pub fn load_direction(spec: &SetSpec, d_model: usize) -> Result<Tensor> {
    let path = &spec.path;
    let bytes = std::fs::read(path).with_path(path)?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).with_path(path)?;
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let list = || names.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(", ");
    let (name, t) = match &spec.field {
        Some(n) => match tensors.get(n) {
            Some(t) => (n.clone(), t),
            None => return Err(Error::bad_file(path, format!("no tensor `{n}` (tensors: {})", list()))),
        },
        None => match names.as_slice() {
            [only] => ((*only).clone(), &tensors[*only]),
            [] => return Err(Error::bad_file(path, "holds no tensors")),
            _ => return Err(Error::bad_file(path, format!("holds several tensors: name one as FILE:TENSOR ({})", list()))),
        },
    };
    if !t.dtype().is_float() {
        return Err(Error::bad_file(path, format!("tensor `{name}` is {:?}, not a float tensor", t.dtype())));
    }
    if t.dims() != [d_model] {
        return Err(Error::bad_file(path, format!("tensor `{name}` has shape {:?}; the model needs [{d_model}] (d_model)", t.dims())));
    }
    let t = t.to_dtype(DType::F32)?;
    let v = t.to_vec1::<f32>()?;
    if v.iter().any(|x| !x.is_finite()) {
        return Err(Error::bad_file(path, format!("tensor `{name}` has non-finite values")));
    }
    if v.iter().all(|&x| x == 0.0) {
        return Err(Error::bad_file(path, format!("tensor `{name}` is all zeros")));
    }
    Ok(t)
}

/// Write a direction as a one-tensor safetensors file (for tests and tools).
pub fn save_direction(path: &Path, name: &str, v: &Tensor) -> Result<()> {
    candle_core::safetensors::save(&std::collections::HashMap::from([(name.to_string(), v.clone())]), path).with_path(path)
}

fn check_layer(model: &Model, layer: usize, what: &str) -> Result<()> {
    let n = model.cfg.num_layers;
    if layer >= n {
        return Err(Error::invalid(format!("{what} {layer} is out of range: the model has {n} layers (0..{})", n - 1)));
    }
    Ok(())
}

/// Difference of means of the last token's `blocks.{layer}.hook_resid_post` between two prompt
/// sets (positive − negative), unnormalised. `chat` wraps each prompt in the chat template.
/// The fixed-position case of [`crate::locate::direction`] (which also does other sites,
/// positions, PCA and held-out scoring).
pub fn mean_diff_direction(model: &Model, tok: &Tok, pos: &[String], neg: &[String], layer: usize, chat: bool) -> Result<Tensor> {
    use crate::locate::direction::{activations, direction, prompt_examples, DirMethod, Positions, Site};
    check_layer(model, layer, "layer")?;
    if pos.is_empty() || neg.is_empty() {
        return Err(Error::invalid("mean_diff_direction: both prompt sets must be non-empty"));
    }
    let acts = |texts: &[String]| -> Result<Vec<Vec<f32>>> {
        let ex = prompt_examples(tok, texts, chat, Positions::Last)?;
        Ok(activations(model, &ex, Site::ResidPost, &[layer], 16, |_, _| {})?.remove(0))
    };
    let v = direction(DirMethod::MeanDiff, &acts(pos)?, &acts(neg)?)?;
    Ok(Tensor::from_vec(v, model.cfg.hidden_size, &Device::Cpu)?)
}

/// The behaviour score a sweep reports as `score`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SteerMetric {
    /// Mean last-token projection of resid_post (measure layer) on the unit direction.
    Projection,
    /// Mean log-prob of the targets' first tokens at the next-token position.
    Target,
}

/// A target string and the token that is scored for it (its first token).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Target {
    pub text: String,
    pub token_id: u32,
    pub token: String,
}

/// The first token of each target string (encoded without special tokens).
pub fn target_tokens(tok: &Tok, targets: &[String]) -> Result<Vec<Target>> {
    targets
        .iter()
        .map(|t| {
            let ids = tok.encode(t, false)?;
            let &id = ids.first().ok_or_else(|| Error::invalid(format!("target {t:?} encodes to no tokens")))?;
            Ok(Target { text: t.clone(), token_id: id, token: tok.decode(&[id], false)? })
        })
        .collect()
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TargetScore {
    pub text: String,
    pub token_id: u32,
    /// Mean over prompts of the token's log-prob.
    pub logprob: f64,
    /// Mean over prompts of the token's prob.
    pub prob: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SteerPoint {
    pub coeff: f64,
    /// The chosen metric: `projection`, or the mean of the targets' mean log-probs.
    pub score: f64,
    pub projection: f64,
    pub targets: Vec<TargetScore>,
    /// KL(unsteered ‖ steered) of the next-token distribution (nats), mean and max over prompts.
    pub kl_mean: f64,
    pub kl_max: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SteerReport {
    pub layer: usize,
    pub hook: String,
    pub measure_layer: usize,
    pub metric: SteerMetric,
    /// ‖v‖ of the direction as given (before --normalize).
    pub direction_norm: f64,
    /// Whether v was scaled to unit norm before multiplying by c.
    pub normalized: bool,
    pub n_prompts: usize,
    pub points: Vec<SteerPoint>,
}

/// Options of a sweep.
#[derive(Debug, Clone)]
pub struct SteerOpts {
    pub layer: usize,
    /// Layer whose resid_post is projected (default: the last).
    pub measure_layer: Option<usize>,
    pub coeffs: Vec<f64>,
    pub metric: SteerMetric,
    pub targets: Vec<Target>,
    /// Scale v to unit norm first.
    pub normalize: bool,
    pub batch: usize,
}

/// Sweep the coefficients. `progress(done, total)` counts forward passes over the prompt set.
pub fn steer_sweep(
    model: &Model,
    prompts: &[Vec<u32>],
    direction: &Tensor,
    o: &SteerOpts,
    mut progress: impl FnMut(usize, usize),
) -> Result<SteerReport> {
    check_layer(model, o.layer, "--layer")?;
    let measure = o.measure_layer.unwrap_or(model.cfg.num_layers - 1);
    check_layer(model, measure, "--measure-layer")?;
    if prompts.is_empty() {
        return Err(Error::invalid("no prompts"));
    }
    if o.coeffs.is_empty() || o.coeffs.iter().any(|c| !c.is_finite()) {
        return Err(Error::invalid("coefficients must be given and finite"));
    }
    if o.metric == SteerMetric::Target && o.targets.is_empty() {
        return Err(Error::invalid("--metric target needs at least one --target"));
    }
    let d = model.cfg.hidden_size;
    let v = direction.to_dtype(DType::F32)?.flatten_all()?;
    if v.dims() != [d] {
        return Err(Error::invalid(format!("the direction has {} values; the model's d_model is {d}", v.elem_count())));
    }
    let vv = v.to_vec1::<f32>()?;
    let norm = vv.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    if norm == 0.0 || !norm.is_finite() {
        return Err(Error::invalid("the direction has zero or non-finite norm"));
    }
    let unit: Vec<f64> = vv.iter().map(|&x| x as f64 / norm).collect();
    let v = if o.normalize { (v / norm)? } else { v };
    let point = HookPoint::ResidPost(measure);
    let n = prompts.len();
    let total = o.coeffs.len() + 1;
    progress(0, total);

    // The unsteered pass: reference distributions for the KL.
    let mut base: Vec<Vec<f32>> = vec![vec![]; n];
    crate::runtime::score::last_token(model, prompts, o.batch, &Hooks::new(), None, |i, lp, _| {
        base[i] = lp.to_vec();
        Ok(())
    })?;
    progress(1, total);

    let mut points = vec![];
    for (k, &c) in o.coeffs.iter().enumerate() {
        let mut hooks = Hooks::new();
        hooks.intervene(HookPoint::ResidPost(o.layer), Op::Add((&v * c)?));
        let (mut proj, mut kls) = (0f64, vec![0f64; n]);
        let mut tl = vec![(0f64, 0f64); o.targets.len()];
        crate::runtime::score::last_token(model, prompts, o.batch, &hooks, Some(point), |i, lp, a| {
            let a = a.expect("captured");
            proj += a.iter().zip(&unit).map(|(&x, &u)| x as f64 * u).sum::<f64>();
            kls[i] = kl(&base[i], lp);
            for (t, acc) in o.targets.iter().zip(tl.iter_mut()) {
                let l = lp[t.token_id as usize] as f64;
                acc.0 += l;
                acc.1 += l.exp();
            }
            Ok(())
        })?;
        let targets: Vec<TargetScore> = o
            .targets
            .iter()
            .zip(&tl)
            .map(|(t, &(l, p))| TargetScore { text: t.text.clone(), token_id: t.token_id, logprob: l / n as f64, prob: p / n as f64 })
            .collect();
        let projection = proj / n as f64;
        let score = match o.metric {
            SteerMetric::Projection => projection,
            SteerMetric::Target => targets.iter().map(|t| t.logprob).sum::<f64>() / targets.len() as f64,
        };
        points.push(SteerPoint {
            coeff: c,
            score,
            projection,
            targets,
            kl_mean: kls.iter().sum::<f64>() / n as f64,
            kl_max: kls.iter().cloned().fold(0.0, f64::max),
        });
        progress(k + 2, total);
    }
    Ok(SteerReport {
        layer: o.layer,
        hook: HookPoint::ResidPost(o.layer).to_string(),
        measure_layer: measure,
        metric: o.metric,
        direction_norm: norm,
        normalized: o.normalize,
        n_prompts: n,
        points,
    })
}

/// `v` scaled to unit length, in f64 (the axis [`projection_hooked`] projects on).
pub fn unit_f64(v: &Tensor) -> Result<Vec<f64>> {
    let vv = v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    let n = vv.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
    if n == 0.0 || !n.is_finite() {
        return Err(Error::invalid("the direction has zero or non-finite norm"));
    }
    Ok(vv.iter().map(|&x| x as f64 / n).collect())
}

/// Mean over prompts of the last token's resid_post at the last layer projected on `unit`,
/// with `hooks` applied (the `projection` metric of a steering sweep, for any intervention).
pub fn projection_hooked(model: &Model, hooks: &Hooks, unit: &[f64], prompts: &[Vec<u32>], batch: usize) -> Result<f64> {
    let measure = HookPoint::ResidPost(model.cfg.num_layers - 1);
    let mut s = 0f64;
    crate::runtime::score::last_token(model, prompts, batch, hooks, Some(measure), |_, _, a| {
        s += a.expect("captured").iter().zip(unit).map(|(&x, &u)| x as f64 * u).sum::<f64>();
        Ok(())
    })?;
    Ok(s / prompts.len() as f64)
}

/// Mean over prompts of the mean log-prob of the `targets` token ids at the next-token position,
/// with `hooks` applied (the `target` metric of a steering sweep, for any intervention).
pub fn target_logprob_hooked(model: &Model, hooks: &Hooks, prompts: &[Vec<u32>], targets: &[u32], batch: usize) -> Result<f64> {
    let mut s = 0f64;
    crate::runtime::score::last_token(model, prompts, batch, hooks, None, |_, lp, _| {
        s += targets.iter().map(|&t| lp[t as usize] as f64).sum::<f64>() / targets.len() as f64;
        Ok(())
    })?;
    Ok(s / prompts.len() as f64)
}

/// A human-readable table of a sweep.
pub fn table(r: &SteerReport) -> String {
    let mut s = format!(
        "additive steering at {} over {} prompts (‖v‖ = {:.4}{}); projection measured at blocks.{}.hook_resid_post\n",
        r.hook,
        r.n_prompts,
        r.direction_norm,
        if r.normalized { ", normalised to 1" } else { "" },
        r.measure_layer
    );
    s += &format!("{:>9} {:>12} {:>12}", "coeff", "projection", "score");
    let targets = r.points.first().map(|p| p.targets.clone()).unwrap_or_default();
    for t in &targets {
        s += &format!(" {:>20}", format!("p({:?})", t.text));
    }
    s += &format!(" {:>10} {:>10}\n", "KL mean", "KL max");
    for p in &r.points {
        s += &format!("{:>9.3} {:>12.4} {:>12.4}", p.coeff, p.projection, p.score);
        for t in &p.targets {
            s += &format!(" {:>20}", format!("{:.3e} ({:+.3})", t.prob, t.logprob));
        }
        s += &format!(" {:>10.4} {:>10.4}\n", p.kl_mean, p.kl_max);
    }
    s += &format!("score = {}\n", match r.metric {
        SteerMetric::Projection => "projection",
        SteerMetric::Target => "mean log-prob of the targets' first tokens (prob and log-prob per target)",
    });
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::decoder::Fwd;
    use candle_core::{IndexOp, D};
    use crate::model::random::{random_model, RandomSpec};
    use crate::runtime::Batch;

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar::<f32>().unwrap()
    }

    /// Adding c·v at resid_post(L) is the same forward as replacing resid_post(L) by the
    /// captured activation plus c·v (bit for bit), and as adding c·v to down_proj's bias.
    #[test]
    fn add_at_resid_post_equals_patched_and_baked_bias() {
        for seed in [3u64, 11, 25] {
            let model = random_model(RandomSpec::from_seed(seed).config(), seed).unwrap();
            let d = model.cfg.hidden_size;
            let l = model.cfg.num_layers - 1;
            let ids = vec![vec![1u32, 5, 7, 3, 9, 2]];
            let batch = Batch::right_padded(&ids, 0);
            let c = 2.5f64;
            let v = Tensor::from_vec((0..d).map(|i| ((i * 7 % 5) as f32 - 2.0) * 0.3).collect::<Vec<_>>(), d, &Device::Cpu).unwrap();
            let cv = (&v * c).unwrap();

            let mut cap = Hooks::new();
            cap.capture(HookPoint::ResidPost(l));
            let clean = model.forward(&batch, None, &mut cap, Fwd::default()).unwrap();
            let resid = cap.captured[&HookPoint::ResidPost(l)].clone();

            let mut add = Hooks::new();
            add.intervene(HookPoint::ResidPost(l), Op::Add(cv.clone()));
            let steered = model.forward(&batch, None, &mut add, Fwd::default()).unwrap();

            let mut rep = Hooks::new();
            rep.intervene(HookPoint::ResidPost(l), Op::Replace(resid.broadcast_add(&cv).unwrap()));
            let patched = model.forward(&batch, None, &mut rep, Fwd::default()).unwrap();
            assert_eq!(max_abs(&steered, &patched), 0.0, "seed {seed}");
            assert!(max_abs(&steered, &clean) > 1e-3, "seed {seed}: the steering changed nothing");

            let mut baked = model.clone();
            let down = &mut baked.blocks[l].down;
            down.b = Some(match &down.b {
                Some(b) => (b + &cv).unwrap(),
                None => cv.clone(),
            });
            let from_bias = baked.forward(&batch, None, &mut Hooks::new(), Fwd::default()).unwrap();
            let diff = max_abs(&steered, &from_bias);
            assert!(diff < 1e-4, "seed {seed}: baked bias differs by {diff}");
        }
    }

    #[test]
    fn zero_coefficient_is_the_unsteered_model() {
        let model = random_model(RandomSpec::from_seed(5).config(), 5).unwrap();
        let d = model.cfg.hidden_size;
        let v = Tensor::from_vec((0..d).map(|i| i as f32 - 1.5).collect::<Vec<_>>(), d, &Device::Cpu).unwrap();
        let prompts = vec![vec![1u32, 2, 3], vec![4, 5], vec![6, 7, 8, 9]];
        let targets = vec![Target { text: "x".into(), token_id: 3, token: "x".into() }];
        let o = SteerOpts {
            layer: 0,
            measure_layer: None,
            coeffs: vec![0.0, 3.0],
            metric: SteerMetric::Projection,
            targets,
            normalize: false,
            batch: 2,
        };
        let r = steer_sweep(&model, &prompts, &v, &o, |_, _| {}).unwrap();
        assert_eq!((r.points[0].kl_mean, r.points[0].kl_max), (0.0, 0.0));
        assert!(r.points[1].kl_mean > 0.0);
        // The unsteered projection and target log-prob, computed directly.
        let unit: Vec<f64> = {
            let x = v.to_vec1::<f32>().unwrap();
            let n = x.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
            x.iter().map(|&a| a as f64 / n).collect()
        };
        let (mut proj, mut lp) = (0f64, 0f64);
        for p in &prompts {
            let mut h = Hooks::new();
            let last = HookPoint::ResidPost(model.cfg.num_layers - 1);
            h.capture(last);
            let logits = model.forward(&Batch::single(p), None, &mut h, Fwd::default()).unwrap();
            let a = h.captured[&last].i((0, p.len() - 1)).unwrap().to_vec1::<f32>().unwrap();
            proj += a.iter().zip(&unit).map(|(&x, &u)| x as f64 * u).sum::<f64>();
            let row = candle_nn::ops::log_softmax(&logits.i((0, p.len() - 1)).unwrap(), D::Minus1).unwrap();
            lp += row.to_vec1::<f32>().unwrap()[3] as f64;
        }
        let n = prompts.len() as f64;
        assert!((r.points[0].projection - proj / n).abs() < 1e-4, "{} vs {}", r.points[0].projection, proj / n);
        assert!((r.points[0].targets[0].logprob - lp / n).abs() < 1e-4);
    }

    #[test]
    fn direction_file_errors_name_the_problem() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("dir.safetensors");
        let t = Tensor::ones(8, DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&std::collections::HashMap::from([("a".to_string(), t.clone()), ("b".to_string(), t)]), &p)
            .unwrap();
        let spec = |s: &str| SetSpec::parse(s);
        let ps = p.display().to_string();
        let e = load_direction(&spec(&ps), 8).unwrap_err().to_string();
        assert!(e.contains("dir.safetensors") && e.contains("a, b"), "{e}");
        let e = load_direction(&spec(&format!("{ps}:zz")), 8).unwrap_err().to_string();
        assert!(e.contains("`zz`") && e.contains("a, b"), "{e}");
        let e = load_direction(&spec(&format!("{ps}:a")), 9).unwrap_err().to_string();
        assert!(e.contains("[8]") && e.contains("[9]"), "{e}");
        assert_eq!(load_direction(&spec(&format!("{ps}:b")), 8).unwrap().dims(), [8]);
    }
}
