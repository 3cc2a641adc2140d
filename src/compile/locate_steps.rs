//! A pipeline's `[[locate]]` steps: each is a `mechc locate METHOD` run on the pipeline's model,
//! its findings cached by content hash in `$MECHC_CACHE/findings/<key>/` so that a second
//! compile (or a dry run followed by the real one) reuses them. The key covers the method, its
//! flags (a file named by a flag counts by its SHA-256, not its path), the model's weights hash
//! and the mechc version.
//!
//! ```toml
//! [[locate]]
//! id = "bi"                      # what `select = { by = "bi", ... }` refers to (default: method)
//! method = "block-influence"
//! text = "../../shared/data/wikitext-2/wiki.train.raw"   # = --text, resolved against this file
//! tokens = 8192                  # = --tokens 8192
//! ```

use std::path::{Path, PathBuf};
use std::time::Instant;

use clap::Parser;
use serde::Serialize;

use super::pipeline::{LocateSpec, PipelineFile};
use crate::error::{Error, Result};
use crate::ir::{findings::sha256_bytes, Findings, Source};

/// Flags the step runner sets itself.
const RESERVED: [&str; 4] = ["model", "out", "vectors", "force"];

/// The findings of one step, and where they are cached.
#[derive(Debug, Clone, Serialize)]
pub struct StepFindings {
    pub id: String,
    pub method: String,
    /// The method's flags as run (after `--model MODEL`), paths resolved.
    pub args: Vec<String>,
    /// The cache directory: `findings.json`, and `vectors.safetensors` for `direction`.
    pub dir: PathBuf,
    /// SHA-256 of `findings.json`.
    pub sha256: String,
    /// Whether the findings came from the cache (not in the manifest: output stays identical).
    #[serde(skip)]
    pub cached: bool,
    #[serde(skip)]
    pub findings: Findings,
    #[serde(skip)]
    pub seconds: f64,
}

impl StepFindings {
    pub fn findings_path(&self) -> PathBuf {
        self.dir.join("findings.json")
    }
    pub fn vectors_path(&self) -> PathBuf {
        self.dir.join("vectors.safetensors")
    }
}

pub fn cache_root() -> PathBuf {
    crate::io::cache_dir().join("findings")
}

/// Run (or reuse) every step in order; `say` reports each.
pub fn run(file: &PipelineFile, model_path: &Path, say: &dyn Fn(String)) -> Result<Vec<StepFindings>> {
    let steps = &file.pipeline.locate;
    let mut out: Vec<StepFindings> = vec![];
    if steps.is_empty() {
        return Ok(out);
    }
    let model_hash = Source::model(model_path)?.sha256;
    for (i, spec) in steps.iter().enumerate() {
        let field = format!("locate[{i}] ({})", spec.id());
        if out.iter().any(|s| s.id == spec.id()) {
            return Err(Error::config(&file.path, field, format!("the id `{}` is used twice (give one step `id = ...`)", spec.id())));
        }
        let (args, keyed) = to_args(file, spec).map_err(|m| Error::config(&file.path, &field, m))?;
        let key = serde_json::json!({"method": spec.method, "args": keyed, "model": model_hash, "mechc": env!("CARGO_PKG_VERSION")});
        let dir = cache_root().join(&sha256_bytes(key.to_string().as_bytes())[..32]);
        let t = Instant::now();
        let cached = dir.join("findings.json").exists();
        if cached {
            say(format!("locate {}: cached findings in {}", spec.id(), dir.display()));
            crate::io::cache::touch(&dir); // last use, for `mechc cache prune --older-than`
        } else {
            say(format!("locate {}: running `mechc locate {} {}` ...", spec.id(), spec.method, args.join(" ")));
            run_one(spec, model_path, &args, &dir).map_err(|e| Error::config(&file.path, &field, e))?;
        }
        let path = dir.join("findings.json");
        let findings = Findings::read(&path)?;
        out.push(StepFindings {
            id: spec.id().to_string(),
            method: spec.method.clone(),
            args,
            sha256: crate::io::sha256_file(&path)?,
            dir,
            cached,
            findings,
            seconds: t.elapsed().as_secs_f64(),
        });
        if !cached {
            say(format!("locate {}: {} scores in {:.1} s", spec.id(), out[i].findings.scores.len(), out[i].seconds));
        }
    }
    Ok(out)
}

/// The step's table as command-line flags, and the same flags with every file replaced by its
/// SHA-256 (the cache key: independent of paths and the working directory).
fn to_args(file: &PipelineFile, spec: &LocateSpec) -> std::result::Result<(Vec<String>, Vec<String>), String> {
    let (mut args, mut keyed) = (vec![], vec![]);
    let scalar = |k: &str, v: &toml::Value| -> std::result::Result<(String, String), String> {
        Ok(match v {
            toml::Value::String(s) => match resolve_file(file, s) {
                Some((path, field)) => {
                    let hash = crate::io::sha256_file(&path).map_err(|e| e.to_string())?;
                    (format!("{}{field}", path.display()), format!("{hash}{field}"))
                }
                None => (s.clone(), s.clone()),
            },
            toml::Value::Integer(n) => (n.to_string(), n.to_string()),
            toml::Value::Float(x) => (x.to_string(), x.to_string()),
            other => return Err(format!("`{k}`: expected a string, number or list of them, got {}", other.type_str())),
        })
    };
    for (k, v) in &spec.args {
        if RESERVED.contains(&k.as_str()) {
            return Err(format!("`{k}` is set by the pipeline (the model is [model]; findings are cached), remove it"));
        }
        let flag = format!("--{}", k.replace('_', "-"));
        let value = match v {
            toml::Value::Boolean(true) => None,
            toml::Value::Boolean(false) => continue,
            toml::Value::Array(xs) => {
                let parts = xs.iter().map(|x| scalar(k, x)).collect::<std::result::Result<Vec<_>, _>>()?;
                let (a, b): (Vec<String>, Vec<String>) = parts.into_iter().unzip();
                Some((a.join(","), b.join(",")))
            }
            v => Some(scalar(k, v)?),
        };
        args.push(flag.clone());
        keyed.push(flag);
        if let Some((a, b)) = value {
            args.push(a);
            keyed.push(b);
        }
    }
    Ok((args, keyed))
}

/// A string naming an existing file (optionally `FILE:FIELD`) relative to the pipeline file:
/// the file (absolute) and the `:FIELD` suffix.
fn resolve_file(file: &PipelineFile, s: &str) -> Option<(PathBuf, String)> {
    let abs = |p: PathBuf| p.canonicalize().ok().filter(|p| p.is_file());
    if let Some(p) = abs(file.resolve(Path::new(s))) {
        return Some((p, String::new()));
    }
    let (head, field) = s.rsplit_once(':')?;
    abs(file.resolve(Path::new(head))).map(|p| (p, format!(":{field}")))
}

/// Run `mechc locate` into a temporary sibling of `dir`, renamed into place when done.
fn run_one(spec: &LocateSpec, model: &Path, args: &[String], dir: &Path) -> std::result::Result<(), String> {
    let tmp = crate::io::atomic::OutDir::create(dir, true, &[]).map_err(|e| e.to_string())?;
    let mut argv: Vec<String> = vec!["mechc".into(), "locate".into(), spec.method.clone()];
    argv.extend(["--model".into(), model.display().to_string()]);
    argv.extend(["--out".into(), tmp.path().join("findings.json").display().to_string()]);
    if spec.method == "direction" {
        argv.extend(["--vectors".into(), tmp.path().join("vectors.safetensors").display().to_string()]);
    }
    argv.extend(args.iter().cloned());
    // Clap's first line says what is wrong (the rest is usage): keep errors one line.
    let cli = crate::cli::Cli::try_parse_from(&argv).map_err(|e| {
        let msg = e.render().to_string();
        let first = msg.lines().next().unwrap_or_default().trim_start_matches("error: ").to_string();
        format!("{first} (see `mechc locate {} --help`)", spec.method)
    })?;
    let crate::cli::Command::Locate(a) = cli.command else { unreachable!("argv starts with `locate`") };
    // Quiet (no findings printed: a neuron method has tens of thousands of lines), which also
    // means no progress bars; the caller says what runs.
    let g = crate::cli::Global { quiet: true, verbose: 0, no_progress: true };
    crate::cli::locate::run(a, &g).map_err(|e| format!("{e:#}"))?;
    match tmp.commit() {
        Ok(_) => Ok(()),
        // Another compile cached the same step meanwhile.
        Err(_) if dir.join("findings.json").exists() => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
