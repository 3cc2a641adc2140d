//! The command line: one file per subcommand. Doc comments are the `--help` text.

pub mod bench;
pub mod cache;
pub mod compile;
pub mod diff;
pub mod eval;
pub mod export;
pub mod generate;
pub mod import;
pub mod inspect;
pub mod locate;
pub mod passes;
pub mod random_model;
pub mod tokenize;
pub mod trace;

use clap::{Args, Parser, Subcommand};

/// mechc: locate behaviours in a language model, rewrite its weights, verify, emit a checkpoint.
///
/// MODEL arguments take an HF model directory (config.json + safetensors) or a .gguf file,
/// which is imported once into the cache (`mechc cache` lists it: $MECHC_CACHE, else the .cache/
/// of the checkout mechc was built from, else ~/.cache/mechc).
#[derive(Parser, Debug)]
#[command(name = "mechc", version, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Print less (errors only). Also hides progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Print more (-v: info, -vv: debug).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Never show progress bars.
    #[arg(long, global = true)]
    pub no_progress: bool,
}

impl Global {
    pub fn progress(&self) -> bool {
        !self.quiet && !self.no_progress && std::io::IsTerminal::is_terminal(&std::io::stderr())
    }
}

/// The outputs every evaluating command shares: JSON on stdout, an HTML report file.
#[derive(Args, Debug, Clone)]
pub struct ReportArgs {
    /// Machine-readable output (JSON on stdout, everything including per-item numbers).
    #[arg(long)]
    pub json: bool,
    /// Also write an HTML report (tables and plots) readable offline.
    #[arg(long)]
    pub report: Option<std::path::PathBuf>,
    /// Replace the --report file if it exists.
    #[arg(long)]
    pub force: bool,
}

impl ReportArgs {
    /// Check the report path before any work (a model load, minutes of generation): it must not
    /// exist (unless --force) and must not be one of the `inputs`.
    pub fn check(&self, inputs: &[&std::path::Path]) -> crate::Result<()> {
        crate::io::atomic::check_file_opt(self.report.as_deref(), self.force, inputs)
    }
}

#[derive(Subcommand, Debug)]
pub enum Command {
    Import(import::ImportArgs),
    Export(export::ExportArgs),
    Inspect(inspect::InspectArgs),
    Generate(generate::GenerateArgs),
    Trace(trace::TraceArgs),
    Locate(locate::LocateArgs),
    Diff(diff::DiffArgs),
    Compile(compile::CompileArgs),
    Passes(passes::PassesArgs),
    Eval(eval::EvalArgs),
    Tokenize(tokenize::TokenizeArgs),
    Bench(bench::BenchArgs),
    Cache(cache::CacheArgs),
    #[command(hide = true)]
    RandomModel(random_model::RandomModelArgs),
}

pub fn run(cli: Cli) -> anyhow::Result<()> {
    let level = if cli.global.quiet {
        log::LevelFilter::Error
    } else {
        match cli.global.verbose {
            0 => log::LevelFilter::Warn,
            1 => log::LevelFilter::Info,
            _ => log::LevelFilter::Debug,
        }
    };
    env_logger::Builder::new().filter_level(level).format_target(false).format_timestamp(None).init();
    let g = cli.global.clone();
    match cli.command {
        Command::Import(a) => import::run(a, &g),
        Command::Export(a) => export::run(a, &g),
        Command::Inspect(a) => inspect::run(a, &g),
        Command::Generate(a) => generate::run(a, &g),
        Command::Trace(a) => trace::run(a, &g),
        Command::Locate(a) => locate::run(a, &g),
        Command::Diff(a) => diff::run(a, &g),
        Command::Compile(a) => compile::run(a, &g),
        Command::Passes(a) => passes::run(a, &g),
        Command::Eval(a) => eval::run(a, &g),
        Command::Tokenize(a) => tokenize::run(a, &g),
        Command::Bench(a) => bench::run(a, &g),
        Command::Cache(a) => cache::run(a, &g),
        Command::RandomModel(a) => random_model::run(a, &g),
    }
}
