//! `mechc compile` with bake-steering on stories260K: the emitted checkpoint, loaded back,
//! equals the runtime twin on the source (add, ablate, ablate with per-layer weights); the
//! control vector is written beside it; bad options fail with one line naming the option.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use mechc::model::decoder::Fwd;
use mechc::runtime::{Batch, HookPoint, Hooks, Op};

/// A pipeline over `model` with `pass` TOML lines after `[[pass]] name = "bake-steering"`.
fn pipeline(dir: &Path, model: &Path, name: &str, pass: &str) -> PathBuf {
    let body = format!(
        "version = 1\n[model]\npath = \"{}\"\n[[pass]]\nname = \"bake-steering\"\n{pass}\n[output]\npath = \"out-{name}\"\n",
        model.display()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    p
}

/// A seeded direction of d_model values (not unit length), saved as `dir.safetensors:v`.
fn direction(dir: &Path, d: usize) -> Tensor {
    let v: Vec<f32> = (0..d)
        .map(|i| ((i as f32 * 0.37 + 0.1).sin() * 1.7).round_ties_even() + 0.25 * (i as f32).cos())
        .collect();
    let t = Tensor::from_vec(v, d, &Device::Cpu).unwrap();
    mechc::verify::steer::save_direction(&dir.join("dir.safetensors"), "v", &t).unwrap();
    t
}

fn unit(v: &Tensor) -> Tensor {
    let n = v
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .sqrt()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (v / n as f64).unwrap()
}

/// Compile, load the output, and return max relative logit difference to the source + `twin`.
fn compiled_vs_twin(p: &Path, out: &Path, twin: &mut Hooks) -> f32 {
    common::mechc().arg("compile").arg(p).assert().success();
    let compiled = mechc::io::load(out, false).unwrap();
    let source = mechc::io::load(&common::stories_gguf(), false).unwrap();
    let tok = source.tok().unwrap();
    let seqs: Vec<Vec<u32>> = [
        "Once upon a time, there was a dog",
        "Lily wanted to play in the park with her friend",
    ]
    .iter()
    .map(|s| tok.encode(s, true).unwrap())
    .collect();
    let batch = Batch::right_padded(&seqs, 0);
    let got = compiled
        .model
        .forward(&batch, None, &mut Hooks::new(), Fwd::default())
        .unwrap();
    let want = source.model.forward(&batch, None, twin, Fwd::default()).unwrap();
    let plain = source.model.forward(&batch, None, &mut Hooks::new(), Fwd::default()).unwrap();
    assert!(common::rel_diff(&plain, &want) > 1e-3, "the twin should change the logits");
    common::rel_diff(&got, &want)
}

fn d_model() -> usize {
    mechc::io::load(&common::stories_gguf(), false).unwrap().model.cfg.hidden_size
}

#[test]
fn add_equals_its_twin_and_writes_the_control_vector() {
    let tmp = tempfile::tempdir().unwrap();
    let v = direction(tmp.path(), d_model());
    let p = pipeline(
        tmp.path(),
        &common::stories_gguf(),
        "add",
        "mode = \"add\"\ndirection = \"dir.safetensors:v\"\nlayer = 3\ncoeff = 3.5\ncontrol_vector = \"cv/steer.gguf\"",
    );
    // A dry run writes neither the checkpoint nor the control vector.
    common::mechc().arg("compile").arg(&p).arg("--dry-run").assert().success();
    assert!(!tmp.path().join("cv").exists() && !tmp.path().join("out-add").exists());
    let cv = (unit(&v) * 3.5).unwrap();
    let mut twin = Hooks::new();
    twin.intervene(HookPoint::ResidPost(3), Op::Add(cv.clone()));
    let d = compiled_vs_twin(&p, &tmp.path().join("out-add"), &mut twin);
    eprintln!("add: rel diff {d:e}");
    assert!(d <= 1e-5, "add: rel diff {d}");
    let cfg: serde_json::Value = serde_json::from_slice(&std::fs::read(tmp.path().join("out-add/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["mlp_bias"], true);
    let g = mechc::io::gguf::Gguf::open(&tmp.path().join("cv/steer.gguf")).unwrap();
    assert_eq!(g.str("general.architecture").unwrap(), "controlvector");
    assert_eq!(g.str("controlvector.model_hint").unwrap(), "llama");
    assert_eq!(g.u64("controlvector.layer_count").unwrap(), 1);
    assert_eq!(g.content.tensor_infos.keys().collect::<Vec<_>>(), ["direction.3"]);
    assert_eq!(common::max_abs_diff(&g.tensor("direction.3").unwrap(), &cv), 0.0);
}

#[test]
fn ablate_equals_its_twin_full_and_per_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let v = direction(tmp.path(), d_model());
    let abs = tmp.path().join("dir.safetensors");
    let opts = format!("mode = \"ablate\"\ndirection = \"{}\"", abs.display());
    let p = pipeline(tmp.path(), &common::stories_gguf(), "ablate", &opts);
    let mut twin = Hooks::new();
    twin.project_out_everywhere(&v, 5);
    let d = compiled_vs_twin(&p, &tmp.path().join("out-ablate"), &mut twin);
    eprintln!("ablate: rel diff {d:e}");
    assert!(d <= 1e-5, "ablate: rel diff {d}");

    // Per-layer weights, embedding kept: an independent partial-projection twin.
    let p = pipeline(
        tmp.path(),
        &common::stories_gguf(),
        "partial",
        "mode = \"ablate\"\ndirection = \"dir.safetensors\"\nlayers = [4, 1]\nweights = [0.5, 1.25]\nembed = false",
    );
    let r = unit(&v);
    let mut twin = Hooks::new();
    for (l, lambda) in [(1usize, 1.25f64), (4, 0.5)] {
        for point in [HookPoint::AttnOut(l), HookPoint::MlpOut(l)] {
            let r = r.clone();
            twin.intervene(
                point,
                Op::Func(std::sync::Arc::new(move |x: &Tensor| {
                    let along = x.broadcast_mul(&r)?.sum_keepdim(candle_core::D::Minus1)?;
                    x - (along.broadcast_mul(&r)? * lambda)?
                })),
            );
        }
    }
    let d = compiled_vs_twin(&p, &tmp.path().join("out-partial"), &mut twin);
    eprintln!("ablate per-layer: rel diff {d:e}");
    assert!(d <= 1e-5, "ablate per-layer: rel diff {d}");
}

#[test]
fn bad_input_fails_with_one_line_naming_the_option() {
    let tmp = tempfile::tempdir().unwrap();
    let stories = common::stories_gguf();
    direction(tmp.path(), d_model());
    let p = pipeline(tmp.path(), &stories, "size", "mode = \"ablate\"\ndirection = [1.0, 2.0, 3.0]");
    common::fails(
        common::mechc().arg("compile").arg(&p),
        &["pass[0] (bake-steering)", "`direction` has 3 values", "d_model"],
    );
    // A file holding a tensor of the wrong size.
    let small = Tensor::from_vec(vec![1f32; 7], 7, &Device::Cpu).unwrap();
    mechc::verify::steer::save_direction(&tmp.path().join("small.safetensors"), "x", &small).unwrap();
    let p = pipeline(
        tmp.path(),
        &stories,
        "size2",
        "mode = \"ablate\"\ndirection = \"small.safetensors\"",
    );
    common::fails(common::mechc().arg("compile").arg(&p), &["`direction`", "[7]", "d_model"]);
    let p = pipeline(
        tmp.path(),
        &stories,
        "missing",
        "mode = \"ablate\"\ndirection = \"nope.safetensors:v\"",
    );
    common::fails(common::mechc().arg("compile").arg(&p), &["`direction`", "nope.safetensors"]);
    let p = pipeline(
        tmp.path(),
        &stories,
        "mode",
        "mode = \"amplify\"\ndirection = \"dir.safetensors\"",
    );
    common::fails(
        common::mechc().arg("compile").arg(&p),
        &["unknown `mode` = \"amplify\"", "add, ablate"],
    );
    let p = pipeline(
        tmp.path(),
        &stories,
        "nolayer",
        "mode = \"add\"\ndirection = \"dir.safetensors\"\ncoeff = 1.0",
    );
    common::fails(common::mechc().arg("compile").arg(&p), &["needs `layer`"]);
    let auto = "mode = \"add\"\ndirection = \"dir.safetensors\"\nlayer = 1\ncoeff = \"auto\"";
    let p = pipeline(tmp.path(), &stories, "auto", auto);
    common::fails(common::mechc().arg("compile").arg(&p), &["`coeff = \"auto\"`", "needs an `auto` table"]);
    let cv0 = "mode = \"add\"\ndirection = \"dir.safetensors\"\nlayer = 0\ncoeff = 1\ncontrol_vector = \"x.gguf\"";
    let p = pipeline(tmp.path(), &stories, "cv0", cv0);
    common::fails(common::mechc().arg("compile").arg(&p), &["`control_vector`", "block 0"]);
    let p = pipeline(
        tmp.path(),
        &stories,
        "typo",
        "mode = \"add\"\ndirection = \"dir.safetensors\"\nlayer = 1\ncoef = 1",
    );
    common::fails(common::mechc().arg("compile").arg(&p), &["unknown field `coef`"]);

    // add on a Qwen2 checkpoint: refused, pointing at ablate.
    let qwen = tmp.path().join("qwen");
    common::mechc()
        .args(["random-model", "--arch", "qwen2", "--seed", "3", "--out"])
        .arg(&qwen)
        .assert()
        .success();
    let d = mechc::io::load(&qwen, false).unwrap().model.cfg.hidden_size;
    let dir = format!("[{}]", vec!["0.5"; d].join(", "));
    let p = pipeline(
        tmp.path(),
        &qwen,
        "qwen",
        &format!("mode = \"add\"\ndirection = {dir}\nlayer = 0\ncoeff = 1"),
    );
    common::fails(common::mechc().arg("compile").arg(&p), &["Llama-only", "qwen2", "ablate"]);
    let p = pipeline(
        tmp.path(),
        &qwen,
        "qwen-ablate",
        &format!("mode = \"ablate\"\ndirection = {dir}"),
    );
    // (dry run: a random model has no tokenizer for the emitter to copy)
    common::mechc().arg("compile").arg(&p).arg("--dry-run").assert().success();
}
