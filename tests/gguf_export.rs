//! GGUF export (`mechc export --gguf`, `[output] format = "gguf"`), checked through mechc's own
//! import (candle's GGUF reader, an independent parser): every float type gives back the tensors
//! it stored bit for bit (F32 the source itself), Q8_0/Q4_0 give back what candle's quantisers
//! make of the source, the tokenizer comes back identical, the bytes are deterministic, and what
//! GGUF cannot express is refused before anything is written. llama.cpp itself loading and running
//! the exports is tests/interop/test_gguf_llamacpp.py.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{DType, Device, Tensor};

fn tensors(dir: &Path) -> BTreeMap<String, Tensor> {
    let f = mechc::io::st::StFile::open(&dir.join("model.safetensors")).unwrap();
    f.names().unwrap().into_iter().map(|n| (n.clone(), f.get(&n).unwrap().unwrap().to_dtype(DType::F32).unwrap())).collect()
}

fn json(p: &Path) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

/// What a stored tensor of type `ty` reads back as.
fn stored(t: &Tensor, ty: GgmlDType) -> Tensor {
    match ty {
        GgmlDType::F32 => t.clone(),
        GgmlDType::F16 => t.to_dtype(DType::F16).unwrap().to_dtype(DType::F32).unwrap(),
        GgmlDType::BF16 => t.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap(),
        q => QTensor::quantize(t, q).unwrap().dequantize(&Device::Cpu).unwrap(),
    }
}

fn round_trip(gguf: &Path) {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    common::mechc().args(["import"]).arg(gguf).arg("--out").arg(&src).assert().success();
    let want = tensors(&src);
    let cfg = mechc::io::hf::read_config(&src).unwrap();
    let gguf_names: BTreeMap<String, String> =
        mechc::model::TensorRole::all(&cfg).into_iter().map(|r| (r.hf_name(), mechc::io::gguf::gguf_name(r))).collect();
    for (ty, ggml) in [("f32", GgmlDType::F32), ("f16", GgmlDType::F16), ("bf16", GgmlDType::BF16), ("q8_0", GgmlDType::Q8_0), ("q4_0", GgmlDType::Q4_0)] {
        let out = tmp.path().join(format!("{ty}.gguf"));
        common::mechc().arg("export").arg(&src).arg("--gguf").arg(&out).args(["--type", ty]).assert().success();
        let g = mechc::io::gguf::Gguf::open(&out).unwrap();
        let back = tmp.path().join(format!("back-{ty}"));
        common::mechc().arg("import").arg(&out).arg("--out").arg(&back).assert().success();
        let got = tensors(&back);
        assert_eq!(got.keys().collect::<Vec<_>>(), want.keys().collect::<Vec<_>>(), "{ty}");
        for (name, w) in &want {
            // 1-D stays F32; a quantised row not divisible by 32 is stored F16 (as llama.cpp's converter does).
            let expect = match (w.rank(), ggml) {
                (1, _) => GgmlDType::F32,
                (_, GgmlDType::Q8_0 | GgmlDType::Q4_0) if w.dims()[1] % 32 != 0 => GgmlDType::F16,
                _ => ggml,
            };
            assert_eq!(g.content.tensor_infos[&gguf_names[name]].ggml_dtype, expect, "{ty} {name}");
            let e = stored(w, expect);
            assert_eq!(
                got[name].flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                e.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{ty} {name}"
            );
        }
        for f in ["tokenizer.json", "tokenizer_config.json", "config.json", "generation_config.json", "special_tokens_map.json"] {
            assert_eq!(json(&back.join(f)), json(&src.join(f)), "{ty}: {f}");
        }
    }
    // The same model and type give the same bytes.
    let again = tmp.path().join("again.gguf");
    common::mechc().arg("export").arg(&src).arg("--gguf").arg(&again).assert().success();
    assert_eq!(std::fs::read(&again).unwrap(), std::fs::read(tmp.path().join("f32.gguf")).unwrap());
}

#[test]
fn stories260k_round_trips_every_type_and_its_sentencepiece_vocabulary() {
    round_trip(&common::stories_gguf());
}

#[test]
fn smollm2_round_trips_every_type_and_its_byte_level_vocabulary() {
    if let Some(m) = common::registry_model(common::SMOLLM2) {
        round_trip(&m);
    }
}

#[test]
fn what_gguf_cannot_express_and_bad_outputs_are_refused_before_writing() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    common::mechc().arg("import").arg(common::stories_gguf()).arg("--out").arg(&src).assert().success();
    // An existing output, and the input itself, are refused.
    let existing = tmp.path().join("x.gguf");
    std::fs::write(&existing, b"keep").unwrap();
    common::fails(common::mechc().arg("export").arg(&src).arg("--gguf").arg(&existing), &["already exists"]);
    assert_eq!(std::fs::read(&existing).unwrap(), b"keep");
    common::fails(common::mechc().arg("export").arg(&src).arg("--gguf").arg(src.join("config.json")).arg("--force"), &["overwrite the input"]);
    // Different head counts per layer: llama.cpp builds every block from one value.
    let mut cfg = json(&src.join("config.json"));
    let n = cfg["num_hidden_layers"].as_u64().unwrap() as usize;
    let mut heads = vec![cfg["num_attention_heads"].as_u64().unwrap(); n];
    heads[2] -= cfg["num_key_value_heads"].as_u64().unwrap();
    cfg["mechc_layer_num_attention_heads"] = serde_json::json!(heads);
    std::fs::write(src.join("config.json"), serde_json::to_string(&cfg).unwrap()).unwrap();
    let out = tmp.path().join("pruned.gguf");
    common::fails(common::mechc().arg("export").arg(&src).arg("--gguf").arg(&out), &["attention heads", "layer 2"]);
    assert!(!out.exists());
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 2, "temporaries left behind: {leftovers:?}");
}

/// `[output] format = "gguf"`: a skip-layers compile writes `model.gguf` and the manifest with its
/// hash; the file imports to the compiled shape. A non-uniform pruning is refused after the passes
/// and before verification, writing nothing.
#[test]
fn a_pipeline_writes_gguf_with_its_manifest() {
    let tmp = tempfile::tempdir().unwrap();
    let pipeline = |name: &str, pass: &str| {
        let p = tmp.path().join(format!("{name}.toml"));
        let body = format!(
            "version = 1\n[model]\npath = \"{}\"\n[[pass]]\n{pass}\n[output]\npath = \"out-{name}\"\nformat = \"gguf\"\ndtype = \"q8_0\"\n",
            common::stories_gguf().display()
        );
        std::fs::write(&p, body).unwrap();
        p
    };
    let p = pipeline("skip", "name = \"skip-layers\"\nlayers = [3]");
    common::mechc().arg("compile").arg(&p).assert().success();
    let out = tmp.path().join("out-skip");
    let mut names: Vec<String> = std::fs::read_dir(&out).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["mechc-manifest.json", "model.gguf"]);
    let manifest = json(&out.join("mechc-manifest.json"));
    assert_eq!(manifest["files"]["model.gguf"].as_str().unwrap(), mechc::io::sha256_file(&out.join("model.gguf")).unwrap());
    let g = mechc::io::gguf::Gguf::open(&out.join("model.gguf")).unwrap();
    assert_eq!(g.u64("llama.block_count").unwrap(), 4);
    assert_eq!(g.u64("general.file_type").unwrap(), 7);
    // Output options GGUF cannot honour are refused before the model is read.
    for (extra, needle) in [("shard_size = \"100MB\"\n", "shard_size"), ("", "q3_9")] {
        let p = tmp.path().join("bad.toml");
        let dtype = if extra.is_empty() { "q3_9" } else { "f16" };
        std::fs::write(
            &p,
            format!("version = 1\n[model]\npath = \"no-such-model.gguf\"\n[output]\npath = \"o\"\nformat = \"gguf\"\ndtype = \"{dtype}\"\n{extra}"),
        )
        .unwrap();
        let e = common::fails(common::mechc().arg("compile").arg(&p), &[needle]);
        assert!(!e.contains("no-such-model"), "{e}");
    }
    let p = pipeline("uneven", "name = \"prune-heads\"\nheads = [\"L1.H0\", \"L1.H2\", \"L1.H4\", \"L1.H6\"]");
    common::fails(common::mechc().arg("compile").arg(&p), &["attention heads"]);
    assert!(!tmp.path().join("out-uneven").exists());
}
