//! `mechc compile PIPELINE.toml`: run a pipeline's passes, verify the result against its budgets,
//! emit the checkpoint.

use std::path::PathBuf;

use clap::Args;

use super::Global;
use crate::compile::{pipeline::PipelineFile, Plan, Verdict};

/// Compile a model: run a pipeline's passes, verify its budgets, emit the checkpoint.
///
/// Compile a model: apply the pipeline's passes to the source weights (the structural verifier
/// runs after each), diff the result against the source on `[verify]`'s prompts and text, check
/// every budget, and write the checkpoint atomically with a manifest. A violated budget fails
/// the compile and writes nothing.
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
    /// verification and write nothing.
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

pub fn run(a: CompileArgs, g: &Global) -> anyhow::Result<()> {
    let file = PipelineFile::load(&a.pipeline)?;
    let source_path = file.resolve(&file.pipeline.model.path);
    let loaded = crate::io::load(&source_path, g.progress())?;
    let say = |s: String| {
        if !g.quiet {
            eprintln!("{s}");
        }
    };
    say(format!("source {} ({:.2}M parameters)", source_path.display(), loaded.model.param_count() as f64 / 1e6));
    let plan = Plan::new(file, a.out.clone(), a.force, &loaded, g.progress(), &say)?;
    let n = plan.passes.len();
    let dump = |what: String, m: &crate::model::Model| {
        if a.dump_ir {
            print!("; --- {what}\n{}", crate::ir::Ir::from_model(m).to_text());
        }
    };
    dump("IR before the passes".into(), &loaded.model);
    let (compiled, records) = plan.run_passes(&loaded.model, |r, m| {
        dump(format!("IR after pass {}", r.name), m);
        say(format!(
            "pass {}: {} ({:.2}M → {:.2}M parameters, {:.2} s)",
            r.name,
            r.summary,
            r.parameters_before as f64 / 1e6,
            r.parameters_after as f64 / 1e6,
            r.seconds
        ));
        if let Some(t) = &r.details_text {
            say(t.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"));
        }
    })?;
    if n == 0 {
        say("no passes: the output reproduces the source tensors".into());
    }
    if a.dry_run {
        say(format!("dry run: {n} passes checked and run in memory; nothing verified or written ({} would be the output)", plan.out.display()));
        return Ok(());
    }
    let verdict = plan.verify(&loaded.model, &compiled, loaded.tok()?, g.progress())?;
    if let Some(v) = &verdict {
        print!("{}", table(v));
        if let Some(r) = &a.report {
            let sides = [
                crate::verify::diff::Side::of(&source_path, &loaded.model)?,
                crate::verify::diff::Side { path: plan.out.clone(), file_bytes: 0, ..crate::verify::diff::Side::of(&source_path, &compiled)? },
            ];
            crate::report::write_diff(r, &sides, v.prompts.as_ref(), v.text.as_ref())?;
        }
        let bad = plan.violations(v);
        if !bad.is_empty() {
            anyhow::bail!("budget violated, nothing written: {}", bad.join("; "));
        }
    }
    let out = plan.emit(&compiled, &loaded.dir, &records, verdict.as_ref())?;
    say(format!("wrote {}", out.display()));
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
