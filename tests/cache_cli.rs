//! `mechc cache`: one cache for the scripts and a hand-run mechc, listed with what each entry is,
//! its size and last use, and pruned by age, kind or all — on real entries made by mechc itself
//! (a GGUF import, a pipeline's findings, a ROME covariance) in a temporary cache.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_mechc");
const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Sum of file sizes under `p`, computed here (not by the code under test).
fn du(p: &Path) -> u64 {
    let m = std::fs::symlink_metadata(p).unwrap();
    if m.is_dir() {
        std::fs::read_dir(p).unwrap().map(|e| du(&e.unwrap().path())).sum()
    } else {
        m.len()
    }
}

fn age(p: &Path, days: u64) {
    std::fs::File::open(p).unwrap().set_modified(SystemTime::now() - Duration::from_secs(days * 86400)).unwrap();
}

fn mechc_in(cache: &Path) -> assert_cmd::Command {
    let mut c = assert_cmd::Command::cargo_bin("mechc").unwrap();
    c.env("MECHC_CACHE", cache).env("MECHC_SHARED_DATA", common::shared_data()).args(["--no-progress"]);
    c
}

fn listing(cache: &Path) -> Value {
    let out = mechc_in(cache).args(["cache", "--json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn entries<'a>(l: &'a Value, kind: &str) -> Vec<&'a Value> {
    l["entries"].as_array().unwrap().iter().filter(|e| e["kind"] == kind).collect()
}

#[test]
fn list_and_prune_real_entries() {
    let gguf = common::stories_gguf();
    let text = common::shared_data().join("text/wikitext2-test.raw");
    if !gguf.exists() || !text.exists() {
        eprintln!("SKIPPED: {} or {} is missing", gguf.display(), text.display());
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");

    // Empty (missing) cache: a listing with no entries, not an error.
    let l = listing(&cache);
    assert_eq!(l["entries"].as_array().unwrap().len(), 0);

    // 1. A GGUF import (inspect imports it once), 2. findings of a [[locate]] step.
    mechc_in(&cache).arg("-q").arg("inspect").arg(&gguf).assert().success();
    let pipeline = tmp.path().join("p.toml");
    std::fs::write(
        &pipeline,
        format!(
            "version = 1\n[model]\npath = {:?}\n[[locate]]\nid = \"bi\"\nmethod = \"block-influence\"\ntext = {:?}\ntokens = 256\nseq_len = 64\n\
             [[pass]]\nname = \"skip-layers\"\nselect = {{ by = \"bi\", lowest = 1 }}\n[output]\npath = {:?}\n",
            gguf,
            text,
            tmp.path().join("out")
        ),
    )
    .unwrap();
    mechc_in(&cache).arg("-q").arg("compile").arg(&pipeline).arg("--dry-run").assert().success();
    // 3. A covariance, through the code rank-one-edit uses, into the cache's rome-cov folder.
    let import_dir = std::fs::read_dir(cache.join("gguf")).unwrap().next().unwrap().unwrap().path();
    let loaded = mechc::io::load(&import_dir, false).unwrap();
    let ids = mechc::locate::text_ids(loaded.tok().unwrap(), &text, 128).unwrap();
    let (_, was_cached) =
        mechc::rome::covariance::Covariance::cached(&loaded.model, 1, &ids, 64, &cache.join("rome-cov"), |_, _| {}).unwrap();
    assert!(!was_cached);
    // A folder of the scripts (models/) beside them.
    std::fs::create_dir_all(cache.join("models")).unwrap();
    std::fs::write(cache.join("models/some.gguf"), vec![0u8; 1000]).unwrap();

    let l = listing(&cache);
    assert_eq!(l["root"].as_str().unwrap(), cache.to_str().unwrap());
    let g = entries(&l, "gguf");
    assert_eq!(g.len(), 1, "{l:#}");
    assert!(g[0]["what"].as_str().unwrap().contains("stories260K.gguf"), "{l:#}");
    assert_eq!(g[0]["bytes"].as_u64().unwrap(), du(&import_dir));
    let f = entries(&l, "findings");
    assert_eq!(f.len(), 1, "{l:#}");
    assert!(f[0]["what"].as_str().unwrap().contains("block-influence"), "{l:#}");
    assert_eq!(f[0]["bytes"].as_u64().unwrap(), du(Path::new(f[0]["path"].as_str().unwrap())));
    let c = entries(&l, "rome-cov");
    assert_eq!(c.len(), 1, "{l:#}");
    assert!(c[0]["what"].as_str().unwrap().contains("blocks.1.mlp.hook_post"), "{l:#}");
    let others = l["others"].as_array().unwrap();
    assert_eq!(others.len(), 1);
    assert_eq!(others[0]["bytes"], 1000);
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
    for e in l["entries"].as_array().unwrap() {
        assert!(now - e["last_used"].as_u64().unwrap() < 3600, "just made, yet last used long ago: {e}");
    }
    // The human table names every entry and the total.
    let human = mechc_in(&cache).arg("cache").output().unwrap();
    let human = String::from_utf8_lossy(&human.stdout);
    let total = g[0]["bytes"].as_u64().unwrap() + f[0]["bytes"].as_u64().unwrap() + c[0]["bytes"].as_u64().unwrap();
    assert!(human.contains("stories260K.gguf") && human.contains("block-influence") && human.contains("in 3 entries"), "{human}");
    assert!(human.contains(&mechc::io::cache::human_bytes(total)), "{human}");

    // Reusing an entry makes it recent: age the import, use it again, and it is no longer old.
    age(&import_dir, 10);
    assert!(now - entries(&listing(&cache), "gguf")[0]["last_used"].as_u64().unwrap() > 9 * 86400);
    mechc_in(&cache).arg("-q").arg("inspect").arg(&gguf).assert().success();
    assert!(now.abs_diff(entries(&listing(&cache), "gguf")[0]["last_used"].as_u64().unwrap()) < 3600);

    // Prune by age: only the entry unused for 10 days goes; --dry-run deletes nothing.
    age(&import_dir, 10);
    let dry = mechc_in(&cache).args(["cache", "prune", "--older-than", "5", "--dry-run"]).output().unwrap();
    let dry = String::from_utf8_lossy(&dry.stdout);
    assert!(dry.contains("would delete") && dry.contains("1 entries"), "{dry}");
    assert!(import_dir.exists());
    mechc_in(&cache).args(["cache", "prune", "--older-than", "5"]).assert().success();
    assert!(!import_dir.exists());
    let l = listing(&cache);
    assert_eq!((entries(&l, "gguf").len(), entries(&l, "findings").len(), entries(&l, "rome-cov").len()), (0, 1, 1));

    // By kind; then everything; the scripts' folder is never touched.
    mechc_in(&cache).args(["cache", "prune", "--kind", "findings"]).assert().success();
    let l = listing(&cache);
    assert_eq!((entries(&l, "findings").len(), entries(&l, "rome-cov").len()), (0, 1));
    mechc_in(&cache).args(["cache", "prune", "--all"]).assert().success();
    assert_eq!(listing(&cache)["entries"].as_array().unwrap().len(), 0);
    assert_eq!(std::fs::read(cache.join("models/some.gguf")).unwrap().len(), 1000);
    // Nothing left behind in the kind folders (no temporaries of the deletion).
    for k in ["gguf", "findings", "rome-cov"] {
        if let Ok(rd) = std::fs::read_dir(cache.join(k)) {
            assert_eq!(rd.count(), 0, "{k} not empty");
        }
    }

    // No filter, a bad kind, a negative age: one-line errors.
    common::fails(mechc_in(&cache).args(["cache", "prune"]), &["--older-than", "--all"]);
    common::fails(mechc_in(&cache).args(["cache", "prune", "--older-than=-1"]), &["--older-than"]);
    let o = mechc_in(&cache).args(["cache", "prune", "--kind", "models"]).output().unwrap();
    assert!(!o.status.success());
}

/// A command with neither MECHC_CACHE nor a user cache dir of its own: HOME and XDG_CACHE_HOME
/// point into `home`, so a fallback to ~/.cache/mechc would show there.
fn without_cache_env(mut c: Command, home: &Path) -> Command {
    c.env_remove("MECHC_CACHE").env("HOME", home).env("XDG_CACHE_HOME", home.join("xdg"));
    c
}

fn stdout_line(mut c: Command) -> String {
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap().trim_end().to_string()
}

#[test]
fn scripts_and_hand_runs_share_one_cache() {
    let home = tempfile::tempdir().unwrap();
    let script = Path::new(REPO).join("scripts/cache_dir.sh");
    let checkout_cache = PathBuf::from(REPO).join(".cache");

    // The rule, both ways: without MECHC_CACHE the checkout's .cache/, with it that folder.
    let mut s = Command::new("bash");
    s.arg(&script);
    let by_script = stdout_line(without_cache_env(s, home.path()));
    let mut h = Command::new(BIN);
    h.args(["cache", "--path"]);
    let by_hand = stdout_line(without_cache_env(h, home.path()));
    assert_eq!(Path::new(&by_script), checkout_cache);
    assert_eq!(Path::new(&by_hand), checkout_cache);
    let elsewhere = home.path().join("elsewhere");
    let mut s = Command::new("bash");
    s.arg(&script).env("MECHC_CACHE", &elsewhere);
    let mut h = Command::new(BIN);
    h.args(["cache", "--path"]).env("MECHC_CACHE", &elsewhere);
    assert_eq!(stdout_line(s), elsewhere.to_str().unwrap());
    assert_eq!(stdout_line(h), elsewhere.to_str().unwrap());

    // The same GGUF used the scripts' way, then by hand: imported once. A copy with a few bytes
    // appended (after the tensor data; the reader ignores them) is a file no cache has seen.
    let src = common::stories_gguf();
    if !src.exists() {
        eprintln!("SKIPPED: {} is missing", src.display());
        return;
    }
    let gguf = home.path().join("fresh.gguf");
    let mut bytes = std::fs::read(&src).unwrap();
    bytes.extend_from_slice(format!("{:?}{}", SystemTime::now(), std::process::id()).as_bytes());
    std::fs::write(&gguf, &bytes).unwrap();
    let entry = checkout_cache.join("gguf").join(&mechc::io::sha256_file(&gguf).unwrap()[..16]);
    assert!(!entry.exists());

    // The scripts' way: MECHC_CACHE from scripts/cache_dir.sh, then mechc.
    let mut scripted = Command::new("bash");
    scripted.args(["-c", r#"export MECHC_CACHE="$(bash "$1")"; "$2" -v --no-progress inspect "$3""#, "_"]).arg(&script).arg(BIN).arg(&gguf);
    let o = without_cache_env(scripted, home.path()).output().unwrap();
    let err1 = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "{err1}");
    assert!(err1.contains("importing") && err1.contains(entry.to_str().unwrap()), "{err1}");
    assert!(entry.join("config.json").exists());

    // By hand: no MECHC_CACHE at all.
    let mut hand = Command::new(BIN);
    hand.args(["-v", "--no-progress", "inspect"]).arg(&gguf);
    let o = without_cache_env(hand, home.path()).output().unwrap();
    let err2 = String::from_utf8_lossy(&o.stderr).to_string();
    let _ = std::fs::remove_dir_all(&entry); // this test's entry only
    assert!(o.status.success(), "{err2}");
    assert!(err2.contains("using the import") && err2.contains(entry.to_str().unwrap()) && !err2.contains("importing"), "{err2}");
    // Nothing went to a user cache.
    assert!(!home.path().join("xdg").exists() && !home.path().join(".cache").exists());
}
