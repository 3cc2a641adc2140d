//! Batches with padding masks, and the KV cache.

use candle_core::Tensor;

/// Token ids of several sequences padded to one length; `valid` is false on padding.
#[derive(Debug, Clone)]
pub struct Batch {
    pub ids: Vec<Vec<u32>>,
    pub valid: Vec<Vec<bool>>,
}

impl Batch {
    pub fn single(ids: &[u32]) -> Self {
        Batch { ids: vec![ids.to_vec()], valid: vec![vec![true; ids.len()]] }
    }

    /// Pad on the right (natural positions; logits at padding are meaningless). For analysis.
    pub fn right_padded(seqs: &[Vec<u32>], pad: u32) -> Self {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut b = Batch { ids: vec![], valid: vec![] };
        for s in seqs {
            let mut ids = s.clone();
            ids.resize(t, pad);
            b.ids.push(ids);
            b.valid.push((0..t).map(|i| i < s.len()).collect());
        }
        b
    }

    /// Pad on the left (every row ends at the last column). For generation.
    pub fn left_padded(seqs: &[Vec<u32>], pad: u32) -> Self {
        let t = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let mut b = Batch { ids: vec![], valid: vec![] };
        for s in seqs {
            let n = t - s.len();
            let mut ids = vec![pad; n];
            ids.extend_from_slice(s);
            b.ids.push(ids);
            b.valid.push((0..t).map(|i| i >= n).collect());
        }
        b
    }

    pub fn size(&self) -> usize {
        self.ids.len()
    }

    pub fn len(&self) -> usize {
        self.ids.first().map_or(0, Vec::len)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn has_padding(&self) -> bool {
        self.valid.iter().any(|r| r.iter().any(|v| !v))
    }
}

/// Keys and values of every layer for the tokens seen so far, with their validity.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    /// Per layer: k, v of shape [b, kv_heads, seen, head_dim].
    pub layers: Vec<Option<(Tensor, Tensor)>>,
    /// Per row: validity of every cached position.
    pub valid: Vec<Vec<bool>>,
}

impl KvCache {
    pub fn new(n_layers: usize) -> Self {
        KvCache { layers: vec![None; n_layers], valid: vec![] }
    }

    pub fn seen(&self) -> usize {
        self.valid.first().map_or(0, Vec::len)
    }
}

/// Indices of `lens` in chunks of at most `batch`, each chunk holding similar lengths.
pub fn length_batches(lens: &[usize], batch: usize) -> Vec<Vec<usize>> {
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&i| (lens[i], i));
    order.chunks(batch.max(1)).map(|c| c.to_vec()).collect()
}
