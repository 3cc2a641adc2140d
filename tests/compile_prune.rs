//! `mechc compile` with prune-neurons and prune-heads on stories260K (5 layers, 8 query / 4 kv
//! heads of 8, d_ff 172): the emitted checkpoint loads (stock config when uniform, the per-layer
//! extension when not), equals the source under the pass's twin, and bad options fail in one line.

mod common;

use std::path::{Path, PathBuf};

use mechc::model::decoder::Fwd;
use mechc::runtime::{Batch, Hooks};

/// A pipeline over stories260K with one `[[pass]]` (body `pass`), output `out-NAME`.
fn pipeline(dir: &Path, name: &str, pass: &str) -> PathBuf {
    let body = format!(
        "version = 1\n[model]\npath = \"{}\"\n[[pass]]\n{pass}\n[output]\npath = \"out-{name}\"\n",
        common::stories_gguf().display()
    );
    let p = dir.join(format!("{name}.toml"));
    std::fs::write(&p, body).unwrap();
    p
}

/// Compile `pass` (TOML lines of a `[[pass]]` table), reload the output with our loader, and
/// check it against the source run with the pass's twin. Returns the output's config.json.
fn compile_and_check_twin(dir: &Path, name: &str, pass: &str) -> serde_json::Value {
    let p = pipeline(dir, name, pass);
    common::mechc().arg("compile").arg(&p).assert().success();
    let out = dir.join(format!("out-{name}"));
    let compiled = mechc::io::load(&out, false).unwrap();
    let source = mechc::io::load(&common::stories_gguf(), false).unwrap();
    let table: toml::Table = toml::from_str(pass).unwrap();
    let pass_name = table["name"].as_str().unwrap().to_string();
    let mut opts = table.clone();
    opts.remove("name");
    let built = (mechc::passes::find(&pass_name).unwrap().build)(&opts, &mechc::passes::BuildCtx::new(&source.model)).unwrap();
    let ids = source
        .tok()
        .unwrap()
        .encode("Once upon a time, there was a little dog named Max. He liked to run", true)
        .unwrap();
    let got = compiled
        .model
        .forward(&Batch::single(&ids), None, &mut Hooks::new(), Fwd::default())
        .unwrap();
    let mut twin = built.twin(&source.model).unwrap();
    let want = source
        .model
        .forward(&Batch::single(&ids), None, &mut twin, Fwd::default())
        .unwrap();
    let d = common::rel_diff(&got, &want);
    assert!(d <= 1e-5, "{name}: compiled vs twin rel diff {d}");
    let plain = source
        .model
        .forward(&Batch::single(&ids), None, &mut Hooks::new(), Fwd::default())
        .unwrap();
    assert!(common::rel_diff(&got, &plain) > 1e-4, "{name}: the pass changed nothing");
    serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap()
}

/// Calibration ids for mean compensation: the first TinyStories lines, tokenized, as JSON.
fn calibration_ids(dir: &Path) -> PathBuf {
    let source = mechc::io::load(&common::stories_gguf(), false).unwrap();
    let text = std::fs::read_to_string(common::shared_data().join("text/tinystories-subset.txt")).unwrap();
    let seqs: Vec<Vec<u32>> = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .take(4)
        .map(|l| source.tok().unwrap().encode(l, true).unwrap())
        .collect();
    let p = dir.join("calib.json");
    std::fs::write(&p, serde_json::to_string(&seqs).unwrap()).unwrap();
    p
}

#[test]
fn uniform_neuron_pruning_keeps_a_stock_config() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = compile_and_check_twin(tmp.path(), "n", "name = \"prune-neurons\"\ncount = 44\nuniform = true");
    assert_eq!(cfg["intermediate_size"], 128);
    assert!(cfg.get("mechc_layer_intermediate_size").is_none(), "{cfg}");
    assert_eq!(cfg["mlp_bias"], false);
}

#[test]
fn mean_compensated_neuron_pruning_creates_mlp_biases() {
    let tmp = tempfile::tempdir().unwrap();
    let ids = calibration_ids(tmp.path());
    let pass = format!(
        "name = \"prune-neurons\"\nfraction = 0.25\ncompensate = \"mean\"\nmean_over = \"{}\"\ntokens = 400",
        ids.display()
    );
    let cfg = compile_and_check_twin(tmp.path(), "nm", &pass);
    assert_eq!(cfg["intermediate_size"], 129);
    assert_eq!(cfg["mlp_bias"], true);
    let st = mechc::io::st::StFile::open(&tmp.path().join("out-nm/model.safetensors")).unwrap();
    let names = st
        .view()
        .unwrap()
        .names()
        .into_iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>();
    for l in 0..5 {
        for p in ["gate_proj", "up_proj", "down_proj"] {
            assert!(
                names.contains(&format!("model.layers.{l}.mlp.{p}.bias")),
                "missing {p} bias of layer {l}"
            );
        }
    }
}

#[test]
fn uniform_head_pruning_keeps_a_stock_config() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = compile_and_check_twin(tmp.path(), "h", "name = \"prune-heads\"\nper_group = 1\nuniform = true");
    assert_eq!(
        (cfg["num_attention_heads"].as_u64(), cfg["num_key_value_heads"].as_u64()),
        (Some(4), Some(4))
    );
    assert_eq!(cfg["head_dim"], 8);
    assert!(cfg.get("mechc_layer_num_attention_heads").is_none(), "{cfg}");
    // Mean compensation folds into o_proj biases (attention_bias = true, zero q/k/v biases).
    let ids = calibration_ids(tmp.path());
    let pass = format!(
        "name = \"prune-heads\"\nheads = [\"L1.H2\", \"L1.H3\", \"L2.H0\", \"L2.H3\", \"L2.H5\", \"L2.H7\"]\ncompensate = \"mean\"\nmean_over = \"{}\"",
        ids.display()
    );
    let cfg = compile_and_check_twin(tmp.path(), "hm", &pass);
    assert_eq!(cfg["attention_bias"], true);
}

#[test]
fn non_uniform_head_and_neuron_pruning_load_in_our_runtime() {
    let tmp = tempfile::tempdir().unwrap();
    // Layer 0 loses kv group 0 (heads 0, 1); layer 3 loses one query head per group.
    let cfg = compile_and_check_twin(
        tmp.path(),
        "hn",
        "name = \"prune-heads\"\nheads = [\"L0.H0\", \"L0.H1\", \"L3.H0\", \"L3.H3\", \"L3.H4\", \"L3.H7\"]",
    );
    assert_eq!(cfg["mechc_layer_num_attention_heads"], serde_json::json!([6, 8, 8, 4, 8]));
    assert_eq!(cfg["mechc_layer_num_key_value_heads"], serde_json::json!([3, 4, 4, 4, 4]));
    let cfg = compile_and_check_twin(
        tmp.path(),
        "nn",
        "name = \"prune-neurons\"\nneurons = { \"1\" = [0, 5, 9], \"L4\" = [171] }",
    );
    assert_eq!(
        cfg["mechc_layer_intermediate_size"],
        serde_json::json!([172, 169, 172, 172, 171])
    );
    // `uniform = true` refuses what would need the extension.
    let p = pipeline(
        tmp.path(),
        "u",
        "name = \"prune-neurons\"\nneurons = { \"1\" = [0] }\nuniform = true",
    );
    common::fails(
        common::mechc().arg("compile").arg(&p),
        &["pass[0] (prune-neurons)", "uniform = true", "different d_ff"],
    );
}

#[test]
fn bad_options_fail_in_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &[&str])] = &[
        ("name = \"prune-heads\"\nheads = [\"L0.H8\"]", &["pass[0] (prune-heads)", "head 8 does not exist", "0..7"]),
        ("name = \"prune-heads\"\nheads = [\"L7.H0\"]", &["layer 7 does not exist"]),
        ("name = \"prune-heads\"\nheads = [\"3.2\"]", &["`heads`", "L<layer>.H<head>"]),
        ("name = \"prune-heads\"\nheads = [\"L0.H0\"]", &["uneven GQA groups", "layer 0"]),
        ("name = \"prune-heads\"\nheads = [\"L0.H0\", \"L0.H1\", \"L0.H2\", \"L0.H3\", \"L0.H4\", \"L0.H5\", \"L0.H6\", \"L0.H7\"]", &["leaves no attention"]),
        ("name = \"prune-heads\"\nhead = [\"L0.H0\"]", &["unknown field `head`"]),
        ("name = \"prune-heads\"\nper_group = 2", &["`per_group`"]),
        ("name = \"prune-heads\"\nheads = [\"L0.H0\", \"L0.H2\", \"L0.H4\", \"L0.H6\"]\ncompensate = \"avg\"", &["unknown variant `avg`"]),
        ("name = \"prune-heads\"\nheads = [\"L0.H0\", \"L0.H1\"]\ncompensate = \"mean\"", &["needs calibration tokens"]),
        ("name = \"prune-neurons\"\nneurons = { \"0\" = [172] }", &["pass[0] (prune-neurons)", "neuron 172 of layer 0 does not exist"]),
        ("name = \"prune-neurons\"\nneurons = { \"x\" = [1] }", &["`neurons`", "key `x`"]),
        ("name = \"prune-neurons\"\nfraction = 1.5", &["`fraction`"]),
        ("name = \"prune-neurons\"\ncount = 4\nby = \"vibes\"", &["`by`", "vibes"]),
        ("name = \"prune-neurons\"\ncount = 4\ncompensate = \"mean\"\nmean_over_ids = [9999]", &["`mean_over_ids`", "9999"]),
        ("name = \"prune-neurons\"\ncount = 4\ncompensate = \"mean\"\nmean_over = \"/nonexistent/ids.json\"", &["`mean_over`"]),
        ("name = \"prune-neurons\"\ncount = 4\nneuron = 3", &["unknown field `neuron`"]),
    ];
    for (i, (pass, needles)) in cases.iter().enumerate() {
        let p = pipeline(tmp.path(), &format!("bad{i}"), pass);
        common::fails(common::mechc().arg("compile").arg(&p), needles);
    }
}
