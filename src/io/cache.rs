//! What is in the cache ([`super::cache_dir`]) and how to prune it: GGUF imports
//! (`gguf/<sha256 prefix>/`), `[[locate]]` findings (`findings/<key>/`) and ROME/MEMIT covariances
//! (`rome-cov/<key>.safetensors`). Every entry is keyed by content, so deleting one only costs
//! the time to make it again. An entry's last use is its modification time: mechc touches an
//! entry whenever it reuses it ([`touch`]).
//!
//! The scripts keep their downloads in the same root (`models/`, `venv/`, `demo/`, `bench/`);
//! those are listed with their sizes but never pruned by mechc.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::error::{Error, Result, WithPath};

/// The kinds of entries mechc makes (and may prune).
pub const KINDS: &[&str] = &["gguf", "findings", "rome-cov"];

#[derive(Debug, Clone, Serialize)]
pub struct Entry {
    /// `gguf`, `findings` or `rome-cov`.
    pub kind: String,
    pub path: PathBuf,
    /// What it is, e.g. "import of SmolLM2-135M-Instruct.Q4_1.gguf".
    pub what: String,
    pub bytes: u64,
    /// Seconds since the Unix epoch of the last use (modification time).
    pub last_used: u64,
}

/// A folder of the cache root mechc does not manage (the scripts' downloads and outputs).
#[derive(Debug, Clone, Serialize)]
pub struct Other {
    pub path: PathBuf,
    pub what: String,
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Listing {
    pub root: PathBuf,
    /// Why this root (the rule of [`super::cache_root`]).
    pub why: String,
    pub entries: Vec<Entry>,
    pub others: Vec<Other>,
}

/// Mark an entry as used now (its modification time); best effort.
pub fn touch(path: &Path) {
    if let Ok(f) = std::fs::File::open(path) {
        let _ = f.set_modified(SystemTime::now());
    }
}

/// Total size of the files under `p` (symlinks not followed).
pub fn size(p: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(p) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(p).map(|rd| rd.filter_map(|e| e.ok()).map(|e| size(&e.path())).sum()).unwrap_or(0)
}

fn mtime(p: &Path) -> u64 {
    std::fs::metadata(p)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_secs())
}

/// What a GGUF import is: the file it was imported from (recorded at import), else the name the
/// safetensors metadata keeps.
fn describe_gguf(dir: &Path) -> String {
    let recorded = std::fs::read_to_string(dir.join(SOURCE_FILE)).ok().and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    if let Some(src) = recorded.as_ref().and_then(|v| v["source"].as_str().map(str::to_string)) {
        return format!("import of {src}");
    }
    let name = super::st::StFile::open(&dir.join("model.safetensors"))
        .ok()
        .and_then(|f| f.metadata().ok().flatten())
        .and_then(|m| m.get("mechc.source").cloned());
    match name {
        Some(n) => format!("import of {n}"),
        None => "GGUF import (source not recorded)".into(),
    }
}

fn describe_findings(dir: &Path) -> String {
    let v = std::fs::read_to_string(dir.join("findings.json")).ok().and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok());
    match v {
        Some(v) => {
            let method = v["method"].as_str().unwrap_or("?");
            let model = v["model"]["file"].as_str().map(|f| Path::new(f).file_name().map_or(f.to_string(), |n| n.to_string_lossy().into_owned()));
            let vectors = if dir.join("vectors.safetensors").exists() { " + vectors" } else { "" };
            match model {
                Some(m) => format!("{method} findings{vectors} of {m}"),
                None => format!("{method} findings{vectors}"),
            }
        }
        None => "findings (unreadable findings.json)".into(),
    }
}

fn describe_cov(file: &Path) -> String {
    let meta = super::st::StFile::open(file).ok().and_then(|f| f.metadata().ok().flatten());
    match meta.as_ref().and_then(|m| m.get("layer").cloned()) {
        Some(l) => format!(
            "covariance E[kkᵀ] of blocks.{l}.mlp.hook_post over {} tokens",
            meta.as_ref().and_then(|m| m.get("count").cloned()).unwrap_or_else(|| "?".into())
        ),
        None => "covariance (no metadata)".into(),
    }
}

/// The file in a cached GGUF import that records where it came from.
pub const SOURCE_FILE: &str = "mechc-cache.json";

/// Record in a fresh cache import which file it came from (for `mechc cache`); best effort.
pub fn record_gguf_source(dir: &Path, source: &Path, sha256: &str) {
    let abs = source.canonicalize().or_else(|_| std::path::absolute(source)).unwrap_or_else(|_| source.to_path_buf());
    let v = serde_json::json!({"kind": "gguf", "source": abs.display().to_string(), "sha256": sha256});
    let _ = super::atomic::write_file(&dir.join(SOURCE_FILE), format!("{v}\n").as_bytes());
}

/// Every entry under `root` (sorted by kind, then last use, newest first) and the other folders.
pub fn list(root: &Path, why: &str) -> Result<Listing> {
    let mut entries = vec![];
    let mut others = vec![];
    if root.is_dir() {
        for e in std::fs::read_dir(root).with_path(root)? {
            let e = e.with_path(root)?;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if KINDS.contains(&name.as_str()) {
                if !path.is_dir() {
                    continue;
                }
                for x in std::fs::read_dir(&path).with_path(&path)? {
                    let x = x.with_path(&path)?;
                    let xname = x.file_name().to_string_lossy().into_owned();
                    // Temporaries of writes in progress (or killed) are not entries.
                    if xname.starts_with('.') {
                        continue;
                    }
                    let p = x.path();
                    let what = match name.as_str() {
                        "gguf" => describe_gguf(&p),
                        "findings" => describe_findings(&p),
                        _ => describe_cov(&p),
                    };
                    entries.push(Entry { kind: name.clone(), bytes: size(&p), last_used: mtime(&p), what, path: p });
                }
            } else if !name.starts_with('.') {
                let what = match name.as_str() {
                    "models" => "registry models (scripts/fetch_models.sh; configs point here)",
                    "venv" => "Python reference venv (scripts/setup_python.sh)",
                    "demo" | "bench" => "outputs of scripts/demo.sh / bench.sh",
                    _ => "not made by mechc",
                };
                others.push(Other { bytes: size(&path), path, what: what.into() });
            }
        }
    }
    entries.sort_by(|a, b| a.kind.cmp(&b.kind).then(b.last_used.cmp(&a.last_used)).then(a.path.cmp(&b.path)));
    others.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(Listing { root: root.to_path_buf(), why: why.to_string(), entries, others })
}

/// Which entries a prune removes.
#[derive(Debug, Clone, Default)]
pub struct PruneFilter {
    /// Only entries last used more than this many days ago.
    pub older_than_days: Option<f64>,
    /// Only entries of this kind.
    pub kind: Option<String>,
}

impl PruneFilter {
    pub fn matches(&self, e: &Entry, now: u64) -> bool {
        self.kind.as_ref().is_none_or(|k| *k == e.kind)
            && self.older_than_days.is_none_or(|d| (now.saturating_sub(e.last_used) as f64) > d * 86400.0)
    }
}

/// Remove the matching entries (unless `dry_run`); returns them. An entry is first renamed to a
/// temporary name, so no reader ever sees half of one.
pub fn prune(listing: &Listing, filter: &PruneFilter, dry_run: bool) -> Result<Vec<Entry>> {
    if let Some(k) = &filter.kind {
        if !KINDS.contains(&k.as_str()) {
            return Err(Error::invalid(format!("--kind {k}: expected one of {}", KINDS.join(", "))));
        }
    }
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let chosen: Vec<Entry> = listing.entries.iter().filter(|e| filter.matches(e, now)).cloned().collect();
    if dry_run {
        return Ok(chosen);
    }
    for e in &chosen {
        let name = e.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let doomed = e.path.with_file_name(format!(".{name}.mechc-prune-{}", std::process::id()));
        std::fs::rename(&e.path, &doomed).with_path(&e.path)?;
        let r = if doomed.is_dir() { std::fs::remove_dir_all(&doomed) } else { std::fs::remove_file(&doomed) };
        r.with_path(&doomed)?;
    }
    Ok(chosen)
}

/// Bytes for people: 1.2 kB, 538.1 MB, 5.6 GB.
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    match b {
        b if b >= 1e9 => format!("{:.1} GB", b / 1e9),
        b if b >= 1e6 => format!("{:.1} MB", b / 1e6),
        b if b >= 1e3 => format!("{:.1} kB", b / 1e3),
        b => format!("{b} B"),
    }
}

/// How long ago, for people: "just now", "5 min ago", "3 h ago", "12 d ago".
pub fn ago(then: u64, now: u64) -> String {
    let s = now.saturating_sub(then);
    match s {
        0..60 => "just now".into(),
        60..3600 => format!("{} min ago", s / 60),
        3600..86400 => format!("{} h ago", s / 3600),
        _ => format!("{} d ago", s / 86400),
    }
}
