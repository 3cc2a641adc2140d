//! GGUF export: an HF directory (or a compiled model in memory) → one GGUF file that llama.cpp
//! loads. The inverse of `gguf.rs`'s import: HF names → GGUF names (`gguf::gguf_name`), Q/K rows
//! of Llama-arch models permuted back to llama.cpp's interleaved RoPE layout (Qwen2 uses NEOX
//! RoPE and keeps HF's layout), the architecture as `{arch}.*` metadata under the names
//! llama.cpp's loader reads, and the tokenizer as `tokenizer.ggml.*` (`gguf_tokenizer.rs`).
//!
//! Types: F32, F16, BF16, Q8_0 and Q4_0 (candle's quantisers, byte for byte llama.cpp's reference
//! ones, which the interop tests check against gguf-py; a row whose length is not a multiple of
//! the block of 32 is stored F16, as llama.cpp's converter falls back). No K-quants: their
//! 256-wide blocks do not divide SmolLM2's rows and llama.cpp's converter does not write them. 1-D tensors (norms,
//! biases) stay F32, as llama.cpp's converter keeps them. Streams one tensor at a time into a
//! temporary file renamed into place: nothing is left behind on error and the input is never
//! touched; the bytes depend only on the model and the options.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Tensor};

use super::gguf_write::{Meta, TensorInfo};
use crate::error::{Error, Result};
use crate::model::{Arch, Model, ModelConfig, Proj, TensorRole};

/// The tensor type of an export (the type of its 2-D weights).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufType {
    F32,
    F16,
    BF16,
    Q8_0,
    Q4_0,
}

impl GgufType {
    pub const NAMES: &'static [&'static str] = &["f32", "f16", "bf16", "q8_0", "q4_0"];

    pub fn parse(s: &str) -> Result<GgufType> {
        match s.to_ascii_lowercase().as_str() {
            "f32" => Ok(GgufType::F32),
            "f16" => Ok(GgufType::F16),
            "bf16" => Ok(GgufType::BF16),
            "q8_0" => Ok(GgufType::Q8_0),
            "q4_0" => Ok(GgufType::Q4_0),
            other => Err(Error::invalid(format!("GGUF type `{other}` is not supported (f32, f16, bf16, q8_0, q4_0)"))),
        }
    }

    fn ggml(self) -> GgmlDType {
        match self {
            GgufType::F32 => GgmlDType::F32,
            GgufType::F16 => GgmlDType::F16,
            GgufType::BF16 => GgmlDType::BF16,
            GgufType::Q8_0 => GgmlDType::Q8_0,
            GgufType::Q4_0 => GgmlDType::Q4_0,
        }
    }

    /// `general.file_type` (llama.cpp's `llama_ftype`: ALL_F32 0, MOSTLY_F16 1, MOSTLY_Q4_0 2,
    /// MOSTLY_Q8_0 7, MOSTLY_BF16 32).
    fn file_type(self) -> u32 {
        match self {
            GgufType::F32 => 0,
            GgufType::F16 => 1,
            GgufType::Q4_0 => 2,
            GgufType::Q8_0 => 7,
            GgufType::BF16 => 32,
        }
    }
}

/// The type a tensor is stored in.
fn tensor_type(dims: &[usize], ty: GgufType) -> GgmlDType {
    if dims.len() < 2 {
        return GgmlDType::F32;
    }
    let g = ty.ggml();
    if dims.last().is_some_and(|&d| d % g.block_size() != 0) {
        GgmlDType::F16
    } else {
        g
    }
}

/// Whether GGUF (as llama.cpp reads it) can express this model; the reason if not.
pub fn check(cfg: &ModelConfig) -> Result<()> {
    arch_name(cfg).map(|_| ())
}

/// The GGUF architecture name and the checks of what GGUF (as llama.cpp reads it) can express.
fn arch_name(cfg: &ModelConfig) -> Result<&'static str> {
    if cfg.rope_scaling.is_some() {
        return Err(Error::invalid(
            "GGUF export of a model with rope_scaling (Llama 3.x frequency factors, a `rope_freqs` tensor) is not supported yet",
        ));
    }
    for (i, what) in ["attention heads", "kv heads", "MLP widths (intermediate_size)"].iter().enumerate() {
        let first = [cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size][i];
        if let Some(l) = (0..cfg.num_layers).find(|&l| {
            let (h, kv, f) = cfg.layer_shape(l);
            [h, kv, f][i] != first
        }) {
            return Err(Error::invalid(format!(
                "GGUF export needs the same {what} in every layer (layer {l} differs from layer 0): \
                 llama.cpp's llama/qwen2 loaders build every block from one value; prune uniformly to export"
            )));
        }
    }
    Ok(match cfg.arch {
        Arch::Llama => "llama",
        Arch::Qwen2 => {
            if cfg.num_heads * cfg.head_dim != cfg.hidden_size {
                return Err(Error::invalid(format!(
                    "GGUF export: llama.cpp's qwen2 architecture needs heads × head_dim = n_embd ({} × {} ≠ {}); \
                     a head-pruned Qwen2 cannot be exported as GGUF",
                    cfg.num_heads, cfg.head_dim, cfg.hidden_size
                )));
            }
            if cfg.o_bias || cfg.mlp_bias {
                return Err(Error::invalid(
                    "GGUF export: llama.cpp's qwen2 architecture has no attn_output/ffn biases (added by mean compensation); \
                     compile without `compensate` to export this model as GGUF",
                ));
            }
            "qwen2"
        }
    })
}

/// `{arch}.*` and `general.*` metadata.
fn arch_meta(cfg: &ModelConfig, ty: GgufType) -> Result<Vec<(String, Meta)>> {
    let a = arch_name(cfg)?;
    let k = |s: &str| format!("{a}.{s}");
    let u = |x: usize| Meta::U32(x as u32);
    let mut m = vec![
        ("general.architecture".to_string(), Meta::str(a)),
        ("general.file_type".to_string(), Meta::U32(ty.file_type())),
        ("general.quantization_version".to_string(), Meta::U32(2)),
        (k("vocab_size"), u(cfg.vocab_size)),
        (k("context_length"), u(cfg.max_position_embeddings)),
        (k("embedding_length"), u(cfg.hidden_size)),
        (k("block_count"), u(cfg.num_layers)),
        (k("feed_forward_length"), u(cfg.intermediate_size)),
        (k("attention.head_count"), u(cfg.num_heads)),
        (k("attention.head_count_kv"), u(cfg.num_kv_heads)),
        (k("rope.freq_base"), Meta::F32(cfg.rope_theta as f32)),
        (k("rope.dimension_count"), u(cfg.head_dim)),
        (k("attention.layer_norm_rms_epsilon"), Meta::F32(cfg.rms_norm_eps as f32)),
    ];
    if cfg.head_dim * cfg.num_heads != cfg.hidden_size {
        m.push((k("attention.key_length"), u(cfg.head_dim)));
        m.push((k("attention.value_length"), u(cfg.head_dim)));
    }
    Ok(m)
}

/// llama.cpp's interleaved RoPE row order from HF's rotate-half order (the inverse of the
/// import's un-permutation): rows viewed as (heads, 2, head_dim/2) → (heads, head_dim/2, 2).
fn permute_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let rest: usize = dims[1..].iter().product();
    let hd = dims[0] / n_head;
    Ok(t.reshape((n_head, 2, hd / 2, rest))?.transpose(1, 2)?.contiguous()?.reshape(dims)?)
}

/// Write one tensor in its GGUF type and layout, converting a slice at a time (no whole-tensor
/// byte copy).
fn write_tensor<W: std::io::Write>(
    w: &mut super::gguf_write::Counted<'_, W>,
    role: TensorRole,
    t: &Tensor,
    cfg: &ModelConfig,
    dtype: GgmlDType,
) -> Result<()> {
    let mut t = t.to_dtype(DType::F32)?;
    if cfg.arch == Arch::Llama {
        match role {
            TensorRole::Weight(_, Proj::Q) | TensorRole::Bias(_, Proj::Q) => t = permute_rows(&t, cfg.num_heads)?,
            TensorRole::Weight(_, Proj::K) | TensorRole::Bias(_, Proj::K) => t = permute_rows(&t, cfg.num_kv_heads)?,
            _ => {}
        }
    }
    let t = t.contiguous()?;
    if !matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        return w.put(&QTensor::quantize(&t, dtype)?.data()?);
    }
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        return Err(Error::invalid("GGUF export reads tensors on the CPU"));
    };
    let (start, end) = layout.contiguous_offsets().ok_or_else(|| Error::invalid("a non-contiguous tensor after contiguous()"))?;
    let all = &cpu.as_slice::<f32>()?[start..end];
    let mut buf = Vec::with_capacity(1 << 18);
    for chunk in all.chunks(1 << 16) {
        buf.clear();
        match dtype {
            GgmlDType::F32 => chunk.iter().for_each(|x| buf.extend(x.to_le_bytes())),
            GgmlDType::F16 => chunk.iter().for_each(|x| buf.extend(half::f16::from_f32(*x).to_le_bytes())),
            _ => chunk.iter().for_each(|x| buf.extend(half::bf16::from_f32(*x).to_le_bytes())),
        }
        w.put(&buf)?;
    }
    Ok(())
}

/// Write `cfg`'s model as GGUF at `out`, fetching each tensor from `get` when it is written.
/// `tokenizer_dir` holds the tokenizer files; `extra` string metadata (`general.name`,
/// provenance) is appended.
pub fn write(
    out: &Path,
    cfg: &ModelConfig,
    tokenizer_dir: &Path,
    ty: GgufType,
    extra: &BTreeMap<String, String>,
    show_progress: bool,
    mut get: impl FnMut(TensorRole) -> Result<Tensor>,
) -> Result<PathBuf> {
    let mut meta = arch_meta(cfg, ty)?;
    meta.extend(super::gguf_tokenizer::gguf_meta(tokenizer_dir, cfg)?);
    meta.extend(extra.iter().map(|(k, v)| (k.clone(), Meta::str(v))));
    let roles = TensorRole::all(cfg);
    let infos: Vec<TensorInfo> = roles
        .iter()
        .map(|&r| {
            let dims = r.shape(cfg);
            let dtype = tensor_type(&dims, ty);
            TensorInfo { name: super::gguf::gguf_name(r), dims, dtype }
        })
        .collect();
    super::gguf_write::header(&meta, &infos)?; // every check before the file is created
    let bar = crate::progress::bar(roles.len() as u64, "writing GGUF", show_progress);
    super::atomic::write_file_with(out, |w| {
        super::gguf_write::write(w, &meta, &infos, |i, w| {
            let t = get(roles[i])?;
            if t.dims() != infos[i].dims.as_slice() {
                return Err(Error::invalid(format!(
                    "tensor `{}` has shape {:?}, the config implies {:?}",
                    roles[i].hf_name(),
                    t.dims(),
                    infos[i].dims
                )));
            }
            bar.set_message(infos[i].name.clone());
            bar.inc(1);
            write_tensor(w, roles[i], &t, cfg, infos[i].dtype)
        })
    })?;
    bar.finish_and_clear();
    Ok(out.to_path_buf())
}

/// A compiled (in-memory) model as GGUF.
pub fn write_model(
    model: &Model,
    tokenizer_dir: &Path,
    out: &Path,
    ty: GgufType,
    extra: &BTreeMap<String, String>,
) -> Result<PathBuf> {
    let by_role: BTreeMap<TensorRole, Tensor> = model.tensors().into_iter().collect();
    write(out, &model.cfg, tokenizer_dir, ty, extra, false, |r| {
        by_role.get(&r).cloned().ok_or_else(|| Error::invalid(format!("the model has no tensor `{}`", r.hf_name())))
    })
}

/// `mechc export`: an HF directory → GGUF, reading one tensor at a time from the memory-mapped
/// safetensors (peak memory ~ the largest tensor in f32 and its converted bytes).
pub fn export_dir(dir: &Path, out: &Path, ty: GgufType, force: bool, show_progress: bool) -> Result<PathBuf> {
    // The output may sit beside the model's files, never on one of them.
    let files: Vec<PathBuf> = ["config.json", "model.safetensors", "model.safetensors.index.json"]
        .iter()
        .chain(super::hf::TOKENIZER_FILES)
        .map(|f| dir.join(f))
        .chain(std::iter::once(dir.to_path_buf()))
        .collect();
    super::atomic::check_file(out, force, &files.iter().map(PathBuf::as_path).collect::<Vec<_>>())?;
    let cfg = super::hf::read_config(dir)?;
    let shards = super::hf::Shards::open(dir)?;
    let name = dir.file_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "model".into());
    let mut extra = BTreeMap::new();
    extra.insert("mechc.version".to_string(), env!("CARGO_PKG_VERSION").to_string());
    extra.insert("mechc.source".to_string(), name.clone());
    extra.insert("general.name".to_string(), name);
    write(out, &cfg, dir, ty, &extra, show_progress, |r| {
        let n = r.hf_name();
        let t = shards.get(&n)?.ok_or_else(|| Error::bad_file(shards.file_of(&n), format!("missing tensor `{n}`")))?;
        shards.release();
        crate::model::check_finite(&t, &n, &shards.file_of(&n))?;
        Ok(t)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permute_inverts_the_imports_unpermute() {
        let t = Tensor::arange(0f32, 4.0 * 8.0 * 3.0, &candle_core::Device::Cpu).unwrap().reshape((4 * 8, 3)).unwrap();
        let p = permute_rows(&t, 4).unwrap();
        assert_ne!(p.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
        // Import's view: (heads, hd/2, 2) → (heads, 2, hd/2).
        let back = p.reshape((4, 4, 2, 3)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((32, 3)).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), t.to_vec2::<f32>().unwrap());
    }

    fn spec(arch: Arch) -> ModelConfig {
        let s = crate::model::random::RandomSpec {
            arch,
            layers: 3,
            kv_heads: 2,
            group: 2,
            head_dim: 8,
            d_model: 32,
            d_ff: 64,
            vocab: 40,
            tied: true,
            attention_bias: false,
            mlp_bias: false,
        };
        s.config()
    }

    #[test]
    fn what_gguf_cannot_express_is_refused_with_the_reason() {
        let mut cfg = spec(Arch::Llama);
        assert!(check(&cfg).is_ok());
        cfg.raw.insert(crate::model::config::LAYER_D_FF_KEY.into(), serde_json::json!([cfg.intermediate_size, 3, cfg.intermediate_size]));
        let e = check(&cfg).unwrap_err().to_string();
        assert!(e.contains("MLP widths") && e.contains("layer 1"), "{e}");
        let mut q = spec(Arch::Qwen2);
        assert!(check(&q).is_ok());
        q.o_bias = true;
        assert!(check(&q).unwrap_err().to_string().contains("qwen2"));
        let mut q = spec(Arch::Qwen2);
        q.num_heads -= q.num_kv_heads;
        assert!(check(&q).unwrap_err().to_string().contains("n_embd"));
    }

    #[test]
    fn one_d_tensors_stay_f32_and_odd_rows_fall_back_to_f16() {
        assert_eq!(tensor_type(&[64], GgufType::Q8_0), GgmlDType::F32);
        assert_eq!(tensor_type(&[64], GgufType::BF16), GgmlDType::F32);
        assert_eq!(tensor_type(&[8, 64], GgufType::Q8_0), GgmlDType::Q8_0);
        assert_eq!(tensor_type(&[8, 48], GgufType::Q8_0), GgmlDType::F16);
        assert_eq!(tensor_type(&[8, 48], GgufType::BF16), GgmlDType::BF16);
    }
}
