//! Reading and writing safetensors files: memory-mapped reads that validate the header against
//! the file, and deterministic writes with `__metadata__`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype as StDtype, SafeTensors};

use crate::error::{Error, Result, WithPath};

/// One memory-mapped safetensors file whose header has been validated.
pub struct StFile {
    pub path: PathBuf,
    mmap: Mmap,
}

impl StFile {
    pub fn open(path: &Path) -> Result<StFile> {
        let f = File::open(path).with_path(path)?;
        // SAFETY: the file is opened read-only; like every mmap reader we assume nobody truncates
        // it while we run.
        let mmap = unsafe { Mmap::map(&f) }.with_path(path)?;
        let st = StFile { path: path.to_path_buf(), mmap };
        st.view()?; // validate once
        Ok(st)
    }

    pub fn view(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap).map_err(|e| Error::bad_file(&self.path, format!("not a valid safetensors file: {e}")))
    }

    pub fn names(&self) -> Result<Vec<String>> {
        Ok(self.view()?.names().into_iter().map(str::to_string).collect())
    }

    pub fn metadata(&self) -> Result<Option<HashMap<String, String>>> {
        let (_, meta) = SafeTensors::read_metadata(&self.mmap)
            .map_err(|e| Error::bad_file(&self.path, format!("not a valid safetensors file: {e}")))?;
        Ok(meta.metadata().clone())
    }

    /// Drop the pages read so far from this process's memory (they are re-read from the file
    /// if touched again): a streaming reader calls this so that its resident set holds the
    /// tensor in hand, not every page of the file it has passed.
    pub fn release(&self) {
        // SAFETY: the mapping is private and read-only; MADV_DONTNEED on it only discards clean
        // pages, which later reads fault back in from the file unchanged. No reference into the
        // mapping outlives this call's callers' tensors (they are copied out by `get`).
        #[cfg(unix)]
        let _ = unsafe { self.mmap.unchecked_advise(memmap2::UncheckedAdvice::DontNeed) };
    }

    /// Load a tensor (any float dtype) as stored; `None` when absent.
    pub fn get(&self, name: &str) -> Result<Option<Tensor>> {
        let st = self.view()?;
        let view = match st.tensor(name) {
            Ok(v) => v,
            Err(safetensors::SafeTensorError::TensorNotFound(_)) => return Ok(None),
            Err(e) => return Err(Error::bad_file(&self.path, e.to_string())),
        };
        let dtype = match view.dtype() {
            StDtype::F64 => DType::F64,
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::I64 => DType::I64,
            StDtype::U32 => DType::U32,
            StDtype::U8 => DType::U8,
            other => {
                return Err(Error::bad_file(&self.path, format!("tensor `{name}` has unsupported dtype {other:?}")))
            }
        };
        let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
            .map_err(|e| Error::bad_file(&self.path, format!("tensor `{name}`: {}", crate::error::candle_msg(&e))))?;
        Ok(Some(t))
    }
}

/// Write tensors (sorted by name, so the file is byte-deterministic) with string metadata.
pub fn write(path: &Path, tensors: &[(String, Tensor)], metadata: &BTreeMap<String, String>) -> Result<()> {
    let mut sorted: Vec<(String, Tensor)> = tensors
        .iter()
        .map(|(n, t)| Ok((n.clone(), t.contiguous()?)))
        .collect::<Result<_>>()?;
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    let meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let meta = if meta.is_empty() { None } else { Some(meta) };
    safetensors::serialize_to_file(sorted.iter().map(|(n, t)| (n.as_str(), t)), meta, path)
        .map_err(|e| Error::bad_file(path, format!("writing safetensors: {e}")))?;
    sort_metadata_in_place(path)?;
    crate::io::atomic::make_readable(path)?;
    Ok(())
}

/// The safetensors crate writes `__metadata__` from a HashMap, in random order; rewrite the
/// header with the keys sorted (same length: same keys and values, only the order changes) so
/// the same tensors and metadata always give the same bytes.
fn sort_metadata_in_place(path: &Path) -> Result<()> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new().read(true).write(true).open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len) as usize;
    let mut header = vec![0u8; n];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let mut v: serde_json::Value =
        serde_json::from_slice(&header).map_err(|e| Error::bad_file(path, format!("header we just wrote: {e}")))?;
    let Some(serde_json::Value::Object(meta)) = v.get_mut("__metadata__") else { return Ok(()) };
    meta.sort_keys();
    let mut out = serde_json::to_vec(&v).map_err(|e| Error::bad_file(path, e.to_string()))?;
    if out.len() > n {
        return Err(Error::bad_file(path, "sorted header is longer than the original"));
    }
    out.resize(n, b' ');
    f.seek(SeekFrom::Start(8)).map_err(|e| Error::io(path, e))?;
    f.write_all(&out).map_err(|e| Error::io(path, e))?;
    Ok(())
}

/// Parse a dtype name as used on the command line and in config.json.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        _ => Err(Error::invalid(format!("unknown dtype `{s}` (f32, f16, bf16)"))),
    }
}

pub fn torch_dtype_name(d: DType) -> &'static str {
    match d {
        DType::F16 => "float16",
        DType::BF16 => "bfloat16",
        _ => "float32",
    }
}
