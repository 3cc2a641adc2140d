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
        check(target, force, inputs)?;
        let abs = absolute(target)?;
        let parent = abs.parent().ok_or_else(|| Error::output(target, "has no parent directory"))?;
        std::fs::create_dir_all(parent).with_path(parent)?;
        let name = abs.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let tmp = tmp_sibling(parent, &name);
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
        let appeared = || Error::output(&self.target, "appeared while we were writing; left untouched");
        if self.target.exists() {
            if !self.force {
                return Err(appeared());
            }
            let old = self.tmp.with_extension("old");
            std::fs::rename(&self.target, &old).with_path(&self.target)?;
            std::fs::rename(&self.tmp, &self.target).with_path(&self.target)?;
            let _ = remove(&old);
        } else if let Err(e) = std::fs::rename(&self.tmp, &self.target) {
            // Lost a race with another writer: its whole directory is there now.
            return Err(if self.target.exists() { appeared() } else { Error::io(&self.target, e) });
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

/// A temporary name unique to this process *and* this call: two threads of one process writing
/// the same target (tests importing the same GGUF into the cache) must not share a directory.
fn tmp_sibling(parent: &Path, name: &str) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    parent.join(format!(".{name}.mechc-tmp-{}-{n}", std::process::id()))
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

/// The checks an output directory gets before any work (commands call this before loading a
/// model, so a run is never thrown away at the end): an existing `target` is refused unless
/// `force`, as is a target that is, contains or lies inside one of `inputs`, or whose nearest
/// existing ancestor is not a directory. Creates nothing.
pub fn check(target: &Path, force: bool, inputs: &[&Path]) -> Result<()> {
    check_inner(target, force, inputs, true)
}

/// [`check`] for a single output file (a trace, a report): it may lie inside an input directory
/// (a report beside the model it describes), but is never one of the inputs.
pub fn check_file(target: &Path, force: bool, inputs: &[&Path]) -> Result<()> {
    check_inner(target, force, inputs, false)
}

/// [`check_file`] for an optional output (e.g. `--report`).
pub fn check_file_opt(target: Option<&Path>, force: bool, inputs: &[&Path]) -> Result<()> {
    target.map_or(Ok(()), |t| check_file(t, force, inputs))
}

fn check_inner(target: &Path, force: bool, inputs: &[&Path], nested: bool) -> Result<()> {
    let abs = absolute(target)?;
    for input in inputs {
        let inp = absolute(input)?;
        if abs == inp || (nested && (abs.starts_with(&inp) || inp.starts_with(&abs))) {
            return Err(Error::output(target, format!("the output would overwrite the input {}", input.display())));
        }
    }
    if target.exists() && !force {
        return Err(Error::output(target, "already exists (pass --force to replace it)"));
    }
    if !nested && target.is_dir() {
        return Err(Error::output(target, "is a directory (expected a file path)"));
    }
    // The nearest existing ancestor must be a directory (the rest is created when writing).
    let mut up = abs.parent();
    while let Some(p) = up {
        if p.exists() {
            if !p.is_dir() {
                return Err(Error::output(target, format!("cannot be created: {} is not a directory", p.display())));
            }
            break;
        }
        up = p.parent();
    }
    Ok(())
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
    write_file_with(path, |w| std::io::Write::write_all(w, bytes).map_err(|e| Error::io(path, e)))
}

/// [`write_file`] for output streamed by `fill` (through a buffer): a failure in `fill`, in the
/// flush or in the rename removes the temporary and leaves `path` as it was.
pub fn write_file_with(path: &Path, fill: impl FnOnce(&mut std::io::BufWriter<std::fs::File>) -> Result<()>) -> Result<()> {
    let abs = absolute(path)?;
    let parent = abs.parent().ok_or_else(|| Error::output(path, "has no parent directory"))?;
    std::fs::create_dir_all(parent).with_path(parent)?;
    let name = abs.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = tmp_sibling(parent, &name);
    let res = (|| {
        let file = std::fs::File::create(&tmp).with_path(&tmp)?;
        let mut w = std::io::BufWriter::with_capacity(1 << 20, file);
        fill(&mut w)?;
        w.into_inner().map_err(|e| Error::io(&tmp, e.into_error()))?;
        make_readable(&tmp)?;
        std::fs::rename(&tmp, &abs).with_path(&abs)
    })();
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two threads of one process writing the same directory: each gets its own temporary, one
    /// commits, the other is told the target appeared, and the target is whole.
    #[test]
    fn concurrent_writers_of_one_target_do_not_share_a_temporary() {
        let root = std::env::temp_dir().join(format!("mechc-atomic-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let target = root.join("out");
        let barrier = std::sync::Barrier::new(2);
        let results: Vec<Result<PathBuf>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..2)
                .map(|i| {
                    let (target, barrier) = (&target, &barrier);
                    s.spawn(move || {
                        let d = OutDir::create(target, false, &[])?;
                        barrier.wait();
                        std::fs::write(d.path().join("a"), format!("{i}")).with_path(d.path())?;
                        barrier.wait();
                        d.commit()
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 1, "{results:?}");
        let err = results.iter().find_map(|r| r.as_ref().err()).unwrap().to_string();
        assert!(err.contains("appeared while we were writing"), "{err}");
        let written = std::fs::read_to_string(target.join("a")).unwrap();
        assert!(written == "0" || written == "1");
        let leftovers: Vec<_> = std::fs::read_dir(&root).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(leftovers.len(), 1, "temporaries left behind: {leftovers:?}");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
