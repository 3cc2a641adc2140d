//! Hook sites (named as TransformerLens names them) and the interventions applied at them.
//!
//! Every activation the decoder produces passes through [`Hooks::site`], which applies the
//! registered interventions in order and then captures the result if asked. Activations carry
//! the batch axis first: `[batch, pos, ...]`.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use globset::{Glob, GlobSet, GlobSetBuilder};

use crate::error::{Error, Result};

/// A hook site. Shapes are given without the leading batch axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HookPoint {
    /// `hook_embed` [pos, d_model]
    Embed,
    /// `blocks.{l}.hook_resid_pre` [pos, d_model]
    ResidPre(usize),
    /// `blocks.{l}.attn.hook_z` [pos, head, d_head]: each head's output before `o_proj`.
    AttnZ(usize),
    /// `blocks.{l}.hook_attn_out` [pos, d_model]
    AttnOut(usize),
    /// `blocks.{l}.hook_resid_mid` [pos, d_model]
    ResidMid(usize),
    /// `blocks.{l}.mlp.hook_post` [pos, d_ff]: the input of `down_proj`.
    MlpPost(usize),
    /// `blocks.{l}.hook_mlp_out` [pos, d_model]
    MlpOut(usize),
    /// `blocks.{l}.hook_resid_post` [pos, d_model]
    ResidPost(usize),
    /// `ln_final.hook_normalized` [pos, d_model]
    LnFinal,
    /// `logits` [pos, vocab]
    Logits,
}

impl HookPoint {
    pub fn layer(&self) -> Option<usize> {
        match *self {
            HookPoint::ResidPre(l)
            | HookPoint::AttnZ(l)
            | HookPoint::AttnOut(l)
            | HookPoint::ResidMid(l)
            | HookPoint::MlpPost(l)
            | HookPoint::MlpOut(l)
            | HookPoint::ResidPost(l) => Some(l),
            _ => None,
        }
    }

    /// Every hook site of a model with `n_layers` blocks, in forward order.
    pub fn all(n_layers: usize) -> Vec<HookPoint> {
        let mut v = vec![HookPoint::Embed];
        for l in 0..n_layers {
            v.extend([
                HookPoint::ResidPre(l),
                HookPoint::AttnZ(l),
                HookPoint::AttnOut(l),
                HookPoint::ResidMid(l),
                HookPoint::MlpPost(l),
                HookPoint::MlpOut(l),
                HookPoint::ResidPost(l),
            ]);
        }
        v.extend([HookPoint::LnFinal, HookPoint::Logits]);
        v
    }

    /// Parse a TransformerLens-style name such as `blocks.3.attn.hook_z`.
    pub fn parse(s: &str) -> Result<HookPoint> {
        let bad = || Error::invalid(format!("unknown hook `{s}` (e.g. hook_embed, blocks.0.hook_resid_pre, blocks.0.attn.hook_z, blocks.0.mlp.hook_post, ln_final.hook_normalized, logits)"));
        match s {
            "hook_embed" => return Ok(HookPoint::Embed),
            "ln_final.hook_normalized" => return Ok(HookPoint::LnFinal),
            "logits" => return Ok(HookPoint::Logits),
            _ => {}
        }
        let rest = s.strip_prefix("blocks.").ok_or_else(bad)?;
        let (l, site) = rest.split_once('.').ok_or_else(bad)?;
        let l: usize = l.parse().map_err(|_| bad())?;
        Ok(match site {
            "hook_resid_pre" => HookPoint::ResidPre(l),
            "attn.hook_z" => HookPoint::AttnZ(l),
            "hook_attn_out" => HookPoint::AttnOut(l),
            "hook_resid_mid" => HookPoint::ResidMid(l),
            "mlp.hook_post" => HookPoint::MlpPost(l),
            "hook_mlp_out" => HookPoint::MlpOut(l),
            "hook_resid_post" => HookPoint::ResidPost(l),
            _ => return Err(bad()),
        })
    }
}

impl fmt::Display for HookPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HookPoint::Embed => write!(f, "hook_embed"),
            HookPoint::ResidPre(l) => write!(f, "blocks.{l}.hook_resid_pre"),
            HookPoint::AttnZ(l) => write!(f, "blocks.{l}.attn.hook_z"),
            HookPoint::AttnOut(l) => write!(f, "blocks.{l}.hook_attn_out"),
            HookPoint::ResidMid(l) => write!(f, "blocks.{l}.hook_resid_mid"),
            HookPoint::MlpPost(l) => write!(f, "blocks.{l}.mlp.hook_post"),
            HookPoint::MlpOut(l) => write!(f, "blocks.{l}.hook_mlp_out"),
            HookPoint::ResidPost(l) => write!(f, "blocks.{l}.hook_resid_post"),
            HookPoint::LnFinal => write!(f, "ln_final.hook_normalized"),
            HookPoint::Logits => write!(f, "logits"),
        }
    }
}

/// A function applied to an activation (for interventions the fixed kinds do not cover, e.g.
/// adding a trainable variable during an optimisation).
pub type HookFn = Arc<dyn Fn(&Tensor) -> candle_core::Result<Tensor> + Send + Sync>;

/// What to do to an activation.
#[derive(Clone)]
pub enum Op {
    /// Replace by this tensor (same shape as the activation, batch axis included): patching.
    Replace(Tensor),
    /// Add this tensor (broadcast against the activation): steering.
    Add(Tensor),
    /// Multiply the unit axis by these factors: per head at `attn.hook_z`, per neuron at
    /// `mlp.hook_post`, per feature elsewhere. Zero ablates.
    Scale(Vec<f32>),
    /// Remove the component along this direction: x ← x − (x·r̂) r̂ (r is normalised here).
    ProjectOut(Tensor),
    /// Anything else.
    Func(HookFn),
}

impl fmt::Debug for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Replace(t) => write!(f, "Replace({:?})", t.shape()),
            Op::Add(t) => write!(f, "Add({:?})", t.shape()),
            Op::Scale(v) => write!(f, "Scale({} factors)", v.len()),
            Op::ProjectOut(t) => write!(f, "ProjectOut({:?})", t.shape()),
            Op::Func(_) => write!(f, "Func"),
        }
    }
}

/// x ← x − λ (x·r̂) r̂ along the last axis, r̂ = r/|r|, computed in f64 and rounded once.
/// Directional ablation removes a component that may be most of x; in f32 the leftover would be
/// ~1e-7·|x| rather than ~1e-7 of the result. The bake-steering pass rewrites its weights with
/// this same function, so the weights and the runtime twin round alike.
pub fn project_out(x: &Tensor, r: &Tensor, lambda: f64) -> candle_core::Result<Tensor> {
    let r = r.to_dtype(DType::F64)?.flatten_all()?;
    let r = r.broadcast_div(&r.sqr()?.sum_all()?.sqrt()?)?;
    let x64 = x.to_dtype(DType::F64)?;
    let proj = x64.broadcast_matmul(&r.unsqueeze(1)?)?; // [..., 1]
    (x64 - (proj.broadcast_mul(&r)? * lambda)?)?.to_dtype(x.dtype())
}

/// An intervention: an op at a site, optionally restricted to some positions.
#[derive(Debug, Clone)]
pub struct Intervention {
    pub point: HookPoint,
    pub op: Op,
    /// Positions (second axis) the op applies to; `None` = all.
    pub positions: Option<Vec<usize>>,
}

/// Interventions, captures and skipped blocks for one or more forward passes.
#[derive(Default, Clone)]
pub struct Hooks {
    interventions: Vec<Intervention>,
    capture_all: bool,
    capture_points: BTreeSet<HookPoint>,
    capture_globs: Option<GlobSet>,
    skip: BTreeSet<usize>,
    /// Captured activations by site (after the interventions at that site). A later forward
    /// (e.g. the next decode step) overwrites them.
    pub captured: BTreeMap<HookPoint, Tensor>,
}

impl Hooks {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn intervene(&mut self, point: HookPoint, op: Op) -> &mut Self {
        self.interventions.push(Intervention { point, op, positions: None });
        self
    }

    pub fn intervene_at(&mut self, point: HookPoint, op: Op, positions: Vec<usize>) -> &mut Self {
        self.interventions.push(Intervention { point, op, positions: Some(positions) });
        self
    }

    pub fn capture(&mut self, point: HookPoint) -> &mut Self {
        self.capture_points.insert(point);
        self
    }

    pub fn capture_all(&mut self) -> &mut Self {
        self.capture_all = true;
        self
    }

    /// Capture every site whose name matches one of these glob patterns (e.g. `blocks.*.hook_resid_post`).
    pub fn capture_matching(&mut self, patterns: &[String]) -> Result<&mut Self> {
        let mut b = GlobSetBuilder::new();
        for p in patterns {
            // `*` should not cross the dots that separate a hook name's parts... except that users
            // write `blocks.*.attn.*`; globset's default `*` matches any characters, which is what
            // they expect there.
            b.add(Glob::new(p).map_err(|e| Error::invalid(format!("bad hook pattern `{p}`: {e}")))?);
        }
        self.capture_globs = Some(b.build().map_err(|e| Error::invalid(e.to_string()))?);
        Ok(self)
    }

    /// Skip block `l`: resid_post = resid_pre (the block's inner hooks do not run).
    pub fn skip_block(&mut self, l: usize) -> &mut Self {
        self.skip.insert(l);
        self
    }

    pub fn skips(&self, l: usize) -> bool {
        self.skip.contains(&l)
    }

    /// Project a direction out of every write into the residual stream: the embedding and every
    /// attention and MLP output. The runtime twin of directional ablation baked into weights.
    pub fn project_out_everywhere(&mut self, dir: &Tensor, n_layers: usize) -> &mut Self {
        self.intervene(HookPoint::Embed, Op::ProjectOut(dir.clone()));
        for l in 0..n_layers {
            self.intervene(HookPoint::AttnOut(l), Op::ProjectOut(dir.clone()));
            self.intervene(HookPoint::MlpOut(l), Op::ProjectOut(dir.clone()));
        }
        self
    }

    fn wants_capture(&self, p: HookPoint) -> bool {
        self.capture_all
            || self.capture_points.contains(&p)
            || self.capture_globs.as_ref().is_some_and(|g| g.is_match(p.to_string()))
    }

    /// Whether any pattern/point asks for a capture (for callers that want to validate patterns).
    pub fn captures_anything(&self, n_layers: usize) -> bool {
        HookPoint::all(n_layers).into_iter().any(|p| self.wants_capture(p))
    }

    /// Run the site: apply interventions registered for `p` in order, then capture.
    pub fn site(&mut self, p: HookPoint, x: Tensor) -> Result<Tensor> {
        let mut x = x;
        if self.interventions.iter().any(|iv| iv.point == p) {
            for iv in self.interventions.iter().filter(|iv| iv.point == p) {
                x = apply(iv, &x)?;
            }
        }
        if self.wants_capture(p) {
            self.captured.insert(p, x.clone());
        }
        Ok(x)
    }
}

fn apply(iv: &Intervention, x: &Tensor) -> Result<Tensor> {
    let y = match &iv.op {
        Op::Replace(v) => {
            if v.dims() != x.dims() {
                return Err(Error::invalid(format!(
                    "replace at {}: value has shape {:?}, activation has {:?}",
                    iv.point,
                    v.dims(),
                    x.dims()
                )));
            }
            v.to_dtype(x.dtype())?
        }
        Op::Add(v) => x.broadcast_add(&v.to_dtype(x.dtype())?)?,
        Op::Scale(f) => {
            let dims = x.dims();
            // The unit axis is the third one ([b, t, unit, ...]) for hook_z, the last otherwise.
            let axis = if matches!(iv.point, HookPoint::AttnZ(_)) { 2 } else { dims.len() - 1 };
            if dims[axis] != f.len() {
                return Err(Error::invalid(format!(
                    "scale at {}: {} factors for an axis of {}",
                    iv.point,
                    f.len(),
                    dims[axis]
                )));
            }
            let mut shape = vec![1usize; dims.len()];
            shape[axis] = f.len();
            let s = Tensor::from_slice(f, shape, x.device())?.to_dtype(x.dtype())?;
            x.broadcast_mul(&s)?
        }
        Op::ProjectOut(r) => {
            let d = r.elem_count();
            if x.dim(candle_core::D::Minus1)? != d {
                return Err(Error::invalid(format!("project-out at {}: direction has {d} features", iv.point)));
            }
            project_out(x, r, 1.0)?
        }
        Op::Func(f) => f(x)?,
    };
    match &iv.positions {
        None => Ok(y),
        Some(pos) => {
            // Select y on the chosen positions of axis 1, x elsewhere (exact, differentiable).
            let t = x.dim(1)?;
            let mut m = vec![0u8; t];
            for &p in pos {
                if p >= t {
                    return Err(Error::invalid(format!("intervention at {}: position {p} ≥ sequence length {t}", iv.point)));
                }
                m[p] = 1;
            }
            let mut shape = vec![1usize; x.rank()];
            shape[1] = t;
            let m = Tensor::from_vec(m, shape, x.device())?.broadcast_as(x.shape())?;
            Ok(m.where_cond(&y, x)?)
        }
    }
}
