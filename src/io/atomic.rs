//! Output directories that appear whole or not at all: everything is written into a temporary
//! sibling directory which is renamed into place on success and removed on failure.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result, WithPath};

pub struct OutDir {
    target: PathBuf,
    tmp: PathBuf,
    force: bool,
    done: bool,
}

impl OutDir {
    /// Refuses an existing `target` unless `force`, and any target that is, contains or lies
    /// inside one of `inputs`.
    pub fn create(target: &Path, force: bool, inputs: &[&Path]) -> Result<OutDir> {
        let abs = absolute(target)?;
        for input in inputs {
            let inp = absolute(input)?;
            if abs == inp || abs.starts_with(&inp) || inp.starts_with(&abs) {
                return Err(Error::output(target, format!("the output would overwrite the input {}", input.display())));
            }
        }
        if target.exists() && !force {
            return Err(Error::output(target, "already exists (pass --force to replace it)"));
        }
        let parent = abs.parent().ok_or_else(|| Error::output(target, "has no parent directory"))?;
        std::fs::create_dir_all(parent).with_path(parent)?;
        let name = abs.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = parent.join(format!(".{name}.mechc-tmp-{}", std::process::id()));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).with_path(&tmp)?;
        }
        std::fs::create_dir(&tmp).with_path(&tmp)?;
        Ok(OutDir { target: abs, tmp, force, done: false })
    }

    /// Where to write the files.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    pub fn target(&self) -> &Path {
        &self.target
    }

    /// Move the finished directory into place.
    pub fn commit(mut self) -> Result<PathBuf> {
        make_readable(&self.tmp)?;
        if self.target.exists() {
            if !self.force {
                return Err(Error::output(&self.target, "appeared while we were writing; left untouched"));
            }
            let old = self.tmp.with_extension("old");
            std::fs::rename(&self.target, &old).with_path(&self.target)?;
            std::fs::rename(&self.tmp, &self.target).with_path(&self.target)?;
            let _ = remove(&old);
        } else {
            std::fs::rename(&self.tmp, &self.target).with_path(&self.target)?;
        }
        self.done = true;
        Ok(self.target.clone())
    }
}

impl Drop for OutDir {
    fn drop(&mut self) {
        if !self.done {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn remove(p: &Path) -> std::io::Result<()> {
    if p.is_dir() {
        std::fs::remove_dir_all(p)
    } else {
        std::fs::remove_file(p)
    }
}

fn absolute(p: &Path) -> Result<PathBuf> {
    // Canonicalise what exists (resolves symlinks), keep the rest as written.
    if let Ok(c) = p.canonicalize() {
        return Ok(c);
    }
    let abs = std::path::absolute(p).with_path(p)?;
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => Ok(parent.canonicalize().map(|c| c.join(name)).unwrap_or(abs.clone())),
        _ => Ok(abs),
    }
}

/// Files 0644 and directories 0755 (candle and tempfile create 0600 files).
pub fn make_readable(p: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(p).with_path(p)?;
        let mode = if meta.is_dir() { 0o755 } else { 0o644 };
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).with_path(p)?;
        if meta.is_dir() {
            for e in std::fs::read_dir(p).with_path(p)? {
                make_readable(&e.with_path(p)?.path())?;
            }
        }
    }
    Ok(())
}

/// Write one file whole or not at all: into a temporary sibling, then renamed over `path`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let abs = absolute(path)?;
    let parent = abs.parent().ok_or_else(|| Error::output(path, "has no parent directory"))?;
    std::fs::create_dir_all(parent).with_path(parent)?;
    let name = abs.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = parent.join(format!(".{name}.mechc-tmp-{}", std::process::id()));
    let res = std::fs::write(&tmp, bytes).with_path(&tmp).and_then(|_| make_readable(&tmp)).and_then(|_| {
        std::fs::rename(&tmp, &abs).with_path(&abs)
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}
