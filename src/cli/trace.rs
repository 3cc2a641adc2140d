//! `mechc trace`: run a prompt and save the logits and chosen activations.

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{DType, Tensor};
use clap::Args;

use super::Global;
use crate::model::decoder::Fwd;
use crate::runtime::{Batch, HookPoint, Hooks};

/// Run one prompt and save its logits and chosen activations (safetensors).
///
/// Run one prompt and write a safetensors file with `input_ids` (i64, [seq]), `logits`
/// (f32, [seq, vocab]) and every hook matching --hooks, at every position, without the batch
/// axis: e.g. `blocks.3.hook_resid_post` [seq, d_model], `blocks.3.attn.hook_z` [seq, head, d_head].
#[derive(Args, Debug)]
pub struct TraceArgs {
    /// HF model directory or .gguf file.
    pub model: PathBuf,
    /// The prompt.
    #[arg(long, required_unless_present = "ids", conflicts_with = "ids")]
    pub prompt: Option<String>,
    /// Token ids instead of a prompt, comma-separated (no tokenizer needed).
    #[arg(long, value_delimiter = ',')]
    pub ids: Option<Vec<u32>>,
    /// Wrap the prompt in the chat template.
    #[arg(long)]
    pub chat: bool,
    /// Comma-separated glob patterns of hook names, e.g. `blocks.*.hook_resid_post,hook_embed`.
    /// Names: hook_embed, blocks.L.{hook_resid_pre, attn.hook_z, hook_attn_out, hook_resid_mid,
    /// mlp.hook_post, hook_mlp_out, hook_resid_post}, ln_final.hook_normalized.
    #[arg(long, value_delimiter = ',')]
    pub hooks: Vec<String>,
    /// Output .safetensors file (must not exist, unless --force).
    #[arg(long)]
    pub out: PathBuf,
    /// Multiply the projections in f64: logits closer to an f64 forward than transformers' f32
    /// forward is (~1.25× slower). Without it, logits differ from transformers' by up to ~3e-4
    /// on SmolLM2.
    #[arg(long)]
    pub precise: bool,
    /// Replace the output file if it exists.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: TraceArgs, g: &Global) -> anyhow::Result<()> {
    crate::io::atomic::check_file(&a.out, a.force, &[a.model.as_path()])?;
    let loaded = crate::io::load(&a.model, g.progress())?;
    let ids = match (&a.ids, &a.prompt) {
        (Some(ids), _) => ids.clone(),
        (None, Some(p)) => loaded.tok()?.prompt_ids(p, a.chat)?,
        (None, None) => unreachable!("clap requires --prompt or --ids"),
    };
    if ids.is_empty() {
        anyhow::bail!("the prompt has no tokens");
    }
    let mut hooks = Hooks::new();
    if !a.hooks.is_empty() {
        hooks.capture_matching(&a.hooks)?;
        if !hooks.captures_anything(loaded.model.cfg.num_layers) {
            anyhow::bail!("--hooks {:?} matches no hook of this model (e.g. blocks.0.hook_resid_post)", a.hooks.join(","));
        }
    }
    let fwd = Fwd { precise: a.precise, ..Fwd::default() };
    let logits = loaded.model.forward(&Batch::single(&ids), None, &mut hooks, fwd)?;
    let mut out: Vec<(String, Tensor)> = vec![
        ("input_ids".into(), Tensor::new(ids.iter().map(|&i| i as i64).collect::<Vec<_>>(), &candle_core::Device::Cpu)?),
        ("logits".into(), logits.squeeze(0)?.to_dtype(DType::F32)?),
    ];
    for (p, t) in &hooks.captured {
        if *p != HookPoint::Logits {
            out.push((p.to_string(), t.squeeze(0)?.to_dtype(DType::F32)?));
        }
    }
    let mut meta = BTreeMap::new();
    if let Some(p) = &a.prompt {
        meta.insert("prompt".to_string(), p.clone());
    }
    meta.insert("model".to_string(), loaded.dir.display().to_string());
    // Write beside the target and rename, so a failure leaves no partial file.
    let tmp = a.out.with_extension("safetensors.mechc-tmp");
    crate::io::st::write(&tmp, &out, &meta).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    std::fs::rename(&tmp, &a.out).map_err(|e| crate::Error::io(&a.out, e))?;
    if !g.quiet {
        eprintln!("wrote {} ({} tokens, {} hooks)", a.out.display(), ids.len(), out.len() - 2);
    }
    Ok(())
}
