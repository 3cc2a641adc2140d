//! Locate: methods that score components and return [`crate::ir::Findings`], registered in
//! [`REGISTRY`] with one line each (like `passes::REGISTRY`).
//!
//! A method file declares its options as one struct (`Spec`, derived `clap::Args` +
//! `serde::Serialize`): the fields' doc comments are the help text, clap's defaults are the only
//! defaults, and both front ends parse it through that one definition — `mechc locate NAME` from
//! the command line, a pipeline's `[[locate]]` table through [`spec_from_table`] (each key becomes
//! its flag; typed TOML values are checked by clap as the flags are). [`Method::run`] computes the
//! findings in the library; the CLI (`src/cli/locate.rs`) only adds `--model`, `--out`, `--plot`,
//! `--vectors` and `--force` and prints. The canonical serialisation of a parsed `Spec`, with
//! every file it names replaced by the file's SHA-256, is the findings cache key ([`cache_key`]).

pub mod attribute;
pub mod block_influence;
pub mod causal_trace;
pub mod direction;
pub mod importance;
pub mod logit_lens;
pub mod patch;
pub mod probe;
pub mod refusal_direction;

use std::path::{Path, PathBuf};

use clap::{ArgMatches, FromArgMatches};
use serde_json::Value;

use crate::error::{Error, Result, WithPath};
use crate::ir::{Findings, Source};
use crate::tokenizer::Tok;

/// A registry entry: one line per method in [`REGISTRY`].
pub struct MethodInfo {
    pub name: &'static str,
    /// The method's options as a clap command (name, help, flags); the CLI adds its own flags.
    pub command: fn() -> clap::Command,
    /// The parsed options.
    pub parse: fn(&ArgMatches) -> std::result::Result<Box<dyn Locator>, clap::Error>,
    /// Side outputs the method can produce besides its findings.
    pub outputs: Outputs,
}

/// What else a method writes: a plot (SVG) and/or steering vectors (safetensors).
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs {
    pub plot: bool,
    pub vectors: bool,
}

pub const REGISTRY: &[MethodInfo] = &[
    entry::<attribute::Spec>("attribute", Outputs { plot: true, vectors: false }),
    entry::<block_influence::Spec>("block-influence", Outputs { plot: true, vectors: false }),
    entry::<causal_trace::Spec>("causal-trace", Outputs { plot: true, vectors: false }),
    entry::<direction::Spec>("direction", Outputs { plot: false, vectors: true }),
    entry::<importance::HeadSpec>("head-importance", Outputs { plot: false, vectors: false }),
    entry::<logit_lens::Spec>("logit-lens", Outputs { plot: false, vectors: false }),
    entry::<importance::NeuronSpec>("neuron-importance", Outputs { plot: false, vectors: false }),
    entry::<patch::Spec>("patch", Outputs { plot: true, vectors: false }),
    entry::<probe::Spec>("probe", Outputs { plot: false, vectors: false }),
    entry::<refusal_direction::Spec>("refusal-direction", Outputs { plot: false, vectors: true }),
];

pub fn find(name: &str) -> Option<&'static MethodInfo> {
    REGISTRY.iter().find(|m| m.name == name)
}

/// The registered names, for error messages.
pub fn names() -> String {
    REGISTRY.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
}

/// A method's options, parsed: what the registry hands out.
pub trait Method: serde::Serialize {
    /// Checks that need no model (ranges, files that must exist, small prompt sets), run before
    /// the model is loaded so that bad input fails fast.
    fn check(&self) -> Result<()> {
        Ok(())
    }
    /// Score the components.
    fn run(&self, cx: &Ctx) -> Result<Located>;
}

/// [`Method`] with its options as JSON, object-safe for the registry.
pub trait Locator {
    /// The options as parsed (defaults filled in), in their canonical serialisation.
    fn options(&self) -> Value;
    fn check(&self) -> Result<()>;
    fn run(&self, cx: &Ctx) -> Result<Located>;
}

impl<T: Method> Locator for T {
    fn options(&self) -> Value {
        serde_json::to_value(self).expect("options serialise")
    }
    fn check(&self) -> Result<()> {
        Method::check(self)
    }
    fn run(&self, cx: &Ctx) -> Result<Located> {
        Method::run(self, cx)
    }
}

const fn entry<S: Method + clap::Args + FromArgMatches + 'static>(name: &'static str, outputs: Outputs) -> MethodInfo {
    MethodInfo { name, command: command::<S>, parse: parse::<S>, outputs }
}

fn command<S: clap::Args>() -> clap::Command {
    S::augment_args(clap::Command::new("method"))
}

fn parse<S: Method + FromArgMatches + 'static>(m: &ArgMatches) -> std::result::Result<Box<dyn Locator>, clap::Error> {
    Ok(Box::new(S::from_arg_matches(m)?))
}

/// What a method runs on.
pub struct Ctx<'a> {
    pub loaded: &'a crate::io::Loaded,
    /// The model's provenance (its weights' hash) for the findings.
    pub source: Source,
    /// Whether long work may draw progress bars.
    pub progress: bool,
    /// Whether to draw the plot (methods with `outputs.plot`).
    pub plot: bool,
}

impl Ctx<'_> {
    pub fn model(&self) -> &crate::model::Model {
        &self.loaded.model
    }
    pub fn tok(&self) -> Result<&Tok> {
        self.loaded.tok()
    }
}

/// What a method produced.
pub struct Located {
    pub findings: Findings,
    /// Steering vectors, one per layer (`direction`).
    pub vectors: Option<direction::Vectors>,
    /// The plot, when asked for and the method draws one.
    pub plot: Option<String>,
    /// A report for people (tables, timings), printed on stderr by the CLI.
    pub report: String,
    /// Summary entries too bulky for the terminal (e.g. per-fact grids); they stay in the file.
    pub hide: &'static [&'static str],
}

impl Located {
    pub fn new(findings: Findings) -> Located {
        Located { findings, vectors: None, plot: None, report: String::new(), hide: &[] }
    }
}

/// Parse a method's options from a `[[locate]]` table: each key `k` becomes the flag `--k`
/// (underscores as dashes), `true` a bare flag, `false` nothing, an array the flag repeated,
/// and a string naming a file relative to `base` (optionally `FILE:FIELD`) the file's absolute
/// path. Errors are clap's first line.
pub fn spec_from_table(info: &MethodInfo, table: &toml::Table, base: &Path) -> Result<Box<dyn Locator>> {
    let mut argv: Vec<String> = vec![];
    let scalar = |k: &str, v: &toml::Value| -> Result<String> {
        Ok(match v {
            toml::Value::String(s) => match resolve_file(base, s) {
                Some((path, field)) => format!("{}{field}", path.display()),
                None => s.clone(),
            },
            toml::Value::Integer(n) => n.to_string(),
            toml::Value::Float(x) => x.to_string(),
            other => return Err(Error::invalid(format!("`{k}`: expected a string, number or list of them, got {}", other.type_str()))),
        })
    };
    for (k, v) in table {
        let flag = format!("--{}", k.replace('_', "-"));
        match v {
            toml::Value::Boolean(true) => argv.push(flag),
            toml::Value::Boolean(false) => {}
            toml::Value::Array(xs) => {
                for x in xs {
                    argv.push(format!("{flag}={}", scalar(k, x)?));
                }
            }
            v => argv.push(format!("{flag}={}", scalar(k, v)?)),
        }
    }
    let matches = (info.command)().no_binary_name(true).try_get_matches_from(&argv).map_err(|e| clap_error(info, &e))?;
    (info.parse)(&matches).map_err(|e| clap_error(info, &e))
}

/// Clap's message up to its usage lines, on one line.
fn clap_error(info: &MethodInfo, e: &clap::Error) -> Error {
    let msg = e.render().to_string();
    let what: Vec<&str> = msg.lines().map(str::trim).take_while(|l| !l.starts_with("Usage:")).filter(|l| !l.is_empty()).collect();
    Error::invalid(format!("{} (see `mechc locate {} --help`)", what.join(" ").trim_start_matches("error: "), info.name))
}

/// A string naming an existing file (optionally `FILE:FIELD`) relative to `base`: the file
/// (absolute) and the `:FIELD` suffix.
fn resolve_file(base: &Path, s: &str) -> Option<(PathBuf, String)> {
    let abs = |p: PathBuf| p.canonicalize().ok().filter(|p| p.is_file());
    let rel = |s: &str| if Path::new(s).is_relative() { base.join(s) } else { PathBuf::from(s) };
    if let Some(p) = abs(rel(s)) {
        return Some((p, String::new()));
    }
    let (head, field) = s.rsplit_once(':')?;
    abs(rel(head)).map(|p| (p, format!(":{field}")))
}

/// The findings cache key of a method run: its name, its options as parsed (every string that
/// names an existing file, or `FILE:FIELD`, replaced by the file's SHA-256, so the key does not
/// depend on paths or the working directory), the model's hash and the mechc version.
pub fn cache_key(method: &str, spec: &dyn Locator, model_sha256: &str) -> Result<String> {
    fn hash_files(v: &mut Value) -> Result<()> {
        match v {
            Value::String(s) => {
                if let Some((path, field)) = resolve_file(Path::new("."), s) {
                    *s = format!("sha256:{}{field}", crate::io::sha256_file(&path)?);
                }
            }
            Value::Array(xs) => xs.iter_mut().try_for_each(hash_files)?,
            Value::Object(m) => m.values_mut().try_for_each(hash_files)?,
            _ => {}
        }
        Ok(())
    }
    let mut options = spec.options();
    hash_files(&mut options)?;
    let key = serde_json::json!({"method": method, "options": options, "model": model_sha256, "mechc": env!("CARGO_PKG_VERSION")});
    Ok(crate::ir::findings::sha256_bytes(key.to_string().as_bytes()))
}

/// The first `tokens` tokens of a plain-text file (CRLF normalised to LF; 0 = all). Only a
/// prefix of the text is tokenized when that gives enough tokens (WikiText-2 test is 1.3 MB).
pub fn text_ids(tok: &Tok, path: &Path, tokens: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_path(path)?.replace("\r\n", "\n");
    let mut chars = if tokens == 0 { text.len() } else { tokens.saturating_mul(8) };
    loop {
        let mut end = chars.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut ids = tok.encode(&text[..end], false)?;
        if tokens == 0 || ids.len() > tokens || end == text.len() {
            // Drop the last token of a cut prefix: it may be a word cut in half.
            if end < text.len() {
                ids.pop();
            }
            if tokens > 0 {
                ids.truncate(tokens);
            }
            if ids.len() < 2 {
                return Err(Error::bad_file(path, format!("has {} token(s); need at least 2", ids.len())));
            }
            return Ok(ids);
        }
        chars = chars.saturating_mul(2);
    }
}

/// A file the options name must exist (checked before the model loads).
pub(crate) fn require_file(path: &Path) -> Result<()> {
    if path.is_file() {
        Ok(())
    } else {
        Err(Error::bad_file(path, "no such file"))
    }
}

/// `--layers` sorted and deduplicated, all layers when empty; out-of-range layers are an error.
pub(crate) fn layer_list(layers: &[usize], n_layers: usize) -> Result<Vec<usize>> {
    let mut v = if layers.is_empty() { (0..n_layers).collect() } else { layers.to_vec() };
    v.sort_unstable();
    v.dedup();
    match v.iter().find(|&&l| l >= n_layers) {
        Some(l) => Err(Error::invalid(format!("--layers: layer {l} is out of range (the model has {n_layers} layers: 0..{})", n_layers - 1))),
        None => Ok(v),
    }
}

/// The first token of an answer given as `flag TEXT`.
pub(crate) fn first_token(tok: &Tok, flag: &str, text: &str) -> Result<u32> {
    match tok.encode(text, false)?.first() {
        Some(&t) => Ok(t),
        None => Err(Error::invalid(format!("{flag} {text:?} has no tokens"))),
    }
}

/// A progress bar fed by a method's `(done, total)` callback.
pub(crate) fn bar(what: &str, show: bool) -> indicatif::ProgressBar {
    crate::progress::bar(0, what, show)
}

pub(crate) fn tick(bar: &indicatif::ProgressBar) -> impl FnMut(usize, usize) + '_ {
    |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    }
}
