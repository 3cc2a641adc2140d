//! `mechc locate METHOD`: one subcommand per method of `locate::REGISTRY`, built from the
//! method's options struct (its help, flags and defaults), plus the flags every method shares:
//! the model and where the findings, plot and vectors go.

use std::path::{Path, PathBuf};

use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches};

use super::Global;
use crate::ir::Source;
use crate::locate::{self, Locator, MethodInfo};

/// A parsed `mechc locate METHOD ...`.
pub struct LocateArgs {
    pub method: &'static MethodInfo,
    pub spec: Box<dyn Locator>,
    pub model: PathBuf,
    pub out: Option<PathBuf>,
    pub plot: Option<PathBuf>,
    pub vectors: Option<PathBuf>,
    pub force: bool,
}

impl std::fmt::Debug for LocateArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "locate {} {}", self.method.name, self.spec.options())
    }
}

/// The CLI command of one method: its options and the shared flags.
fn command(m: &MethodInfo) -> Command {
    let path = |name: &'static str, help: &'static str| {
        Arg::new(name).long(name).value_name("FILE").value_parser(clap::value_parser!(PathBuf)).help(help).help_heading("Model and outputs")
    };
    let mut c = (m.command)()
        .name(m.name)
        .arg(path("model", "HF model directory or .gguf file").value_name("MODEL").required(true))
        .arg(path("out", "Write the findings (JSON) here"))
        .arg(Arg::new("force").long("force").action(ArgAction::SetTrue).help("Replace existing outputs").help_heading("Model and outputs"));
    if m.outputs.plot {
        c = c.arg(path("plot", "Also draw the findings (SVG)"));
    }
    if m.outputs.vectors {
        c = c.arg(path("vectors", "Write the vectors here (safetensors, one tensor per layer named like blocks.L.hook_resid_pre)"));
    }
    c
}

impl FromArgMatches for LocateArgs {
    fn from_arg_matches(matches: &ArgMatches) -> Result<Self, clap::Error> {
        let Some((name, m)) = matches.subcommand() else {
            return Err(clap::Error::raw(clap::error::ErrorKind::MissingSubcommand, "a locate method is required\n"));
        };
        let method = locate::find(name).ok_or_else(|| clap::Error::raw(clap::error::ErrorKind::InvalidSubcommand, format!("unknown method {name}\n")))?;
        let path = |id: &str| if m.try_contains_id(id).unwrap_or(false) { m.get_one::<PathBuf>(id).cloned() } else { None };
        Ok(LocateArgs {
            method,
            spec: (method.parse)(m)?,
            model: path("model").expect("required"),
            out: path("out"),
            plot: path("plot"),
            vectors: path("vectors"),
            force: m.get_flag("force"),
        })
    }

    fn update_from_arg_matches(&mut self, matches: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(matches)?;
        Ok(())
    }
}

impl clap::Args for LocateArgs {
    fn augment_args(cmd: Command) -> Command {
        cmd.about("Find where a behaviour lives: score components, write findings")
            .long_about(
                "Find where a behaviour lives: score the model's components with a method and write the \
                 findings (JSON, with the method, options, model hash and data hash) for passes to select from. \
                 Scores print one per line in the IR notation (`L12  0.4120`).",
            )
            .subcommand_required(true)
            .arg_required_else_help(true)
            .subcommands(locate::REGISTRY.iter().map(command))
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

/// Refuse to overwrite an output unless forced; checked before the (long) run.
fn check_out(out: Option<&Path>, force: bool) -> anyhow::Result<()> {
    match out {
        Some(p) if p.exists() && !force => Err(crate::Error::output(p, "already exists (pass --force to replace it)").into()),
        _ => Ok(()),
    }
}

pub fn run(a: LocateArgs, g: &Global) -> anyhow::Result<()> {
    for out in [&a.out, &a.plot, &a.vectors] {
        check_out(out.as_deref(), a.force)?;
    }
    a.spec.check()?;
    let loaded = crate::io::load(&a.model, g.progress())?;
    let cx = locate::Ctx { loaded: &loaded, source: Source::model(&a.model)?, progress: g.progress(), plot: a.plot.is_some() };
    let mut r = a.spec.run(&cx)?;
    let say = |s: &str| {
        if !g.quiet {
            eprint!("{s}");
        }
    };
    if let (Some(p), Some(v)) = (&a.vectors, &r.vectors) {
        v.write(p)?;
        say(&format!("wrote {}\n", p.display()));
    }
    if let (Some(p), Some(svg)) = (&a.plot, &r.plot) {
        crate::io::atomic::write_file(p, svg.as_bytes())?;
        say(&format!("wrote {}\n", p.display()));
    }
    say(&r.report);
    if let Some(p) = &a.out {
        r.findings.write(p)?;
        say(&format!("wrote {}\n", p.display()));
    }
    if !g.quiet {
        for k in r.hide {
            r.findings.summary.remove(*k);
        }
        print!("{}", r.findings.to_text());
    }
    Ok(())
}
