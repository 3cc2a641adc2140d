//! `mechc compile PIPELINE.toml`: run a pipeline's passes, verify the result against its budgets,
//! emit the checkpoint. The compile itself is `compile::compile`; this file prints.

use std::path::PathBuf;

use clap::Args;

use super::Global;
use crate::compile::{pipeline::PipelineFile, Observer, PassRecord, Request, Verdict};
use crate::model::Model;

/// Compile a model: apply the pipeline's passes, verify the budgets, write the checkpoint.
///
/// The structural verifier runs after each pass; the result is diffed against the source on
/// `[verify]`'s prompts and text, every budget is checked, and the checkpoint is written
/// atomically with a manifest. A violated budget fails the compile and writes nothing. An
/// existing output is refused (without --force) before anything is loaded.
#[derive(Args, Debug)]
pub struct CompileArgs {
    /// The pipeline file (TOML; see configs/ for examples).
    pub pipeline: PathBuf,
    /// Output directory (overrides `[output] path`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace an existing output directory.
    #[arg(long)]
    pub force: bool,
    /// Check the pipeline and run the passes in memory; print what they change; skip
    /// verification and write no checkpoint (the model import and `[[locate]]` findings are
    /// still cached, so the real compile reuses them).
    #[arg(long)]
    pub dry_run: bool,
    /// Print the component IR (`mechc inspect --ir` notation) before the first pass and after
    /// each pass, on stdout, each preceded by a `; ---` header line.
    #[arg(long)]
    pub dump_ir: bool,
    /// Also write the verification as an HTML report.
    #[arg(long)]
    pub report: Option<PathBuf>,
}

/// Prints what the compile does as it goes.
struct Printer<'a> {
    a: &'a CompileArgs,
    g: &'a Global,
    source_path: PathBuf,
}

impl Printer<'_> {
    fn dump(&self, what: &str, m: &Model) {
        if self.a.dump_ir {
            print!("; --- {what}\n{}", crate::ir::Ir::from_model(m).to_text());
        }
    }
}

impl Observer for Printer<'_> {
    fn say(&self, line: String) {
        if !self.g.quiet {
            eprintln!("{line}");
        }
    }

    fn source(&mut self, m: &Model) {
        self.dump("IR before the passes", m);
    }

    fn pass(&mut self, r: &PassRecord, m: &Model) {
        self.dump(&format!("IR after pass {}", r.name), m);
        let (before, after) = (r.parameters_before as f64 / 1e6, r.parameters_after as f64 / 1e6);
        self.say(format!("pass {}: {} ({before:.2}M → {after:.2}M parameters, {:.2} s)", r.name, r.summary, r.seconds));
        if let Some(t) = &r.details_text {
            self.say(t.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"));
        }
    }

    fn verified(&mut self, v: &Verdict, source: &Model, compiled: &Model, out: &std::path::Path) -> crate::Result<()> {
        print!("{}", table(v));
        if let Some(r) = &self.a.report {
            use crate::verify::diff::Side;
            let sides = [Side::of(&self.source_path, source)?, Side { path: out.to_path_buf(), file_bytes: 0, ..Side::of(&self.source_path, compiled)? }];
            crate::verify::report::diff(r, &sides, v.prompts.as_ref(), v.text.as_ref())?;
        }
        Ok(())
    }
}

pub fn run(a: CompileArgs, g: &Global) -> anyhow::Result<()> {
    if let Some(r) = a.report.as_deref().filter(|r| r.exists() && !a.force) {
        return Err(crate::Error::output(r, "already exists (pass --force to replace it)").into());
    }
    let file = PipelineFile::load(&a.pipeline)?;
    let source_path = file.resolve(&file.pipeline.model.path);
    let req = Request { out: a.out.clone(), force: a.force, dry_run: a.dry_run, progress: g.progress() };
    let mut p = Printer { a: &a, g, source_path };
    let done = crate::compile::compile(file, &req, &mut p)?;
    let n = done.records.len();
    if n == 0 {
        p.say("no passes: the output reproduces the source tensors".into());
    }
    match &done.out {
        Some(out) => p.say(format!("wrote {}", out.display())),
        None => p.say(format!(
            "dry run: {n} passes checked and run in memory; nothing verified, no checkpoint written ({} would be the output); \
             the model import and [[locate]] findings are kept in the cache {}",
            done.target.display(),
            crate::io::cache_dir().display()
        )),
    }
    Ok(())
}

fn table(v: &Verdict) -> String {
    let mut s = String::from("verify:\n");
    for (k, x) in &v.metrics {
        s += &format!("  {k:<16} {x:.6}\n");
    }
    for c in &v.checks {
        s += &format!("  {:<4} {} = {} ({} = {:.6})\n", if c.ok { "ok" } else { "FAIL" }, c.budget, c.bound, c.metric, c.measured);
    }
    s
}
