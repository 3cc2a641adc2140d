//! `mechc locate head-importance`.

use clap::Args;

use super::importance::CommonArgs;
use super::Global;
use crate::locate::importance::{By, Unit};

/// Score every query head `L{l}.H{h}` over calibration text; low score = least important (the
/// first to prune with `prune-heads`). A head is its slice of `blocks.{l}.attn.hook_z`, i.e. its
/// d_head input channels of `o_proj`.
///
/// --by:
///   flap           (default) FLAP fluctuation: Σ over the head's channels of the sample variance of
///                  z over tokens × ‖o_proj column‖²; one forward per window
///   wanda          structured Wanda: Σ over the head's channels of ‖z_j‖₂ over tokens × Σ_i |o_proj_ij|
///   gradient       Michel et al. 2019: |∂L/∂ξ_h| for a mask ξ_h = 1 on the head's output (=|Σ_t z·∂L/∂z|),
///                  per window, averaged, then divided by the layer's L2 norm as Michel et al. do
///                  (findings keep the unnormalised value as `raw`); one forward + backward per window
///   ablation-zero  increase of the mean NLL when the head is zeroed; exact, costs about
///                  heads × (layers − l) extra block passes per layer l and window (SmolLM2: ~140 forwards per window)
///   ablation-mean  the same, with the head replaced by its calibration mean (prune-heads' compensate = "mean")
///
/// Findings: `L{l}.H{h}` with the score; summary: by, windows, tokens (and base_loss for ablations).
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct HeadImportanceArgs {
    /// Ranking method (see above).
    #[arg(long, value_enum, default_value_t = By::Flap)]
    pub by: By,
    #[command(flatten)]
    pub common: CommonArgs,
}

pub fn run(a: HeadImportanceArgs, g: &Global) -> anyhow::Result<()> {
    super::importance::run(a.common, a.by, Unit::Heads, g)
}
