//! `mechc locate METHOD`: score components and write findings, one file per method.

pub mod attribute;
pub mod block_influence;
pub mod causal_trace;
pub mod direction;
pub mod head_importance;
mod importance;
pub mod logit_lens;
pub mod neuron_importance;
pub mod patch;
pub mod probe;

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};

use super::Global;
use crate::ir::Findings;

/// Find where a behaviour lives: score components, write findings.
///
/// Find where a behaviour lives: score the model's components with a method and write the
/// findings (JSON, with the method, options, model hash and data hash) for passes to select from.
/// Scores print one per line in the IR notation (`L12  0.4120`).
#[derive(Args, Debug)]
pub struct LocateArgs {
    #[command(subcommand)]
    pub method: Method,
}

#[derive(Subcommand, Debug)]
pub enum Method {
    Attribute(attribute::AttributeArgs),
    BlockInfluence(block_influence::BlockInfluenceArgs),
    CausalTrace(causal_trace::CausalTraceArgs),
    Direction(direction::DirectionArgs),
    HeadImportance(head_importance::HeadImportanceArgs),
    LogitLens(logit_lens::LogitLensArgs),
    NeuronImportance(neuron_importance::NeuronImportanceArgs),
    Patch(patch::PatchArgs),
    Probe(probe::ProbeArgs),
}

pub fn run(a: LocateArgs, g: &Global) -> anyhow::Result<()> {
    match a.method {
        Method::Attribute(a) => attribute::run(a, g),
        Method::BlockInfluence(a) => block_influence::run(a, g),
        Method::CausalTrace(a) => causal_trace::run(a, g),
        Method::Direction(a) => direction::run(a, g),
        Method::HeadImportance(a) => head_importance::run(a, g),
        Method::LogitLens(a) => logit_lens::run(a, g),
        Method::NeuronImportance(a) => neuron_importance::run(a, g),
        Method::Patch(a) => patch::run(a, g),
        Method::Probe(a) => probe::run(a, g),
    }
}

/// Refuse to overwrite an output unless forced; checked before the (long) run.
fn check_out(out: Option<&Path>, force: bool) -> anyhow::Result<()> {
    if let Some(p) = out {
        if p.exists() && !force {
            return Err(crate::Error::output(p, "already exists (pass --force to replace it)").into());
        }
    }
    Ok(())
}

/// The first token of an answer given as `flag TEXT`.
fn first_token(tok: &crate::tokenizer::Tok, flag: &str, text: &str) -> anyhow::Result<u32> {
    match tok.encode(text, false)?.first() {
        Some(&t) => Ok(t),
        None => anyhow::bail!("{flag} {text:?} has no tokens"),
    }
}

/// Write the findings if asked, then print them (unless quiet) without the summary entries
/// named in `hide` (bulky ones, e.g. per-fact grids, that only the file needs).
fn finish(mut f: Findings, out: Option<&PathBuf>, g: &Global, hide: &[&str]) -> anyhow::Result<()> {
    if let Some(p) = out {
        f.write(p)?;
        if !g.quiet {
            eprintln!("wrote {}", p.display());
        }
    }
    if !g.quiet {
        for k in hide {
            f.summary.remove(*k);
        }
        print!("{}", f.to_text());
    }
    Ok(())
}
