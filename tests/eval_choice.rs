//! A/B choice scoring (CAA format) on the real CAA refusal test items.
//!
//! Models come from `$MECHC_CACHE/models` (default `<repo>/.cache/models`); a test whose model
//! file is missing prints why and returns.

mod common;

use std::path::PathBuf;
use std::time::Instant;

use assert_cmd::Command;
use mechc::verify::choice::{self, ChoiceItem, ChoiceOpts};
use mechc::runtime::score;
use serde_json::Value;


fn items_file() -> PathBuf {
    common::shared_data().join("prompts/refusal/caa_refusal_test_ab.json")
}

fn load(name: &str) -> Option<mechc::io::Loaded> {
    let path = common::registry_model(name)?;
    std::env::set_var("MECHC_CACHE", common::cache());
    Some(mechc::io::load(&path, false).unwrap())
}

#[test]
fn smollm2_scores_are_probabilities_and_swap_to_one_minus() {
    let Some(m) = load(common::SMOLLM2) else { return };
    let tok = m.tok().unwrap();
    let items = choice::load_items(&items_file(), 0).unwrap();
    assert_eq!(items.len(), 50);
    // Both letters occur as the matching answer in the file, so a scorer that ignored the
    // labels would be caught below.
    assert!(items.iter().any(|i| i.matching == 'A') && items.iter().any(|i| i.matching == 'B'));

    let t = Instant::now();
    let r = choice::choice_eval(&m.model, tok, &items, &ChoiceOpts::default()).unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(r.rows.len(), 50);
    for row in &r.rows {
        assert!(row.logprob_matching <= 0.0 && row.logprob_not_matching <= 0.0);
        assert!((0.0..=1.0).contains(&row.score) && row.score.is_finite());
        assert!(row.letter_mass > 0.0 && row.letter_mass <= 1.0 + 1e-6, "{}", row.letter_mass);
    }
    let mean = r.rows.iter().map(|x| x.score).sum::<f64>() / 50.0;
    assert!((r.mean_score - mean).abs() < 1e-12);
    eprintln!(
        "SmolLM2-135M-Instruct on CAA refusal A/B: behaviour score {:.4}, matching preferred {:.0}%, mean p(A)+p(B) {:.3} ({secs:.1} s)",
        r.mean_score,
        100.0 * r.share_matching,
        r.mean_letter_mass
    );

    // Swapping which answer shows the behaviour gives 1 − score on every item.
    let swapped: Vec<ChoiceItem> = items.iter().map(ChoiceItem::swapped).collect();
    let s = choice::choice_eval(&m.model, tok, &swapped, &ChoiceOpts::default()).unwrap();
    for (i, (a, b)) in r.rows.iter().zip(&s.rows).enumerate() {
        assert!((a.score + b.score - 1.0).abs() < 1e-6, "item {i}: {} + {} != 1", a.score, b.score);
    }
    assert!((r.mean_score + s.mean_score - 1.0).abs() < 1e-6);
    assert!(
        (r.share_matching + s.share_matching - 1.0).abs() < 1e-12
            || r.rows.iter().any(|x| x.logprob_matching == x.logprob_not_matching)
    );

    // The letters' log-probs are the teacher-forced ones of the letter after the prefix ending in "(",
    // computed here by an independent path (continuation_logprobs, batch 1, no length sorting).
    let paren = tok.encode("(", false).unwrap();
    assert_eq!(paren.len(), 1);
    for (i, it) in items.iter().enumerate().take(6) {
        let prefix = choice::prefix_ids(tok, &it.question, true).unwrap();
        assert_eq!(prefix.last(), paren.last(), "item {i}: the prompt must end with the '(' token");
        let rendered = tok.decode(&prefix, false).unwrap();
        assert!(rendered.contains(&it.question) && rendered.ends_with("assistant\n("), "{rendered:?}");
        let letter = tok.encode(&it.matching.to_string(), false).unwrap();
        let lp = score::continuation_logprobs(&m.model, &[prefix], &[letter], 1).unwrap()[0][0];
        assert!((lp - r.rows[i].logprob_matching).abs() < 1e-4, "item {i}: {lp} vs {}", r.rows[i].logprob_matching);
    }
}

/// `joint` scores the answers as the tokenizer writes them. SmolLM2 writes "(" and "A" apart, so
/// joint is the default mode exactly; Qwen2 writes "(A" as one token, so joint compares "(A" with
/// "(B" after the bare assistant prompt. Measured on all 50 items: Qwen2.5-Coder-0.5B-Instruct,
/// default mode score 0.351 with mean p(A)+p(B) 0.020 (the letters are unlikely after a lone "(");
/// joint 0.424 with mass 0.784.
#[test]
fn joint_mode_equals_default_where_the_tokenizer_splits_and_uses_merged_tokens_where_not() {
    let items = choice::load_items(&items_file(), 6).unwrap();
    if let Some(m) = load(common::SMOLLM2) {
        let tok = m.tok().unwrap();
        let a = choice::choice_eval(&m.model, tok, &items, &ChoiceOpts::default()).unwrap();
        let b = choice::choice_eval(&m.model, tok, &items, &ChoiceOpts { joint: true, ..Default::default() }).unwrap();
        assert_eq!(a.letter_tokens, b.letter_tokens);
        for (x, y) in a.rows.iter().zip(&b.rows) {
            assert!((x.logprob_matching - y.logprob_matching).abs() < 1e-4 && (x.score - y.score).abs() < 1e-4);
        }
    }
    let Some(m) = load(common::QWEN) else { return };
    let tok = m.tok().unwrap();
    let t = Instant::now();
    let a = choice::choice_eval(&m.model, tok, &items, &ChoiceOpts::default()).unwrap();
    let b = choice::choice_eval(&m.model, tok, &items, &ChoiceOpts { joint: true, ..Default::default() }).unwrap();
    let single = |s: &str| tok.encode(s, false).unwrap();
    assert_eq!(a.letter_tokens, [single("A"), single("B")]);
    assert_eq!(b.letter_tokens, [single("(A"), single("(B")]);
    assert_eq!(b.letter_tokens[0].len(), 1, "Qwen2 writes (A as one token");
    // The joint log-prob of "(A" is the next-token log-prob after the prompt without "(".
    let prompt = tok.encode(&tok.apply_chat(&items[0].question).unwrap(), false).unwrap();
    let want = score::continuation_logprobs(&m.model, &[prompt], &[single("(B")], 1).unwrap()[0][0];
    assert_eq!(items[0].matching, 'B');
    assert!((want - b.rows[0].logprob_matching).abs() < 1e-4, "{want} vs {}", b.rows[0].logprob_matching);
    for r in b.rows.iter().chain(&a.rows) {
        assert!((0.0..=1.0).contains(&r.score) && r.letter_mass <= 1.0 + 1e-6);
    }
    eprintln!(
        "Qwen2.5-Coder-0.5B-Instruct, {} CAA items: default score {:.3} (p(A)+p(B) {:.3}), joint score {:.3} (p((A)+p((B) {:.3}) ({:.0} s)",
        items.len(),
        a.mean_score,
        a.mean_letter_mass,
        b.mean_score,
        b.mean_letter_mass,
        t.elapsed().as_secs_f64()
    );
}

/// "A" and "B" are single tokens for both tokenizers, and the letters the report names decode back.
#[test]
fn letters_are_single_tokens_for_both_tokenizers() {
    for name in [common::SMOLLM2, common::QWEN] {
        let Some(path) = common::registry_model(name) else { continue };
        std::env::set_var("MECHC_CACHE", common::cache());
        let dir = mechc::io::resolve(&path, false).unwrap();
        let tok = mechc::tokenizer::Tok::from_dir(&dir).unwrap();
        for l in ["A", "B"] {
            let id = choice::letter_token(&tok, l).unwrap();
            assert_eq!(tok.decode(&[id], false).unwrap(), l, "{name}");
        }
        assert_ne!(choice::letter_token(&tok, "A").unwrap(), choice::letter_token(&tok, "B").unwrap());
        // The check can fail: a string the tokenizer splits is refused with a clear message.
        let err = choice::letter_token(&tok, "Abracadabra xyzzy").unwrap_err().to_string();
        assert!(err.contains("single token") && err.contains("Abracadabra"), "{name}: {err}");
    }
}

#[test]
fn cli_json_and_bad_items() {
    let Some(smol) = common::registry_model(common::SMOLLM2) else { return };
    let out = Command::cargo_bin("mechc")
        .unwrap()
        .env("MECHC_CACHE", common::cache())
        .args(["-q", "eval", "choice", "--limit", "5", "--json", "--model"])
        .arg(&smol)
        .arg("--items")
        .arg(items_file())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["items"].as_u64(), Some(5));
    assert_eq!(v["rows"].as_array().unwrap().len(), 5);
    assert_eq!(v["sha256"].as_str().unwrap().len(), 64);

    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.json");
    std::fs::write(&bad, r#"[{"question": "q?", "answer_matching_behavior": "(A)"}]"#).unwrap();
    let out = Command::cargo_bin("mechc")
        .unwrap()
        .env("MECHC_CACHE", common::cache())
        .args(["-q", "eval", "choice", "--model"])
        .arg(&smol)
        .arg("--items")
        .arg(&bad)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("panicked"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("bad.json") && err.contains("answer_not_matching_behavior") && err.contains("missing"), "{err}");
}
