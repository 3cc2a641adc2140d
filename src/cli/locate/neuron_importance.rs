//! `mechc locate neuron-importance`.

use clap::Args;

use super::importance::CommonArgs;
use super::Global;
use crate::locate::importance::{By, Unit};

/// Score every MLP neuron (e.g. `L3.N17`) over calibration text; low score = least important (the
/// first to prune with `prune-neurons`). A neuron is channel n of `blocks.{l}.mlp.hook_post`, the
/// input of `down_proj`.
///
/// --by:
///   flap           (default, FLAP's choice) sample variance of the neuron over tokens × ‖down_proj[:, n]‖²;
///                  one forward per window
///   wanda          structured Wanda: ‖a_n‖₂ over tokens × Σ_i |down_proj[i, n]|
///   gradient       Taylor / Michel et al.: |Σ_t a_n·∂L/∂a_n| per window (the gradient of a mask on the
///                  neuron), averaged, divided by the layer's L2 norm (`raw` keeps the value before)
///   ablation-zero  increase of the mean NLL when the neuron is zeroed. COSTLY: one extra row per
///                  neuron run from its layer on (SmolLM2: 46k rows per window, hours on a CPU);
///                  restrict it with --layers
///   ablation-mean  the same, with the neuron replaced by its calibration mean (FLAP's compensation)
///
/// Findings: `L{l}.N{i}` with the score; summary: by, windows, tokens (and base_loss for ablations).
#[derive(Args, Debug)]
#[command(verbatim_doc_comment)]
pub struct NeuronImportanceArgs {
    /// Ranking method (see above).
    #[arg(long, value_enum, default_value_t = By::Flap)]
    pub by: By,
    #[command(flatten)]
    pub common: CommonArgs,
}

pub fn run(a: NeuronImportanceArgs, g: &Global) -> anyhow::Result<()> {
    super::importance::run(a.common, a.by, Unit::Neurons, g)
}
