//! The second moment C = E[k kᵀ] of a layer's `down_proj` inputs (`blocks.{l}.mlp.hook_post`)
//! over a text corpus, as ROME's `layer_stats.py` collects it (uncentred), accumulated in f64,
//! and the solve C⁻¹k* by a Cholesky factorisation (never an explicit inverse).
//!
//! Collecting C is the expensive part of ROME (hours on a GPU for GPT-J in the reference code),
//! so it is cached on disk as a safetensors file keyed by what C depends on: the weights that
//! produce the layer's MLP input (embedding and blocks 0..=l), the token ids and the window
//! length. Changing any of them changes the key; nothing else is trusted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::runtime::{Batch, HookPoint, Hooks, Op};

/// Version of the cache format; bump when what is stored or how it is computed changes.
const CACHE_VERSION: &str = "1";

/// E[k kᵀ] of one layer's MLP inputs.
#[derive(Debug, Clone)]
pub struct Covariance {
    pub layer: usize,
    pub dim: usize,
    /// Row-major `dim × dim`.
    pub mom2: Vec<f64>,
    /// Tokens averaged over.
    pub count: usize,
}

impl Covariance {
    /// The identity (EasyEdit's default for Llama models: ROME without the covariance).
    pub fn identity(layer: usize, dim: usize) -> Covariance {
        let mut mom2 = vec![0.0; dim * dim];
        (0..dim).for_each(|i| mom2[i * dim + i] = 1.0);
        Covariance { layer, dim, mom2, count: 0 }
    }

    /// Accumulate over `ids`, cut into disjoint windows of `seq_len` tokens. `on_window(i, n)`
    /// reports progress. Only blocks 0..=layer run, and logits are taken for one position.
    pub fn collect(model: &Model, layer: usize, ids: &[u32], seq_len: usize, on_window: impl FnMut(usize, usize)) -> Result<Covariance> {
        Ok(Covariance::collect_many(model, &[layer], ids, seq_len, on_window)?.remove(0))
    }

    /// [`Covariance::collect`] for several layers in one pass over the text (MEMIT's range):
    /// one forward per window, up to the deepest layer.
    pub fn collect_many(model: &Model, layers: &[usize], ids: &[u32], seq_len: usize, mut on_window: impl FnMut(usize, usize)) -> Result<Vec<Covariance>> {
        let Some(&deepest) = layers.iter().max() else { return Ok(vec![]) };
        if deepest >= model.cfg.num_layers {
            return Err(Error::invalid(format!("layer {deepest} does not exist (the model has {})", model.cfg.num_layers)));
        }
        if seq_len == 0 || ids.is_empty() {
            return Err(Error::invalid("covariance: need a non-empty text and seq_len > 0"));
        }
        let dims: Vec<usize> = layers.iter().map(|&l| model.blocks[l].down.w().dim(1)).collect::<candle_core::Result<_>>()?;
        let mut acc: Vec<DMatrix<f64>> = dims.iter().map(|&d| DMatrix::zeros(d, d)).collect();
        let windows: Vec<&[u32]> = ids.chunks(seq_len).collect();
        for (i, w) in windows.iter().enumerate() {
            let mut hooks = truncated_hooks(model, deepest);
            for &l in layers {
                hooks.capture(HookPoint::MlpPost(l));
            }
            model.forward(&Batch::single(w), None, &mut hooks, Fwd::default())?;
            for ((&l, &dim), acc) in layers.iter().zip(&dims).zip(&mut acc) {
                let k = hooks.captured[&HookPoint::MlpPost(l)].squeeze(0)?; // [t, dim]
                // kᵀk in f32 over one window (≤ seq_len terms), summed across windows in f64.
                let kk = k.t()?.matmul(&k)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
                *acc += DMatrix::from_row_slice(dim, dim, &kk);
            }
            on_window(i + 1, windows.len());
        }
        let count = ids.len();
        Ok(layers
            .iter()
            .zip(dims)
            .zip(acc)
            .map(|((&layer, dim), acc)| Covariance { layer, dim, mom2: (acc / count as f64).transpose().as_slice().to_vec(), count })
            .collect())
    }

    /// C⁻¹k by a Cholesky factorisation of C + ridge·mean(diag C)·I.
    pub fn solve(&self, k: &[f32], ridge: f64) -> Result<Vec<f64>> {
        if k.len() != self.dim {
            return Err(Error::invalid(format!("covariance solve: key has {} values, C is {}×{}", k.len(), self.dim, self.dim)));
        }
        let mut c = DMatrix::from_row_slice(self.dim, self.dim, &self.mom2);
        let mean_diag = c.diagonal().mean();
        for i in 0..self.dim {
            c[(i, i)] += ridge * mean_diag;
        }
        let chol = c.cholesky().ok_or_else(|| {
            Error::invalid("the covariance is not positive definite (too few tokens for the layer's width? raise cov_tokens or ridge)")
        })?;
        let b = nalgebra::DVector::from_iterator(self.dim, k.iter().map(|&x| x as f64));
        Ok(chol.solve(&b).as_slice().to_vec())
    }

    /// From the cache directory `dir` (e.g. [`default_cache_dir`]), or collected and cached
    /// there. `on_window` reports collection progress; returns whether it came from the cache.
    pub fn cached(model: &Model, layer: usize, ids: &[u32], seq_len: usize, dir: &Path, on_window: impl FnMut(usize, usize)) -> Result<(Covariance, bool)> {
        Ok(Covariance::cached_many(model, &[layer], ids, seq_len, dir, on_window)?.remove(0))
    }

    /// [`Covariance::cached`] for several layers: those not in the cache are collected together
    /// in one pass over the text.
    pub fn cached_many(model: &Model, layers: &[usize], ids: &[u32], seq_len: usize, dir: &Path, on_window: impl FnMut(usize, usize)) -> Result<Vec<(Covariance, bool)>> {
        let mut out: Vec<Option<(Covariance, bool)>> = vec![];
        let mut missing = vec![];
        for &layer in layers {
            let key = cache_key(model, layer, ids, seq_len)?;
            let path = dir.join(format!("{key}.safetensors"));
            let hit = read(&path, layer)?;
            if hit.is_some() {
                crate::io::cache::touch(&path); // last use, for `mechc cache prune --older-than`
            }
            if hit.is_none() {
                missing.push((out.len(), layer, key, path));
            }
            out.push(hit.map(|c| (c, true)));
        }
        let todo: Vec<usize> = missing.iter().map(|m| m.1).collect();
        for ((i, _, key, path), c) in missing.into_iter().zip(Covariance::collect_many(model, &todo, ids, seq_len, on_window)?) {
            write(&path, &c, &key)?;
            out[i] = Some((c, false));
        }
        Ok(out.into_iter().map(|c| c.expect("every layer read or collected")).collect())
    }
}

/// Hooks that stop the forward after block `layer`: later blocks are skipped and only one
/// position reaches the unembedding (the logits are not wanted).
pub(crate) fn truncated_hooks(model: &Model, layer: usize) -> Hooks {
    let mut hooks = Hooks::new();
    for l in layer + 1..model.cfg.num_layers {
        hooks.skip_block(l);
    }
    hooks.intervene(HookPoint::LnFinal, Op::Func(std::sync::Arc::new(|x: &Tensor| x.narrow(1, 0, 1))));
    hooks
}

/// The covariances of `layers` over the first `tokens` tokens of the text file `path` (windows of
/// `seq_len`), from [`default_cache_dir`] or collected (with a progress bar) and cached there,
/// and a note saying which ("C over N tokens (cached)").
pub fn from_text(model: &Model, tok: &crate::tokenizer::Tok, layers: &[usize], path: &Path, tokens: usize, seq_len: usize, progress: bool) -> Result<(Vec<Covariance>, String)> {
    let ids = crate::locate::text_ids(tok, path, tokens)?;
    let bar = crate::progress::bar(0, "covariance", progress);
    let t = std::time::Instant::now();
    let got = Covariance::cached_many(model, layers, &ids, seq_len, &default_cache_dir(), |i, n| {
        bar.set_length(n as u64);
        bar.set_position(i as u64);
    })?;
    bar.finish_and_clear();
    let how = if got.iter().all(|c| c.1) { "cached".to_string() } else { format!("collected in {:.1} s", t.elapsed().as_secs_f64()) };
    let note = format!("C over {} tokens ({how})", got.first().map_or(0, |c| c.0.count));
    Ok((got.into_iter().map(|c| c.0).collect(), note))
}

/// `$MECHC_CACHE/rome-cov`.
pub fn default_cache_dir() -> PathBuf {
    crate::io::cache_dir().join("rome-cov")
}

/// SHA-256 over the format version, the weights blocks 0..=layer read (and the embedding), the
/// token ids and the window length.
fn cache_key(model: &Model, layer: usize, ids: &[u32], seq_len: usize) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!("mechc-rome-cov-v{CACHE_VERSION} layer={layer} seq_len={seq_len} tokens={}\n", ids.len()));
    hash_weights_through(&mut h, model, layer)?;
    for id in ids {
        h.update(id.to_le_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Feeds `h` every weight that block `layer`'s MLP input (the key) depends on: the embedding,
/// every projection of blocks `0..layer`, and block `layer` up to its gate and up projections.
pub(crate) fn hash_weights_through(h: &mut Sha256, model: &Model, layer: usize) -> Result<()> {
    let mut add = |t: &Tensor| -> Result<()> {
        h.update(format!("{:?}", t.dims()));
        for x in t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()? {
            h.update(x.to_le_bytes());
        }
        Ok(())
    };
    add(&model.embed)?;
    for (l, b) in model.blocks[..=layer].iter().enumerate() {
        add(&b.attn_norm)?;
        add(&b.mlp_norm)?;
        // The earlier blocks' down projections feed the residual stream too (a pass that rewrote
        // one must not be given a stale cache); block `layer`'s own reads its output.
        let down = (l < layer).then_some(&b.down);
        for p in [&b.q, &b.k, &b.v, &b.o, &b.gate, &b.up].into_iter().chain(down) {
            add(p.w())?;
            if let Some(bias) = &p.b {
                add(bias)?;
            }
        }
    }
    Ok(())
}

fn read(path: &Path, layer: usize) -> Result<Option<Covariance>> {
    if !path.is_file() {
        return Ok(None);
    }
    // A cache file that cannot be read is recomputed (and replaced), not an error.
    let Ok(f) = crate::io::st::StFile::open(path) else { return Ok(None) };
    let (Ok(Some(m)), Ok(Some(meta))) = (f.get("mom2"), f.metadata()) else { return Ok(None) };
    let count = meta.get("count").and_then(|c| c.parse().ok());
    let (Some(count), Ok((d, d2))) = (count, m.dims2()) else { return Ok(None) };
    if d != d2 || m.dtype() != DType::F64 {
        return Ok(None);
    }
    Ok(Some(Covariance { layer, dim: d, mom2: m.flatten_all()?.to_vec1::<f64>()?, count }))
}

fn write(path: &Path, c: &Covariance, key: &str) -> Result<()> {
    let t = Tensor::from_vec(c.mom2.clone(), (c.dim, c.dim), &Device::Cpu)?;
    let meta: BTreeMap<String, String> = [
        ("count".to_string(), c.count.to_string()),
        ("layer".to_string(), c.layer.to_string()),
        ("key".to_string(), key.to_string()),
        ("what".to_string(), "E[k k^T] of blocks.{layer}.mlp.hook_post (mechc rank-one-edit)".to_string()),
    ]
    .into_iter()
    .collect();
    let bytes = safetensors::serialize([("mom2", &t)], Some(meta.into_iter().collect()))
        .map_err(|e| Error::output(path, format!("serialising the covariance: {e}")))?;
    crate::io::atomic::write_file(path, &bytes)
}
