//! GGUF import of every quantisation type candle reads, with llama.cpp's Q/K row layout:
//! a seeded model is written as a GGUF (weights permuted to the interleaved RoPE layout and
//! quantised, one type per tensor), imported, and compared with the original weights within
//! each type's quantisation error. A missing or wrong un-permute would give errors near √2.

mod common;

use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::Tensor;
use mechc::io::gguf::gguf_name;
use mechc::model::random::{random_model, RandomSpec};
use mechc::model::{Arch, Proj, TensorRole};

const TYPES: [GgmlDType; 11] = [
    GgmlDType::F32,
    GgmlDType::F16,
    GgmlDType::Q4_0,
    GgmlDType::Q4_1,
    GgmlDType::Q5_0,
    GgmlDType::Q8_0,
    GgmlDType::Q2K,
    GgmlDType::Q3K,
    GgmlDType::Q4K,
    GgmlDType::Q5K,
    GgmlDType::Q6K,
];

/// Relative error bound ‖a−b‖/‖b‖ for Gaussian weights.
fn bound(t: GgmlDType) -> f32 {
    match t {
        GgmlDType::F32 => 0.0,
        GgmlDType::F16 => 1e-3,
        GgmlDType::Q8_0 => 0.01,
        GgmlDType::Q6K => 0.03,
        GgmlDType::Q5_0 | GgmlDType::Q5K => 0.06,
        GgmlDType::Q4_0 | GgmlDType::Q4_1 | GgmlDType::Q4K => 0.12,
        _ => 0.5, // Q2K, Q3K
    }
}

/// HF rotate-half rows → llama.cpp interleaved rows (what convert_hf_to_gguf.py does).
fn permute(w: &Tensor, n_head: usize) -> Tensor {
    let (rows, cols) = w.dims2().unwrap();
    w.reshape((n_head, 2, rows / n_head / 2, cols)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap().reshape((rows, cols)).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let n = |t: &Tensor| t.sqr().unwrap().sum_all().unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
    n(&(a - b).unwrap()) / n(b)
}

#[test]
fn every_quant_type_imports_within_its_error() {
    let mut spec = RandomSpec::from_seed(11);
    spec.arch = Arch::Llama;
    spec.layers = 2;
    spec.kv_heads = 2;
    spec.group = 2;
    spec.head_dim = 64;
    spec.d_model = 256; // K-quants need rows that are multiples of 256
    spec.d_ff = 512;
    spec.vocab = 260;
    spec.tied = false;
    spec.attention_bias = false;
    spec.mlp_bias = false;
    let mut cfg = spec.config();
    cfg.bos_token_id = Some(257);
    cfg.eos_token_ids = vec![258];
    let model = random_model(cfg.clone(), 11).unwrap();

    // Tensors, each 2-D weight in the next quantisation type.
    let mut qt: Vec<(String, QTensor, GgmlDType)> = vec![];
    let mut next = 0;
    for (role, t) in model.tensors() {
        let t = match role {
            TensorRole::Weight(_, Proj::Q) => permute(&t, cfg.num_heads),
            TensorRole::Weight(_, Proj::K) => permute(&t, cfg.num_kv_heads),
            _ => t,
        };
        let ty = if t.rank() == 2 {
            next += 1;
            TYPES[(next - 1) % TYPES.len()]
        } else {
            GgmlDType::F32
        };
        qt.push((gguf_name(role), QTensor::quantize(&t, ty).unwrap(), ty));
    }
    assert!(next >= TYPES.len(), "every type used at least once");

    // A byte-level vocabulary: the 256 byte symbols, one merge, and three control tokens.
    let table = mechc::io::gguf_tokenizer::bytes_to_unicode();
    let mut tokens: Vec<String> = table.iter().map(|c| c.to_string()).collect();
    tokens.extend(["ab", "<|begin|>", "<|end|>", "<|pad|>"].map(String::from));
    let types: Vec<gguf_file::Value> = (0..tokens.len()).map(|i| gguf_file::Value::I32(if i >= 257 { 3 } else { 1 })).collect();
    use gguf_file::Value as V;
    let meta: Vec<(&str, V)> = vec![
        ("general.architecture", V::String("llama".into())),
        ("llama.block_count", V::U32(cfg.num_layers as u32)),
        ("llama.context_length", V::U32(512)),
        ("llama.embedding_length", V::U32(cfg.hidden_size as u32)),
        ("llama.feed_forward_length", V::U32(cfg.intermediate_size as u32)),
        ("llama.attention.head_count", V::U32(cfg.num_heads as u32)),
        ("llama.attention.head_count_kv", V::U32(cfg.num_kv_heads as u32)),
        ("llama.rope.freq_base", V::F32(10000.0)),
        ("llama.attention.layer_norm_rms_epsilon", V::F32(1e-5)),
        ("tokenizer.ggml.model", V::String("gpt2".into())),
        ("tokenizer.ggml.pre", V::String("qwen2".into())),
        ("tokenizer.ggml.tokens", V::Array(tokens.iter().map(|t| V::String(t.clone())).collect())),
        ("tokenizer.ggml.token_type", V::Array(types)),
        ("tokenizer.ggml.merges", V::Array(vec![V::String("a b".into())])),
        ("tokenizer.ggml.bos_token_id", V::U32(257)),
        ("tokenizer.ggml.eos_token_id", V::U32(258)),
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    let mut f = std::fs::File::create(&path).unwrap();
    let meta_refs: Vec<(&str, &V)> = meta.iter().map(|(k, v)| (*k, v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = qt.iter().map(|(n, t, _)| (n.as_str(), t)).collect();
    gguf_file::write(&mut f, &meta_refs, &tensor_refs).unwrap();
    drop(f);

    let out = dir.path().join("hf");
    mechc::io::gguf::import(&path, &out, candle_core::DType::F32, false, false).unwrap();
    let back = mechc::io::hf::load_model(&out).unwrap();
    assert_eq!(back.cfg.num_heads, cfg.num_heads);
    assert_eq!(back.cfg.head_dim, 64);
    let orig: std::collections::BTreeMap<_, _> = model.tensors().into_iter().collect();
    for ((role, got), (_, _, ty)) in back.tensors().into_iter().zip(qt.iter()) {
        let e = rel_err(&got, &orig[&role]);
        assert!(e <= bound(*ty), "{} stored as {ty:?}: relative error {e}", role.hf_name());
    }
    // The tokenizer keeps control tokens whole and applies the merge.
    let tok = mechc::tokenizer::Tok::from_dir(&out).unwrap();
    assert_eq!(tok.encode("ab<|end|>a", false).unwrap(), vec![256, 258, table.iter().position(|&c| c == 'a').unwrap() as u32]);
}
