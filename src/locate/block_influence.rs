//! Block influence (ShortGPT, Men et al. 2024) and angular distance (Gromov et al. 2024).
//!
//! With x_l the residual stream entering block l (`blocks.{l}.hook_resid_pre`; x_L is the last
//! block's `hook_resid_post`):
//!
//! - BI_l = 1 − mean_t cos(x_l,t, x_{l+1},t) over every calibration token. A block that barely
//!   turns the residual stream has a low BI: it is the most redundant.
//! - angular distance of the n blocks starting at l: arccos(cos(x_l,T, x_{l+n},T)) / π at the
//!   last token T of each window, averaged over windows; the start with the smallest distance is
//!   the block of n layers to remove.
//!
//! Text is cut into disjoint windows of `seq_len` tokens, each run separately.

use candle_core::IndexOp;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::{Component, Findings, Source};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::{Batch, HookPoint, Hooks};

pub const METHOD: &str = "block-influence";

#[derive(Debug, Clone, Copy, Serialize)]
pub struct Options {
    /// Window length in tokens.
    pub seq_len: usize,
    /// Layers per block for the angular distance.
    pub n: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct BlockInfluence {
    /// BI per layer.
    pub bi: Vec<f64>,
    /// Angular distance per block start l (blocks l..l+n), `layers − n + 1` of them.
    pub angular: Vec<f64>,
    pub n: usize,
    pub windows: usize,
    pub tokens: usize,
}

impl BlockInfluence {
    /// The start of the block of `n` layers with the smallest angular distance.
    pub fn best_start(&self) -> usize {
        let mut best = 0;
        for (l, &d) in self.angular.iter().enumerate() {
            if d < self.angular[best] {
                best = l;
            }
        }
        best
    }
}

/// cos(a, b) in f64; exactly 1 when a == b (sqrt(x·x) is exact), 1 when both are zero.
fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        ab += x * y;
        aa += x * x;
        bb += y * y;
    }
    if aa == 0.0 && bb == 0.0 {
        return 1.0;
    }
    if aa == 0.0 || bb == 0.0 {
        return 0.0;
    }
    (ab / (aa * bb).sqrt()).clamp(-1.0, 1.0)
}

/// Run the model over `ids` in windows, with the interventions of `base` (e.g. skipped blocks).
pub fn block_influence(
    model: &Model,
    ids: &[u32],
    opt: Options,
    base: &Hooks,
    mut progress: impl FnMut(usize, usize),
) -> Result<BlockInfluence> {
    let layers = model.blocks.len();
    if layers == 0 {
        return Err(Error::invalid("block-influence: the model has no blocks"));
    }
    if opt.n == 0 || opt.n > layers {
        return Err(Error::invalid(format!(
            "block-influence: --n must be between 1 and the number of layers ({layers}), got {}",
            opt.n
        )));
    }
    if opt.seq_len < 2 {
        return Err(Error::invalid(format!(
            "block-influence: --seq-len must be at least 2, got {}",
            opt.seq_len
        )));
    }
    if ids.len() < 2 {
        return Err(Error::invalid("block-influence: need at least 2 calibration tokens"));
    }
    let windows: Vec<&[u32]> = ids.chunks(opt.seq_len).filter(|w| w.len() >= 2).collect();
    let mut cos_sum = vec![0f64; layers];
    let mut ang_sum = vec![0f64; layers - opt.n + 1];
    let mut tokens = 0usize;
    for (w, window) in windows.iter().enumerate() {
        progress(w, windows.len());
        let mut hooks = base.clone();
        for l in 0..layers {
            hooks.capture(HookPoint::ResidPre(l));
        }
        hooks.capture(HookPoint::ResidPost(layers - 1));
        model.forward(&Batch::single(window), None, &mut hooks, Fwd::default())?;
        let mut states = Vec::with_capacity(layers + 1);
        for p in (0..layers).map(HookPoint::ResidPre).chain([HookPoint::ResidPost(layers - 1)]) {
            let t = hooks
                .captured
                .get(&p)
                .ok_or_else(|| Error::invalid(format!("block-influence: {p} was not captured")))?;
            states.push(t.i(0)?.to_vec2::<f32>()?);
        }
        for l in 0..layers {
            for (a, b) in states[l].iter().zip(&states[l + 1]) {
                cos_sum[l] += cosine(a, b);
            }
        }
        let last = window.len() - 1;
        for (l, s) in ang_sum.iter_mut().enumerate() {
            *s += cosine(&states[l][last], &states[l + opt.n][last]).acos() / std::f64::consts::PI;
        }
        tokens += window.len();
    }
    progress(windows.len(), windows.len());
    Ok(BlockInfluence {
        bi: cos_sum.iter().map(|s| 1.0 - s / tokens as f64).collect(),
        angular: ang_sum.iter().map(|s| s / windows.len() as f64).collect(),
        n: opt.n,
        windows: windows.len(),
        tokens,
    })
}

/// Findings on the blocks `L{l}`: with n = 1 the score is BI (extra: the angular distance of
/// that one layer); with n > 1 the score is the angular distance of the n layers starting at
/// `L{l}` (extra: BI), and the summary names the best block.
pub fn findings(r: &BlockInfluence, options: serde_json::Value, model: Source, data: Vec<Source>) -> Findings {
    let meaning = if r.n == 1 {
        "BI = 1 − mean cos(resid_pre, resid_post) over tokens; lowest = most redundant layer".to_string()
    } else {
        format!(
            "angular distance arccos(cos(x_l, x_l+{})) / π at the last token of layers l..l+{}; lowest = most redundant block",
            r.n, r.n
        )
    };
    let mut f = Findings::new(METHOD, &meaning, options, model, data);
    for l in 0..r.bi.len() {
        if r.n == 1 {
            let s = f.push(Component::Block(l), r.bi[l]);
            s.extra.insert("angular".into(), serde_json::json!(r.angular[l]));
        } else if l < r.angular.len() {
            let s = f.push(Component::Block(l), r.angular[l]);
            s.extra.insert("bi".into(), serde_json::json!(r.bi[l]));
        }
    }
    let best = r.best_start();
    let block: Vec<String> = (best..best + r.n).map(|l| Component::Block(l).to_string()).collect();
    f.summary.insert("best_block".into(), serde_json::json!(block));
    f.summary.insert("windows".into(), r.windows.into());
    f.summary.insert("tokens".into(), r.tokens.into());
    f
}

/// Score every layer by how little it changes the residual stream (ShortGPT's block influence).
///
/// BI_l = 1 − mean over tokens of cos(resid_pre_l, resid_post_l). The lowest-BI layers are the
/// most redundant: candidates for `skip-layers`. With --n K > 1, score blocks of K consecutive
/// layers by Gromov et al.'s angular distance arccos(cos(x_l, x_l+K)) / π at the last token of each
/// window (score on L{l} = the block starting at l) and report the best block.
///
/// Findings: `L{l}` with score = BI (n = 1) or angular distance (n > 1).
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Spec {
    /// Calibration text (plain text, e.g. WikiText-2's wiki.test.raw).
    #[arg(long)]
    pub text: std::path::PathBuf,
    /// Calibration tokens taken from the start of --text (0 = all).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Window length: the text is cut into disjoint windows of this many tokens.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Layers per block for the angular distance (1 = per-layer BI).
    #[arg(long, default_value_t = 1)]
    pub n: usize,
}

impl super::Method for Spec {
    fn check(&self) -> Result<()> {
        super::require_file(&self.text)
    }

    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        let ids = super::text_ids(cx.tok()?, &self.text, self.tokens)?;
        let bar = super::bar("windows", cx.progress);
        let r = block_influence(cx.model(), &ids, Options { seq_len: self.seq_len, n: self.n }, &Hooks::new(), super::tick(&bar))?;
        bar.finish_and_clear();
        let options = serde_json::json!({"tokens": r.tokens, "seq_len": self.seq_len, "n": self.n, "windows": r.windows});
        let mut out = super::Located::new(findings(&r, options, cx.source.clone(), vec![Source::file(&self.text)?]));
        if cx.plot {
            let pts = |v: &[f64]| v.iter().enumerate().map(|(l, &y)| (l as f64, y)).collect::<Vec<_>>();
            let series = vec![("block influence".to_string(), pts(&r.bi)), (format!("angular distance (n = {})", r.n), pts(&r.angular))];
            out.plot = Some(crate::report::lines_svg(&series, "Block influence per layer (low = redundant)", "layer (block start)", "score")?);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::random::{random_model, RandomSpec};

    #[test]
    fn a_skipped_block_has_zero_influence_and_the_others_do_not() {
        let mut spec = RandomSpec::from_seed(7);
        spec.layers = 3;
        let m = random_model(spec.config(), 7).unwrap();
        let ids: Vec<u32> = (0..40).map(|i| (i * 7 % spec.vocab) as u32).collect();
        let mut hooks = Hooks::new();
        hooks.skip_block(1);
        let opt = Options { seq_len: 16, n: 1 };
        let r = block_influence(&m, &ids, opt, &hooks, |_, _| {}).unwrap();
        assert_eq!(r.windows, 3);
        assert_eq!(r.tokens, 40);
        assert_eq!(r.bi[1], 0.0, "{:?}", r.bi);
        assert_eq!(r.angular[1], 0.0, "{:?}", r.angular);
        assert!(r.bi[0] > 1e-4 && r.bi[2] > 1e-4, "{:?}", r.bi);
        assert_eq!(r.best_start(), 1);
        // Deterministic.
        let again = block_influence(&m, &ids, opt, &hooks, |_, _| {}).unwrap();
        assert_eq!(r.bi, again.bi);
        // Blocks of 2: both contain the skipped layer, neither is zero (the other layer acts).
        let r2 = block_influence(&m, &ids, Options { seq_len: 16, n: 2 }, &hooks, |_, _| {}).unwrap();
        assert_eq!(r2.angular.len(), 2);
        assert!(r2.angular.iter().all(|&d| d > 0.0), "{:?}", r2.angular);
        // Bad options are errors, not panics.
        assert!(block_influence(&m, &ids, Options { seq_len: 16, n: 4 }, &hooks, |_, _| {}).is_err());
        assert!(block_influence(&m, &ids, Options { seq_len: 1, n: 1 }, &hooks, |_, _| {}).is_err());
        assert!(block_influence(&m, &ids[..1], opt, &hooks, |_, _| {}).is_err());
    }

    #[test]
    fn cosine_is_exact_on_equal_vectors() {
        let v = [0.1f32, -3.7, 1e-3, 42.0];
        assert_eq!(cosine(&v, &v), 1.0);
        assert_eq!(cosine(&[0.0; 4], &[0.0; 4]), 1.0);
        assert!((cosine(&[1.0, 0.0], &[0.0, 2.0])).abs() < 1e-12);
    }
}
