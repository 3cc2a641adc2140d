//! A pipeline's `[[locate]]` steps: each runs a method of `locate::REGISTRY` on the pipeline's
//! model, its findings cached by content hash in `$MECHC_CACHE/findings/<key>/` so that a second
//! compile (or a dry run followed by the real one) reuses them. The key
//! ([`crate::locate::cache_key`]) covers the method, its options as parsed (a file they name
//! counts by its SHA-256, not its path), the model's weights hash and the mechc version.
//!
//! ```toml
//! [[locate]]
//! id = "bi"                      # what `select = { by = "bi", ... }` refers to (default: method)
//! method = "block-influence"
//! text = "../../shared/data/text/wikitext2-test.raw"   # = --text, resolved against this file
//! tokens = 8192                  # = --tokens 8192
//! ```

use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;

use super::pipeline::PipelineFile;
use crate::error::{Error, Result};
use crate::ir::{Findings, Source};

/// The findings of one step, and where they are cached.
#[derive(Debug, Clone, Serialize)]
pub struct StepFindings {
    pub id: String,
    pub method: String,
    /// The method's options as parsed (defaults filled in, paths resolved).
    pub options: serde_json::Value,
    /// The cache directory: `findings.json`, and `vectors.safetensors` for methods that write vectors.
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
    /// The step's vectors, if its method wrote any.
    pub fn vectors_path(&self) -> Option<PathBuf> {
        Some(self.dir.join("vectors.safetensors")).filter(|p| p.is_file())
    }
}

pub fn cache_root() -> PathBuf {
    crate::io::cache_dir().join("findings")
}

/// The steps with their options parsed and their cache keys: everything about them that can be
/// wrong is found here, before any step (or model) runs.
pub struct Prepared {
    steps: Vec<Step>,
}

struct Step {
    id: String,
    info: &'static crate::locate::MethodInfo,
    spec: Box<dyn crate::locate::Locator>,
    /// The options as the pipeline gives them (paths as written), for messages.
    given: String,
}

impl Prepared {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Parse and check every step's options (no model needed).
pub fn prepare(file: &PipelineFile) -> Result<Prepared> {
    let base = file.path.parent().unwrap_or(std::path::Path::new("."));
    let mut steps: Vec<Step> = vec![];
    for (i, spec) in file.pipeline.locate.iter().enumerate() {
        let field = format!("locate[{i}] ({})", spec.id());
        let at = |m: String| Error::config(&file.path, &field, m);
        if steps.iter().any(|s| s.id == spec.id()) {
            return Err(at(format!("the id `{}` is used twice (give one step `id = ...`)", spec.id())));
        }
        let info = crate::locate::find(&spec.method)
            .ok_or_else(|| at(format!("unknown method `{}` (methods: {})", spec.method, crate::locate::names())))?;
        if let Some(k) = ["model", "out", "plot", "vectors", "force"].iter().find(|k| spec.args.contains_key(**k)) {
            return Err(at(format!("`{k}` is set by the pipeline (the model is [model]; findings are cached), remove it")));
        }
        let parsed = crate::locate::spec_from_table(info, &spec.args, base).map_err(|e| at(e.to_string()))?;
        parsed.check().map_err(|e| at(e.to_string()))?;
        let given = spec.args.iter().map(|(k, v)| format!("{k} = {v}")).collect::<Vec<_>>().join(", ");
        steps.push(Step { id: spec.id().to_string(), info, spec: parsed, given });
    }
    Ok(Prepared { steps })
}

/// Run (or reuse) every step in order on the loaded model; `say` reports each.
pub fn run(file: &PipelineFile, prepared: Prepared, loaded: &crate::io::Loaded, model: &Source, progress: bool, say: &dyn Fn(String)) -> Result<Vec<StepFindings>> {
    let mut out: Vec<StepFindings> = vec![];
    for (i, Step { id, info, spec, given }) in prepared.steps.into_iter().enumerate() {
        let field = format!("locate[{i}] ({id})");
        let key = crate::locate::cache_key(info.name, spec.as_ref(), &model.sha256)?;
        let dir = cache_root().join(&key[..32]);
        let t = Instant::now();
        let cached = dir.join("findings.json").exists();
        if cached {
            say(format!("locate {id}: cached findings ({})", info.name));
            crate::io::cache::touch(&dir); // last use, for `mechc cache prune --older-than`
        } else {
            say(format!("locate {id}: running {} ({given}) ...", info.name));
            let cx = crate::locate::Ctx { loaded, source: model.clone(), progress, plot: false };
            let r = spec.run(&cx).map_err(|e| Error::config(&file.path, &field, e.to_string()))?;
            write_entry(&dir, &r)?;
        }
        let path = dir.join("findings.json");
        let findings = Findings::read(&path)?;
        out.push(StepFindings {
            id,
            method: info.name.to_string(),
            options: spec.options(),
            sha256: crate::io::sha256_file(&path)?,
            dir,
            cached,
            findings,
            seconds: t.elapsed().as_secs_f64(),
        });
        if !cached {
            say(format!("locate {}: {} scores in {:.1} s", out[i].id, out[i].findings.scores.len(), out[i].seconds));
        }
    }
    Ok(out)
}

/// Write a cache entry into a temporary sibling of `dir`, renamed into place when whole.
fn write_entry(dir: &std::path::Path, r: &crate::locate::Located) -> Result<()> {
    let tmp = crate::io::atomic::OutDir::create(dir, true, &[])?;
    r.findings.write(&tmp.path().join("findings.json"))?;
    if let Some(v) = &r.vectors {
        v.write(&tmp.path().join("vectors.safetensors"))?;
    }
    match tmp.commit() {
        Ok(_) => Ok(()),
        // Another compile cached the same step meanwhile.
        Err(_) if dir.join("findings.json").exists() => Ok(()),
        Err(e) => Err(e),
    }
}
