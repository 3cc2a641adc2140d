//! `mechc locate attribute`.

use std::path::PathBuf;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::ir::Source;
use crate::locate::attribute as at;
use crate::locate::patch as ap;
use crate::report::{heatmaps_svg, Heatmap};

/// Attribution patching: the first-order estimate of every activation patch at once, from one
/// clean forward and one corrupted forward + backward. For each site, (a_clean − a_corrupt) ·
/// ∂M/∂a on the corrupted run, normalised as `locate patch` normalises, by (m_clean −
/// m_corrupt): 0 = no effect, 1 = restores the clean value. Same prompt pair, metric and
/// defaults as `locate patch`.
///
/// Sites: every attention head (`attn.hook_z`, all positions), every MLP neuron
/// (`mlp.hook_post`, all positions), and per layer × position the residual stream entering each
/// block (`hook_resid_pre`) and each MLP's output (`hook_mlp_out`).
///
/// Findings: `L{l}.H{h}` (every head), `L{l}.N{i}` (the --neurons largest by |score|), `L{l}`
/// (resid) and `L{l}.mlp` with score = the largest value over positions. The summary holds the
/// head, resid and mlp grids, and with --verify-top the real patching effects of the top heads
/// and their Spearman rank correlation with the attributions.
///
/// A linear estimate: poor for large components and saturated attention. Verify what you use.
#[derive(Args, Debug)]
pub struct AttributeArgs {
    #[command(flatten)]
    pub pair: super::patch::PairArgs,
    /// Keep this many neurons in the findings, those of largest |attribution| over all layers
    /// (0 = every neuron).
    #[arg(long, default_value_t = 200)]
    pub neurons: usize,
    /// Run real activation patching for the K heads of largest |attribution| and report their
    /// effects and the Spearman rank correlation with the attributions (summary key `verify`,
    /// and on stderr). 0 = skip.
    #[arg(long, value_name = "K", default_value_t = 10)]
    pub verify_top: usize,
    /// Write the findings (JSON) here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Plot the normalised attributions (SVG): heads × layers, positions × layers for resid and
    /// mlp.
    #[arg(long)]
    pub plot: Option<PathBuf>,
    /// Replace --out / --plot if they exist.
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: AttributeArgs, g: &Global) -> anyhow::Result<()> {
    super::check_out(a.out.as_deref(), a.force)?;
    super::check_out(a.plot.as_deref(), a.force)?;
    let super::patch::Pair { loaded, clean, corrupt, answer, wrong } = a.pair.load("attribution patching", g)?;
    let (model, tok) = (&loaded.model, loaded.tok()?);
    let started = std::time::Instant::now();
    let r = at::attribute(model, &clean, &corrupt, answer, wrong, a.pair.metric)?;
    let seconds = started.elapsed().as_secs_f64();
    let decode = |id: u32| tok.decode(&[id], false).unwrap_or_else(|_| format!("<{id}>"));
    let options = json!({
        "clean": a.pair.clean, "corrupted": a.pair.corrupted, "chat": a.pair.chat, "metric": a.pair.metric,
        "answer_id": r.answer, "answer": decode(r.answer),
        "wrong_id": r.wrong, "wrong": r.wrong.map(decode),
        "neurons": a.neurons, "verify_top": a.verify_top,
    });
    let data = vec![Source::inline(&a.pair.clean), Source::inline(&a.pair.corrupted)];
    let mut f = at::findings(&r, a.neurons, options, Source::model(&a.pair.model)?, data);
    if !g.quiet {
        eprintln!("attribution: {seconds:.2} s for every head, neuron, resid and mlp site");
    }
    if a.verify_top > 0 {
        let top = at::top_heads(&r, a.verify_top);
        let real = ap::patch_heads(model, &clean, &corrupt, Some(r.answer), r.wrong, a.pair.metric, &top)?;
        let est: Vec<f64> = top.iter().map(|&(l, h)| r.heads[h][l]).collect();
        let rho = at::spearman(&est, &real);
        let rows: Vec<serde_json::Value> = top
            .iter()
            .zip(est.iter().zip(&real))
            .map(|(&(l, h), (&e, &p))| json!({ "head": format!("L{l}.H{h}"), "attribution": e, "patch": p }))
            .collect();
        if !g.quiet {
            eprintln!("verify: top {} heads by |attribution|, Spearman ρ = {rho:.3} against real patching", top.len());
            for row in &rows {
                eprintln!(
                    "  {:<8} attribution {:>8.4}  patch {:>8.4}",
                    row["head"].as_str().unwrap_or(""),
                    row["attribution"].as_f64().unwrap_or(f64::NAN),
                    row["patch"].as_f64().unwrap_or(f64::NAN)
                );
            }
        }
        f.summary.insert("verify".into(), json!({ "k": top.len(), "spearman": rho, "heads": rows }));
    }
    if let Some(path) = &a.plot {
        let rows: Vec<String> = clean
            .iter()
            .zip(&corrupt)
            .map(|(&c, &x)| if c == x { decode(c) } else { format!("{}/{}", decode(c), decode(x)) })
            .collect();
        let color = plotters::style::RGBColor(8, 69, 148);
        let panel = |title: &str, rows: Vec<String>, values: &Vec<Vec<f64>>| Heatmap {
            title: title.into(),
            rows,
            values: values.clone(),
            color,
            x_label: "layer".into(),
        };
        let panels = [
            panel("resid", rows.clone(), &r.resid),
            panel("mlp", rows, &r.mlp),
            panel("head", (0..r.heads.len()).map(|h| format!("H{h}")).collect(), &r.heads),
        ];
        let title = format!("Attribution patching, normalised {:?} (clean {:.3}, corrupted {:.3})", a.pair.metric, r.m_clean, r.m_corrupt);
        crate::io::atomic::write_file(path, heatmaps_svg(&panels, &title)?.as_bytes())?;
    }
    super::finish(f, a.out.as_ref(), g, &["grids"])
}
