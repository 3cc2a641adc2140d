//! Logit lens (nostalgebraist 2020): decode the residual stream after every block as if it were
//! the last, `unembed(ln_final(resid))`, and follow a target token's rank and probability.
//!
//! Rows: `embed` (the embedding, `hook_embed`) and `L{l}` (`blocks.{l}.hook_resid_post`). The
//! last block's row is the model's own next-token distribution.

use candle_core::IndexOp;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::ir::{Component, Findings, Source};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::{Batch, HookPoint, Hooks};

pub const METHOD: &str = "logit-lens";

#[derive(Debug, Clone, Serialize)]
pub struct LensRow {
    pub component: Component,
    /// 0 = the most likely token.
    pub rank: usize,
    pub prob: f64,
    pub logit: f32,
    /// The top tokens (id, probability), most likely first.
    pub top: Vec<(u32, f64)>,
}

/// Resolve a position: negative counts from the end (-1 = last token).
pub fn position(pos: i64, len: usize) -> Result<usize> {
    let p = if pos < 0 { len as i64 + pos } else { pos };
    if p < 0 || p >= len as i64 {
        return Err(Error::invalid(format!(
            "--position {pos} is outside the prompt ({len} tokens)"
        )));
    }
    Ok(p as usize)
}

/// The lens at `pos` of `ids`, for `target`, with the `top_k` tokens of each row.
pub fn logit_lens(model: &Model, ids: &[u32], pos: usize, target: u32, top_k: usize) -> Result<Vec<LensRow>> {
    if pos >= ids.len() {
        return Err(Error::invalid(format!(
            "logit-lens: position {pos} is outside the prompt ({} tokens)",
            ids.len()
        )));
    }
    if target as usize >= model.cfg.vocab_size {
        return Err(Error::invalid(format!(
            "logit-lens: target id {target} is outside the vocabulary"
        )));
    }
    let layers = model.blocks.len();
    let mut hooks = Hooks::new();
    hooks.capture(HookPoint::Embed);
    for l in 0..layers {
        hooks.capture(HookPoint::ResidPost(l));
    }
    model.forward(
        &Batch::single(ids),
        None,
        &mut hooks,
        Fwd {
            last_only: true,
            ..Fwd::default()
        },
    )?;
    let sites = [(Component::Embed, HookPoint::Embed)]
        .into_iter()
        .chain((0..layers).map(|l| (Component::Block(l), HookPoint::ResidPost(l))));
    let mut rows = vec![];
    for (component, p) in sites {
        let x = hooks
            .captured
            .get(&p)
            .ok_or_else(|| Error::invalid(format!("logit-lens: {p} was not captured")))?;
        // The model's own final norm and unembedding (inference mode), on this position alone.
        let x = x.i((.., pos..pos + 1, ..))?.contiguous()?;
        let logits = model.unembed(x, &mut Hooks::new(), Fwd::default())?.flatten_all()?.to_vec1::<f32>()?;
        rows.push(row(component, &logits, target, top_k));
    }
    Ok(rows)
}

/// Softmax in f64, the target's rank (tokens with a strictly larger logit) and the top k.
pub fn row(component: Component, logits: &[f32], target: u32, top_k: usize) -> LensRow {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
    let z: f64 = logits.iter().map(|&x| (x as f64 - max).exp()).sum();
    let prob = |i: usize| (logits[i] as f64 - max).exp() / z;
    let t = logits[target as usize];
    let rank = logits.iter().filter(|&&x| x > t).count();
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    let top = order.iter().take(top_k).map(|&i| (i as u32, prob(i))).collect();
    LensRow {
        component,
        rank,
        prob: prob(target as usize),
        logit: t,
        top,
    }
}

/// Findings: score = the target's probability at each row; extra: rank, logit, top tokens.
pub fn findings(
    rows: &[LensRow],
    decode: impl Fn(u32) -> String,
    options: serde_json::Value,
    model: Source,
    data: Vec<Source>,
) -> Findings {
    let mut f = Findings::new(
        METHOD,
        "probability of the target token decoded from the residual stream after the block",
        options,
        model,
        data,
    );
    for r in rows {
        let s = f.push(r.component, r.prob);
        s.extra.insert("rank".into(), r.rank.into());
        s.extra.insert("logit".into(), serde_json::json!(r.logit));
        let top: Vec<serde_json::Value> = r
            .top
            .iter()
            .map(|&(id, p)| serde_json::json!({"id": id, "token": decode(id), "prob": p}))
            .collect();
        s.extra.insert("top".into(), top.into());
    }
    f
}

/// Follow one target token through the layers with the logit lens.
///
/// Decode the residual stream after every block through the final norm and the unembedding and
/// record the target's probability and rank per layer, plus the top tokens. The last layer's row
/// is the model's own prediction.
///
/// Findings: `embed` and `L{l}` with score = the target's probability.
#[derive(clap::Args, Debug, Clone, Serialize)]
pub struct Spec {
    /// The prompt.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// The target text; its first token is followed (mind the leading space: " Paris").
    #[arg(long)]
    pub target: String,
    /// Prompt position to decode (negative counts from the end; -1 = last token).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    pub position: i64,
    /// Top tokens to record per layer.
    #[arg(long, default_value_t = 5)]
    pub top_k: usize,
}

impl super::Method for Spec {
    fn run(&self, cx: &super::Ctx) -> Result<super::Located> {
        let tok = cx.tok()?;
        let ids = tok.prompt_ids(&self.prompt, self.chat)?;
        if ids.is_empty() {
            return Err(Error::invalid("--prompt has no tokens"));
        }
        let target_ids = tok.encode(&self.target, false)?;
        let Some(&target) = target_ids.first() else {
            return Err(Error::invalid(format!("--target {:?} has no tokens", self.target)));
        };
        let pos = position(self.position, ids.len())?;
        let rows = logit_lens(cx.model(), &ids, pos, target, self.top_k)?;
        let decode = |id: u32| tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
        let options = serde_json::json!({
            "prompt": self.prompt, "chat": self.chat, "target": self.target, "target_id": target,
            "target_token": decode(target), "target_tokens": target_ids.len(),
            "position": pos, "top_k": self.top_k,
        });
        let mut report = format!("target {:?} = token {target} {:?} at position {pos} of {}\n", self.target, decode(target), ids.len());
        report += &format!("{:<8} {:>6} {:>10}  top\n", "layer", "rank", "prob");
        for r in &rows {
            let top: Vec<String> = r.top.iter().map(|&(id, p)| format!("{:?} {:.3}", decode(id), p)).collect();
            report += &format!("{:<8} {:>6} {:>10}  {}\n", r.component.to_string(), r.rank, crate::ir::findings::fmt_score(r.prob), top.join(", "));
        }
        let mut out = super::Located::new(findings(&rows, decode, options, cx.source.clone(), vec![Source::inline(&self.prompt)]));
        out.report = report;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rank_and_top_k() {
        let r = row(Component::Block(0), &[1.0, 3.0, 2.0, 3.0], 2, 3);
        assert_eq!(r.rank, 2);
        assert_eq!(r.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![1, 3, 2]);
        let total: f64 = [1.0f64, 3.0, 2.0, 3.0].iter().map(|x| x.exp()).sum();
        assert!((r.prob - 2f64.exp() / total).abs() < 1e-12);
        assert!(position(-1, 5).unwrap() == 4 && position(0, 5).unwrap() == 0);
        assert!(position(-6, 5).is_err() && position(5, 5).is_err());
    }
}
