//! Checkpoint input and output: HF directories, GGUF import, safetensors, atomic output dirs.
//!
//! [`load`] accepts what a `MODEL` argument may name: an HF directory, or a `.gguf` file that is
//! imported once into a cache directory keyed by the file's SHA-256.

pub mod atomic;
pub mod cache;
pub mod control_vector;
pub mod gguf;
pub mod gguf_export;
pub mod gguf_tokenizer;
pub mod gguf_write;
pub mod hf;
pub mod st;

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result, WithPath};
use crate::model::Model;
use crate::tokenizer::Tok;

/// A loaded model with its tokenizer and where it came from.
pub struct Loaded {
    pub model: Model,
    /// `None` when the directory has no tokenizer.json (e.g. a random test model).
    pub tok: Option<Tok>,
    /// The HF directory the weights were read from (the import cache for a GGUF).
    pub dir: PathBuf,
    /// The storage dtype of the weights on disk.
    pub stored_dtype: candle_core::DType,
}

/// The cache root (GGUF imports, findings, covariances): see [`cache_root`].
pub fn cache_dir() -> PathBuf {
    cache_root().0
}

/// The cache root and why it is that one. One rule for the scripts and for mechc run by hand:
/// `$MECHC_CACHE` if set; else the `.cache/` of the git checkout this binary was built from, while
/// that checkout exists (where the scripts put the models and venv, and what they point
/// `MECHC_CACHE` at: `scripts/cache_dir.sh`); else `$XDG_CACHE_HOME/mechc`, else `~/.cache/mechc`
/// (a binary built outside a checkout, e.g. from a package).
pub fn cache_root() -> (PathBuf, &'static str) {
    if let Some(p) = std::env::var_os("MECHC_CACHE").filter(|p| !p.is_empty()) {
        return (PathBuf::from(p), "$MECHC_CACHE");
    }
    let checkout = Path::new(env!("CARGO_MANIFEST_DIR"));
    if checkout.join(".git").exists() && checkout.join("Cargo.toml").is_file() {
        return (checkout.join(".cache"), "the .cache/ of the checkout mechc was built from (set MECHC_CACHE to move it)");
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME").filter(|p| !p.is_empty()) {
        return (PathBuf::from(p).join("mechc"), "$XDG_CACHE_HOME/mechc");
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    (home.join(".cache").join("mechc"), "~/.cache/mechc")
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_path(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_path(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

pub fn is_gguf(path: &Path) -> bool {
    path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The HF directory for a MODEL argument, importing a GGUF into the cache on first use.
pub fn resolve(path: &Path, show_progress: bool) -> Result<PathBuf> {
    if !path.exists() {
        return Err(Error::bad_file(path, "no such file or directory"));
    }
    if path.is_dir() {
        return Ok(path.to_path_buf());
    }
    if !is_gguf(path) {
        return Err(Error::bad_file(path, "expected an HF model directory or a .gguf file"));
    }
    let hash = sha256_file(path)?;
    let dir = cache_dir().join("gguf").join(&hash[..16]);
    if dir.join("config.json").exists() {
        log::info!("using the import of {} cached in {}", path.display(), dir.display());
        cache::touch(&dir);
        return Ok(dir);
    }
    log::info!("importing {} into {}", path.display(), dir.display());
    match gguf::import(path, &dir, candle_core::DType::F32, false, show_progress) {
        // Another process imported the same file meanwhile (directories appear whole).
        Err(_) if dir.join("config.json").exists() => Ok(dir),
        Ok(d) => {
            cache::record_gguf_source(&d, path, &hash);
            Ok(d)
        }
        other => other,
    }
}

impl Loaded {
    /// The tokenizer, or an error naming the directory that lacks one.
    pub fn tok(&self) -> Result<&Tok> {
        self.tok.as_ref().ok_or_else(|| Error::bad_file(self.dir.join("tokenizer.json"), "missing: this model has no tokenizer"))
    }
}

pub fn load(path: &Path, show_progress: bool) -> Result<Loaded> {
    let dir = resolve(path, show_progress)?;
    let shards = hf::Shards::open(&dir)?;
    let model = hf::load_from_shards(&dir, &shards, show_progress)?;
    let stored_dtype = shards.dtype()?;
    drop(shards);
    let tok = if dir.join("tokenizer.json").exists() { Some(Tok::from_dir(&dir)?) } else { None };
    Ok(Loaded { model, tok, dir, stored_dtype })
}
