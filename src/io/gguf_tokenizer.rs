//! tokenizer.json from a GGUF's embedded vocabulary, built to give the ids the original
//! tokenizer gives. Two families:
//!
//! - `tokenizer.ggml.model = "llama"` (SentencePiece with scores, e.g. stories260K): a BPE with
//!   byte fallback whose merges are recovered from the scores (as transformers' `gguf_file=`
//!   does), SentencePiece's normaliser (prepend ▁, spaces → ▁) and the SentencePiece decoder.
//! - `tokenizer.ggml.model = "gpt2"` (byte-level BPE with merges): the pre-tokenizer depends on
//!   `tokenizer.ggml.pre`: `qwen2` splits with Qwen2's regex; `smollm` splits digits one by one
//!   before the GPT-2 byte-level regex, as SmolLM2's own tokenizer.json and llama.cpp do
//!   (transformers' GGUF loader misses this and merges a run of spaces before a digit differently).
//!
//! CONTROL tokens (type 3) become special added tokens, USER_DEFINED (type 4) plain added tokens.

use std::collections::{BTreeMap, HashMap};

use candle_core::quantized::gguf_file::Value;
use serde_json::{json, Value as J};

use super::gguf::Gguf;
use crate::error::{Error, Result};

pub struct BuiltTokenizer {
    pub tokenizer_json: J,
    pub tokenizer_config: J,
    pub special_tokens_map: J,
}

const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

const CONTROL: i64 = 3;
const USER_DEFINED: i64 = 4;

fn int(v: &Value) -> Option<i64> {
    v.to_i32().map(i64::from).or_else(|_| v.to_u32().map(i64::from)).or_else(|_| v.to_i64()).ok()
}

/// GPT-2's byte → printable character table.
pub fn bytes_to_unicode() -> [char; 256] {
    let mut bs: Vec<u32> = (b'!' as u32..=b'~' as u32).chain(0xA1..=0xAC).chain(0xAE..=0xFF).collect();
    let mut cs = bs.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !bs.contains(&b) {
            bs.push(b);
            cs.push(256 + n);
            n += 1;
        }
    }
    let mut table = ['\0'; 256];
    for (b, c) in bs.iter().zip(cs.iter()) {
        table[*b as usize] = char::from_u32(*c).unwrap_or('?');
    }
    table
}

pub fn build(g: &Gguf) -> Result<BuiltTokenizer> {
    let model = g.str("tokenizer.ggml.model")?.to_string();
    let tokens: Vec<String> = g
        .arr("tokenizer.ggml.tokens")?
        .iter()
        .map(|v| v.to_string().cloned().map_err(|_| Error::config(&g.path, "tokenizer.ggml.tokens", "expected strings")))
        .collect::<Result<_>>()?;
    if tokens.is_empty() {
        return Err(Error::config(&g.path, "tokenizer.ggml.tokens", "empty vocabulary"));
    }
    let types: Vec<i64> = match g.get("tokenizer.ggml.token_type") {
        Some(Value::Array(a)) => a.iter().map(|v| int(v).unwrap_or(1)).collect(),
        _ => vec![1; tokens.len()],
    };
    // Ids outside the vocabulary (llama.cpp writes 0xFFFFFFFF for "none") mean "no such token".
    let tok_id = |key: &str| -> Result<Option<u32>> {
        Ok(g.opt_u64(key)?.filter(|&i| (i as usize) < tokens.len()).map(|i| i as u32))
    };
    let bos = tok_id("tokenizer.ggml.bos_token_id")?;
    let eos = tok_id("tokenizer.ggml.eos_token_id")?;
    let unk = tok_id("tokenizer.ggml.unknown_token_id")?;
    let pad = tok_id("tokenizer.ggml.padding_token_id")?;
    let name = |i: Option<u32>| i.map(|i| tokens[i as usize].clone());

    let (mut tj, add_bos) = match model.as_str() {
        "llama" => (sentencepiece(g, &tokens)?, g.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(true)),
        "gpt2" => (byte_level(g, &tokens)?, g.opt_bool("tokenizer.ggml.add_bos_token").unwrap_or(false)),
        other => {
            return Err(Error::config(&g.path, "tokenizer.ggml.model", format!("`{other}` is not supported (llama, gpt2)")))
        }
    };
    let add_eos = g.opt_bool("tokenizer.ggml.add_eos_token").unwrap_or(false);

    // Added tokens: control → special; user-defined → plain; SentencePiece also marks unk/bos/eos.
    let alphabet: std::collections::HashSet<char> = bytes_to_unicode().into_iter().collect();
    let mut added: BTreeMap<u32, bool> = BTreeMap::new();
    for (i, (t, &ty)) in tokens.iter().zip(types.iter()).enumerate() {
        let spelled = model != "gpt2" || t.chars().all(|c| alphabet.contains(&c));
        if ty == CONTROL && spelled {
            added.insert(i as u32, true);
        } else if ty == USER_DEFINED {
            added.entry(i as u32).or_insert(false);
        }
    }
    if model == "llama" {
        for id in [unk, bos, eos].into_iter().flatten() {
            added.insert(id, true);
        }
    }
    tj["added_tokens"] = J::Array(
        added
            .iter()
            .map(|(&id, &special)| {
                json!({"id": id, "content": tokens[id as usize], "single_word": false, "lstrip": false,
                       "rstrip": false, "normalized": false, "special": special})
            })
            .collect(),
    );
    tj["post_processor"] = template_processing(add_bos.then(|| bos).flatten(), add_eos.then(|| eos).flatten(), &tokens);

    let mut cfg = serde_json::Map::new();
    cfg.insert("tokenizer_class".into(), "PreTrainedTokenizerFast".into());
    cfg.insert("add_bos_token".into(), add_bos.into());
    cfg.insert("add_eos_token".into(), add_eos.into());
    let mut special = serde_json::Map::new();
    for (k, v) in [("bos_token", name(bos)), ("eos_token", name(eos)), ("unk_token", name(unk)), ("pad_token", name(pad))] {
        if let Some(v) = v {
            cfg.insert(k.into(), v.clone().into());
            special.insert(k.into(), v.into());
        }
    }
    if let Some(ctx) = g.opt_u64(&format!("{}.context_length", g.str("general.architecture")?))? {
        cfg.insert("model_max_length".into(), ctx.into());
    }
    cfg.insert("clean_up_tokenization_spaces".into(), false.into());
    if let Some(t) = g.opt_str("tokenizer.chat_template") {
        cfg.insert("chat_template".into(), t.into());
    }
    // Validate by loading it, so a bad vocabulary fails the import instead of a later run.
    let text = serde_json::to_string(&tj).map_err(|e| Error::Tokenizer(e.to_string()))?;
    <tokenizers::Tokenizer as std::str::FromStr>::from_str(&text)
        .map_err(|e| Error::bad_file(&g.path, format!("the embedded vocabulary does not make a valid tokenizer: {e}")))?;
    Ok(BuiltTokenizer { tokenizer_json: tj, tokenizer_config: J::Object(cfg), special_tokens_map: J::Object(special) })
}

fn template_processing(bos: Option<u32>, eos: Option<u32>, tokens: &[String]) -> J {
    let mut single = vec![];
    let mut pair = vec![];
    let mut specials = serde_json::Map::new();
    let sp = |id: u32, type_id: u32| json!({"SpecialToken": {"id": tokens[id as usize], "type_id": type_id}});
    let seq = |s: &str, type_id: u32| json!({"Sequence": {"id": s, "type_id": type_id}});
    for id in [bos, eos].into_iter().flatten() {
        specials.insert(tokens[id as usize].clone(), json!({"id": tokens[id as usize], "ids": [id], "tokens": [tokens[id as usize]]}));
    }
    if let Some(b) = bos {
        single.push(sp(b, 0));
    }
    single.push(seq("A", 0));
    if let Some(e) = eos {
        single.push(sp(e, 0));
    }
    if let Some(b) = bos {
        pair.extend([sp(b, 0)]);
    }
    pair.push(seq("A", 0));
    if let Some(e) = eos {
        pair.push(sp(e, 0));
    }
    if let Some(b) = bos {
        pair.push(sp(b, 1));
    }
    pair.push(seq("B", 1));
    if let Some(e) = eos {
        pair.push(sp(e, 1));
    }
    json!({"type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": specials})
}

fn vocab_json(tokens: &[String]) -> J {
    let mut m = serde_json::Map::new();
    for (i, t) in tokens.iter().enumerate() {
        m.insert(t.clone(), i.into());
    }
    J::Object(m)
}

fn sentencepiece(g: &Gguf, tokens: &[String]) -> Result<J> {
    let scores: Vec<f32> = g
        .arr("tokenizer.ggml.scores")?
        .iter()
        .map(|v| v.to_f32().map_err(|_| Error::config(&g.path, "tokenizer.ggml.scores", "expected f32 scores")))
        .collect::<Result<_>>()?;
    if scores.len() != tokens.len() {
        return Err(Error::config(
            &g.path,
            "tokenizer.ggml.scores",
            format!("{} scores for {} tokens", scores.len(), tokens.len()),
        ));
    }
    let merges = merges_from_scores(tokens, &scores);
    // SentencePiece's own normalisation: spaces become ▁ and (by default) one ▁ is prepended.
    // This is what sentencepiece and llama.cpp do and what Llama-2's tokenizer.json says;
    // transformers' GGUF loader uses a Metaspace pre-tokenizer instead, which drops the prefix
    // ▁ when the text already starts with a space.
    let mut norm = vec![json!({"type": "Replace", "pattern": {"String": " "}, "content": "\u{2581}"})];
    if g.opt_bool("tokenizer.ggml.add_space_prefix").unwrap_or(true) {
        norm.insert(0, json!({"type": "Prepend", "prepend": "\u{2581}"}));
    }
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": {"type": "Sequence", "normalizers": norm},
        "pre_tokenizer": null,
        "post_processor": null,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u{2581}"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}
        ]},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
                  "end_of_word_suffix": null, "fuse_unk": true, "byte_fallback": true, "ignore_merges": false,
                  "vocab": vocab_json(tokens), "merges": merges}
    }))
}

/// Merges implied by a SentencePiece vocabulary with scores: every split of a token into two
/// vocabulary pieces, best score first; ties by piece lengths (longer first), then by the ids
/// of the pieces. This is the order transformers' `generate_merges` produces.
pub fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<[String; 2]> {
    // Python dict semantics: the last id of a duplicated token wins; iteration keeps first-seen order.
    let mut id: HashMap<&str, usize> = HashMap::new();
    let mut order: Vec<&str> = vec![];
    let mut score: HashMap<&str, f32> = HashMap::new();
    for (i, t) in tokens.iter().enumerate() {
        if id.insert(t, i).is_none() {
            order.push(t);
        }
        score.insert(t, scores[i]);
    }
    let mut merges: Vec<(String, String, f32)> = vec![];
    for tok in order {
        let chars: Vec<(usize, char)> = tok.char_indices().collect();
        let mut local = vec![];
        for &(byte_ix, _) in chars.iter().skip(1) {
            let (l, r) = tok.split_at(byte_ix);
            if id.contains_key(l) && id.contains_key(r) {
                local.push((l, r));
            }
        }
        local.sort_by_key(|(l, r)| (id[l], id[r]));
        merges.extend(local.into_iter().map(|(l, r)| (l.to_string(), r.to_string(), score[tok])));
    }
    // Stable sort, descending by (score, len(left), len(right)) in characters.
    merges.sort_by(|a, b| {
        let ka = (a.2, a.0.chars().count(), a.1.chars().count());
        let kb = (b.2, b.0.chars().count(), b.1.chars().count());
        kb.partial_cmp(&ka).unwrap_or(std::cmp::Ordering::Equal)
    });
    merges.into_iter().map(|(l, r, _)| [l, r]).collect()
}

fn byte_level(g: &Gguf, tokens: &[String]) -> Result<J> {
    let table = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    // A token spelled outside the byte alphabet is re-spelled byte by byte.
    let spelled: Vec<String> = tokens
        .iter()
        .map(|t| {
            if t.chars().all(|c| alphabet.contains(&c)) {
                t.clone()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            }
        })
        .collect();
    let merges: Vec<[String; 2]> = g
        .arr("tokenizer.ggml.merges")?
        .iter()
        .map(|v| {
            let s = v.to_string().map_err(|_| Error::config(&g.path, "tokenizer.ggml.merges", "expected strings"))?;
            let (a, b) = s
                .split_once(' ')
                .ok_or_else(|| Error::config(&g.path, "tokenizer.ggml.merges", format!("merge `{s}` has no space")))?;
            Ok([a.to_string(), b.to_string()])
        })
        .collect::<Result<_>>()?;
    let byte_level_regex = json!({"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true});
    let split = |re: &str| {
        json!({"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": re}, "behavior": "Isolated", "invert": false},
            {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}
        ]})
    };
    let pre = g.opt_str("tokenizer.ggml.pre").unwrap_or("default");
    let pre_tokenizer = match pre {
        "qwen2" | "deepseek-r1-qwen" => split(QWEN2_SPLIT),
        "llama3" | "llama-v3" | "llama-bpe" | "smaug-bpe" | "dbrx" => split(LLAMA3_SPLIT),
        "smollm" => json!({"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": true},
            byte_level_regex
        ]}),
        "gpt-2" | "default" => byte_level_regex,
        other => {
            return Err(Error::config(&g.path, "tokenizer.ggml.pre", format!("pre-tokenizer `{other}` is not supported (smollm, qwen2, llama-bpe, gpt-2)")))
        }
    };
    Ok(json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [],
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {"type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab_json(&spelled), "merges": merges}
    }))
}

// ---- the other direction: tokenizer.json → `tokenizer.ggml.*` (GGUF export) ----

const NORMAL: i32 = 1;
const UNKNOWN: i32 = 2;
const UNUSED: i32 = 5;
const BYTE: i32 = 6;

/// `tokenizer.ggml.pre` of a byte-level BPE: the name llama.cpp gives the pre-tokenizer this
/// tokenizer.json describes (llama.cpp applies its own regex per name, so an unrecognised one is
/// refused rather than exported as "default" and tokenised differently).
fn pre_name(pre: &J, path: &std::path::Path) -> Result<&'static str> {
    let kind = |p: &J| p.get("type").and_then(J::as_str).unwrap_or("").to_string();
    let parts: Vec<J> = match kind(pre).as_str() {
        "Sequence" => pre.get("pretokenizers").and_then(J::as_array).cloned().unwrap_or_default(),
        _ => vec![pre.clone()],
    };
    let regex = |p: &J| p.get("pattern").and_then(|x| x.get("Regex")).and_then(J::as_str).map(str::to_string);
    let kinds: Vec<String> = parts.iter().map(kind).collect();
    let byte_level_regex = |p: &J| kind(p) == "ByteLevel" && p.get("use_regex").and_then(J::as_bool).unwrap_or(true);
    match kinds.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["ByteLevel"] if byte_level_regex(&parts[0]) => Ok("gpt-2"),
        ["Digits", "ByteLevel"]
            if parts[0].get("individual_digits").and_then(J::as_bool) == Some(true) && byte_level_regex(&parts[1]) =>
        {
            Ok("smollm")
        }
        ["Split", "ByteLevel"] if regex(&parts[0]).as_deref() == Some(QWEN2_SPLIT) => Ok("qwen2"),
        ["Split", "ByteLevel"] if regex(&parts[0]).as_deref() == Some(LLAMA3_SPLIT) => Ok("llama-bpe"),
        _ => Err(Error::config(
            path,
            "pre_tokenizer",
            format!("not one llama.cpp names (gpt-2, smollm, qwen2, llama-bpe): {pre}"),
        )),
    }
}

/// The `tokenizer.ggml.*` metadata (and `tokenizer.chat_template`) of the tokenizer in `dir`, as
/// llama.cpp's converter writes it: every id up to the model's vocabulary (rows beyond the
/// tokenizer become `[PADn]`, UNUSED), token types (special added tokens CONTROL, other added
/// tokens USER_DEFINED, SentencePiece `<0xXX>` BYTE, the unknown token UNKNOWN), the merges of
/// a byte-level BPE, and for a SentencePiece BPE scores that order its merges (a token's score is
/// minus the rank of the first merge that makes it, so llama.cpp's best-score-first merging
/// follows the merge list; the import recovers the same merges from them).
pub fn gguf_meta(dir: &std::path::Path, cfg: &crate::model::ModelConfig) -> Result<Vec<(String, super::gguf_write::Meta)>> {
    use super::gguf_write::Meta;
    let path = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let tj: J = serde_json::from_str(&text).map_err(|e| Error::bad_file(&path, format!("invalid JSON: {e}")))?;
    let tok = crate::tokenizer::Tok::from_dir(dir)?;
    let model = &tj["model"];
    if model.get("type").and_then(J::as_str) != Some("BPE") {
        return Err(Error::config(&path, "model.type", "only BPE tokenizers can be exported to GGUF (byte-level or SentencePiece)"));
    }
    let byte_fallback = model.get("byte_fallback").and_then(J::as_bool).unwrap_or(false);
    let pre = tj.get("pre_tokenizer").filter(|p| !p.is_null());
    let spm = byte_fallback && !text.contains("\"ByteLevel\"");
    let vocab = model.get("vocab").and_then(J::as_object).ok_or_else(|| Error::config(&path, "model.vocab", "missing"))?;
    let mut by_id: BTreeMap<usize, String> = BTreeMap::new();
    for (t, id) in vocab {
        let id = id.as_u64().ok_or_else(|| Error::config(&path, "model.vocab", format!("`{t}` has no integer id")))?;
        by_id.insert(id as usize, t.clone());
    }
    let mut added_special: BTreeMap<usize, bool> = BTreeMap::new();
    for a in tj.get("added_tokens").and_then(J::as_array).into_iter().flatten() {
        let (Some(id), Some(content)) = (a.get("id").and_then(J::as_u64), a.get("content").and_then(J::as_str)) else {
            return Err(Error::config(&path, "added_tokens", format!("entry without id/content: {a}")));
        };
        by_id.insert(id as usize, content.to_string());
        added_special.insert(id as usize, a.get("special").and_then(J::as_bool).unwrap_or(false));
    }
    let n = by_id.keys().next_back().map_or(0, |&m| m + 1);
    if n > cfg.vocab_size {
        return Err(Error::config(&path, "model.vocab", format!("{n} token ids for an embedding of {} rows", cfg.vocab_size)));
    }
    // tokenizer_config.json names unk/pad tokens the model section may not.
    let unk = model.get("unk_token").and_then(J::as_str).map(str::to_string).or_else(|| tok.unk_token.clone());
    let pad = tok.pad_token.clone();
    let mut tokens = Vec::with_capacity(cfg.vocab_size);
    let mut types = Vec::with_capacity(cfg.vocab_size);
    for i in 0..cfg.vocab_size {
        let Some(t) = by_id.get(&i) else {
            tokens.push(format!("[PAD{i}]"));
            types.push(UNUSED);
            continue;
        };
        let is_byte = spm && t.len() == 6 && t.starts_with("<0x") && t.ends_with('>');
        types.push(match added_special.get(&i) {
            Some(true) => CONTROL as i32,
            Some(false) => USER_DEFINED as i32,
            None if unk.as_deref() == Some(t.as_str()) => UNKNOWN,
            None if is_byte => BYTE,
            None => NORMAL,
        });
        tokens.push(t.clone());
    }
    let merges: Vec<String> = model
        .get("merges")
        .and_then(J::as_array)
        .into_iter()
        .flatten()
        .map(|m| match m {
            J::String(s) => Ok(s.clone()),
            J::Array(p) if p.len() == 2 && p.iter().all(J::is_string) => {
                Ok(format!("{} {}", p[0].as_str().unwrap_or_default(), p[1].as_str().unwrap_or_default()))
            }
            other => Err(Error::config(&path, "model.merges", format!("`{other}` is not a merge"))),
        })
        .collect::<Result<_>>()?;
    let id_of = |s: &Option<String>| s.as_ref().and_then(|s| tokens.iter().position(|t| t == s)).map(|i| i as u32);
    // Special ids: the generation config's (what generation stops on) first, else the tokenizer's.
    let bos = cfg.bos_token_id.or_else(|| id_of(&tok.bos_token));
    let eos = cfg.eos_token_ids.first().copied().or_else(|| id_of(&tok.eos_token));
    let special_ids = [("bos", bos), ("eos", eos), ("unknown", id_of(&unk)), ("padding", id_of(&pad))];
    let mut m: Vec<(String, Meta)> = vec![];
    let mut put = |k: &str, v: Meta| m.push((format!("tokenizer.{k}"), v));
    if spm {
        let mut score = vec![0f32; tokens.len()];
        let mut seen = vec![false; tokens.len()];
        let index: HashMap<&str, usize> = tokens.iter().enumerate().map(|(i, t)| (t.as_str(), i)).collect();
        for (rank, mg) in merges.iter().enumerate() {
            let Some(&i) = index.get(mg.replacen(' ', "", 1).as_str()) else { continue };
            if !seen[i] {
                seen[i] = true;
                score[i] = -(rank as f32) - 1.0;
            }
        }
        let prefix = tj["normalizer"].to_string().contains("\"Prepend\"")
            || pre.is_some_and(|p| p.get("prepend_scheme").and_then(J::as_str).is_some_and(|s| s != "never"));
        put("ggml.model", Meta::str("llama"));
        put("ggml.tokens", Meta::StrArr(tokens));
        put("ggml.scores", Meta::F32Arr(score));
        put("ggml.token_type", Meta::I32Arr(types));
        put("ggml.add_space_prefix", Meta::Bool(prefix));
    } else {
        let Some(pre) = pre else {
            return Err(Error::config(&path, "pre_tokenizer", "a byte-level BPE without a pre-tokenizer cannot be exported"));
        };
        put("ggml.model", Meta::str("gpt2"));
        put("ggml.pre", Meta::str(pre_name(pre, &path)?));
        put("ggml.tokens", Meta::StrArr(tokens));
        put("ggml.token_type", Meta::I32Arr(types));
        put("ggml.merges", Meta::StrArr(merges));
    }
    for (k, id) in special_ids {
        if let Some(id) = id {
            put(&format!("ggml.{k}_token_id"), Meta::U32(id));
        }
    }
    // BOS/EOS added to every encoding: what the post-processor does (as tokenizers applies it).
    let probe = tok.encode("a", true)?;
    let bare = tok.encode("a", false)?;
    let add_bos = probe.len() > bare.len() && bos.is_some_and(|b| probe.first() == Some(&b));
    let add_eos = probe.len() > bare.len() && eos.is_some_and(|e| probe.last() == Some(&e));
    put("ggml.add_bos_token", Meta::Bool(add_bos));
    put("ggml.add_eos_token", Meta::Bool(add_eos));
    if let Some(t) = &tok.chat_template {
        put("chat_template", Meta::str(t.clone()));
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_follow_score_then_piece_length_then_ids() {
        let tokens: Vec<String> = ["a", "b", "c", "ab", "bc", "abc"].map(String::from).to_vec();
        let scores = [0.0, 0.0, 0.0, -1.0, -2.0, -3.0];
        let m = merges_from_scores(&tokens, &scores);
        let got: Vec<String> = m.iter().map(|[l, r]| format!("{l} {r}")).collect();
        // "abc" splits two ways at the same score: the longer left piece first.
        assert_eq!(got, ["a b", "b c", "ab c", "a bc"]);
    }

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }
}
