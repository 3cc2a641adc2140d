//! Bad input gets a one-line error naming the file and the problem, a non-zero exit, no panic,
//! and leaves no partial output behind.

mod common;

use std::path::{Path, PathBuf};


/// A valid imported stories260K directory in a fresh temp dir.
fn stories_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("stories");
    mechc::io::gguf::import(&common::stories_gguf(), &dir, candle_core::DType::F32, false, false).unwrap();
    (tmp, dir)
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

fn edit_config(dir: &Path, f: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(v.as_object_mut().unwrap());
    std::fs::write(&p, serde_json::to_string(&v).unwrap()).unwrap();
}

#[test]
fn truncated_safetensors() {
    let (_t, dir) = stories_dir();
    let st = dir.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() / 2]).unwrap();
    common::fails(common::mechc().arg("generate").arg(&dir).args(["--max-tokens", "2"]), &["model.safetensors", "safetensors"]);
}

#[test]
fn safetensors_header_offsets_overrun_the_file() {
    let (_t, dir) = stories_dir();
    let st = dir.join("model.safetensors");
    let header = r#"{"model.embed_tokens.weight":{"dtype":"F32","shape":[512,64],"data_offsets":[0,999999999]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0u8; 64]);
    std::fs::write(&st, bytes).unwrap();
    common::fails(common::mechc().arg("inspect").arg(&dir), &["model.safetensors"]);
}

#[test]
fn non_finite_weights() {
    let (_t, dir) = stories_dir();
    let mut m = mechc::io::hf::load_model(&dir).unwrap();
    let w = m.blocks[2].up.w();
    let mut v = w.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[17] = f32::NAN;
    let bad = candle_core::Tensor::from_vec(v, w.dims(), w.device()).unwrap();
    m.blocks[2].up = mechc::model::Linear::new(&bad, None).unwrap();
    mechc::io::hf::save_model(&m, &dir, candle_core::DType::F32, &Default::default()).unwrap();
    common::fails(common::mechc().arg("generate").arg(&dir), &["model.layers.2.mlp.up_proj.weight", "NaN"]);
}

#[test]
fn config_missing_field() {
    let (_t, dir) = stories_dir();
    edit_config(&dir, |c| {
        c.remove("num_hidden_layers");
    });
    common::fails(common::mechc().arg("generate").arg(&dir), &["config.json", "num_hidden_layers", "missing"]);
}

#[test]
fn config_contradictory_fields() {
    let (_t, dir) = stories_dir();
    edit_config(&dir, |c| {
        c.insert("num_key_value_heads".into(), 3.into());
    });
    common::fails(common::mechc().arg("inspect").arg(&dir), &["config.json", "num_key_value_heads", "does not divide"]);
    edit_config(&dir, |c| {
        c.insert("num_key_value_heads".into(), 4.into());
        c.insert("hidden_size".into(), 96.into());
    });
    // Shapes on disk no longer match the config: the tensor and both sizes are named.
    common::fails(common::mechc().arg("generate").arg(&dir), &["model.embed_tokens.weight", "[512, 64]", "[512, 96]"]);
}

#[test]
fn config_wrong_type_and_unknown_architecture() {
    let (_t, dir) = stories_dir();
    edit_config(&dir, |c| {
        c.insert("rms_norm_eps".into(), "small".into());
    });
    common::fails(common::mechc().arg("inspect").arg(&dir), &["config.json", "rms_norm_eps", "number"]);
    edit_config(&dir, |c| {
        c.insert("rms_norm_eps".into(), 1e-5.into());
        c.insert("model_type".into(), "gpt_neox".into());
    });
    common::fails(common::mechc().arg("inspect").arg(&dir), &["config.json", "gpt_neox", "unsupported"]);
}

#[test]
fn truncated_and_corrupted_gguf() {
    let tmp = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(common::stories_gguf()).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("truncated-header.gguf", bytes[..300].to_vec()),
        ("truncated-data.gguf", bytes[..bytes.len() - 1000].to_vec()),
        ("bad-magic.gguf", {
            let mut b = bytes.clone();
            b[0] = b'X';
            b
        }),
        ("huge-count.gguf", {
            let mut b = bytes.clone();
            b[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
            b
        }),
    ];
    for (name, data) in cases {
        let f = tmp.path().join(name);
        std::fs::write(&f, data).unwrap();
        let out = tmp.path().join(format!("{name}.out"));
        common::fails(common::mechc().arg("import").arg(&f).arg("--out").arg(&out), &[name]);
        assert!(!out.exists(), "{name}: partial output left behind");
        let leftovers: Vec<String> = entries(tmp.path()).into_iter().filter(|e| e.contains("mechc-tmp")).collect();
        assert!(leftovers.is_empty(), "{name}: temporary files left: {leftovers:?}");
    }
}

#[test]
fn existing_output_is_refused_and_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("keep.txt"), "mine").unwrap();
    common::fails(common::mechc().arg("import").arg(common::stories_gguf()).arg("--out").arg(&out), &["out", "already exists"]);
    assert_eq!(entries(&out), vec!["keep.txt"]);
    assert_eq!(std::fs::read_to_string(out.join("keep.txt")).unwrap(), "mine");
    // With --force it is replaced whole.
    common::mechc().arg("import").arg(common::stories_gguf()).arg("--out").arg(&out).arg("--force").assert().success();
    assert!(out.join("model.safetensors").exists() && !out.join("keep.txt").exists());

    // trace refuses an existing file too.
    let f = tmp.path().join("t.safetensors");
    std::fs::write(&f, "x").unwrap();
    common::fails(common::mechc().arg("trace").arg(&out).args(["--prompt", "Once"]).arg("--out").arg(&f), &["t.safetensors", "already exists"]);
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "x");
}

#[test]
fn output_inside_the_input_is_refused() {
    let (_t, dir) = stories_dir();
    common::fails(common::mechc().arg("import").arg(common::stories_gguf()).arg("--out").arg(common::stories_gguf()).arg("--force"), &["input"]);
    let before = entries(&dir);
    let gguf_copy = dir.join("m.gguf");
    std::fs::copy(common::stories_gguf(), &gguf_copy).unwrap();
    common::fails(common::mechc().arg("import").arg(&gguf_copy).arg("--out").arg(&dir).arg("--force"), &["input"]);
    let mut want = before;
    want.push("m.gguf".into());
    want.sort();
    assert_eq!(entries(&dir), want);
}

#[test]
fn bad_hook_pattern_and_missing_model() {
    let (_t, dir) = stories_dir();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.safetensors");
    common::fails(common::mechc().arg("trace").arg(&dir).args(["--prompt", "Once", "--hooks", "blocks.*.hook_nothing"]).arg("--out").arg(&out), &["matches no hook"]);
    assert!(!out.exists());
    common::fails(common::mechc().arg("inspect").arg(tmp.path().join("nope")), &["nope", "no such file"]);
}

#[test]
fn trace_writes_the_promised_tensors() {
    let (_t, dir) = stories_dir();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("t.safetensors");
    common::mechc()
        .arg("trace")
        .arg(&dir)
        .args(["--prompt", "Once upon a time", "--hooks", "blocks.1.*,hook_embed"])
        .arg("--out")
        .arg(&out)
        .assert()
        .success();
    let f = mechc::io::st::StFile::open(&out).unwrap();
    let ids = f.get("input_ids").unwrap().unwrap();
    let n = ids.dim(0).unwrap();
    assert_eq!(ids.dtype(), candle_core::DType::I64);
    assert_eq!(f.get("logits").unwrap().unwrap().dims(), &[n, 512]);
    assert_eq!(f.get("hook_embed").unwrap().unwrap().dims(), &[n, 64]);
    assert_eq!(f.get("blocks.1.attn.hook_z").unwrap().unwrap().dims(), &[n, 8, 8]);
    assert_eq!(f.get("blocks.1.mlp.hook_post").unwrap().unwrap().dims(), &[n, 172]);
    assert!(f.get("blocks.0.hook_resid_post").unwrap().is_none());
    // The logits are those of a fresh forward of the same ids.
    let loaded = mechc::io::load(&dir, false).unwrap();
    let ids_u: Vec<u32> = ids.to_vec1::<i64>().unwrap().into_iter().map(|i| i as u32).collect();
    let logits = loaded
        .model
        .forward(&mechc::runtime::Batch::single(&ids_u), None, &mut mechc::runtime::Hooks::new(), Default::default())
        .unwrap()
        .squeeze(0)
        .unwrap();
    assert_eq!(common::max_abs_diff(&logits, &f.get("logits").unwrap().unwrap()), 0.0);
}
