//! A/B multiple choice in the format of CAA (Rimsky et al. 2024, nrimsky/CAA): each item has a
//! `question` that lists the choices as "(A) ..." and "(B) ...", an `answer_matching_behavior`
//! and an `answer_not_matching_behavior` ("(A)" or "(B)").
//!
//! The question is the user turn; the assistant turn starts with "(" so that the next token is
//! the answer letter (CAA's convention), and the model's log-probabilities of the tokens "A" and
//! "B" there are compared. The letter is scored as a token of its own after the "(" token, even
//! when the tokenizer would merge "(A" into one token in running text (Qwen2's tokenizer does:
//! after a lone "(" such a model puts little mass on "A" and "B"; `letter_mass` shows it).
//!
//! The `joint` mode scores the answers as the tokenizer writes them instead: the texts
//! "...(A" and "...(B" are tokenised whole, and the tokens after their longest common prefix
//! are scored (teacher-forced, summed). Where the tokenizer splits "(" from the letter this is
//! exactly the default; where it merges them, the merged tokens "(A" and "(B" are compared.

use std::path::Path;

use serde::Serialize;

use crate::data::RecordSet;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::runtime::Hooks;
use crate::tokenizer::Tok;

use crate::runtime::score;

/// One item: the question and which letter shows the behaviour.
#[derive(Debug, Clone, PartialEq)]
pub struct ChoiceItem {
    pub question: String,
    /// 'A' or 'B'.
    pub matching: char,
    /// The other letter.
    pub not_matching: char,
}

impl ChoiceItem {
    /// The same item with the behaviour's answer swapped.
    pub fn swapped(&self) -> ChoiceItem {
        ChoiceItem { question: self.question.clone(), matching: self.not_matching, not_matching: self.matching }
    }
}

/// "(A)", "A", " (B) " -> the letter.
fn parse_letter(s: &str) -> Option<char> {
    let t = s.trim();
    let t = t.strip_prefix('(').and_then(|t| t.strip_suffix(')')).unwrap_or(t).trim();
    match t {
        "A" => Some('A'),
        "B" => Some('B'),
        _ => None,
    }
}

/// Items of a CAA-format JSON/JSONL file (`limit` > 0 keeps the first `limit`). Errors name the
/// file, the record and the field.
pub fn load_items(path: &Path, limit: usize) -> Result<Vec<ChoiceItem>> {
    let set = RecordSet::load(path, limit)?;
    if set.records.is_empty() {
        return Err(Error::bad_file(path, "the set is empty"));
    }
    let mut items = vec![];
    for i in 0..set.records.len() {
        let question = set.str_field(i, "question")?.to_string();
        let letter = |field: &str| -> Result<char> {
            let v = set.str_field(i, field)?;
            parse_letter(v)
                .ok_or_else(|| Error::config(path, field, format!("record {i}: expected \"(A)\" or \"(B)\", got {v:?}")))
        };
        let (matching, not_matching) = (letter("answer_matching_behavior")?, letter("answer_not_matching_behavior")?);
        if matching == not_matching {
            return Err(Error::config(
                path,
                "answer_not_matching_behavior",
                format!("record {i}: the same letter as the matching answer"),
            ));
        }
        items.push(ChoiceItem { question, matching, not_matching });
    }
    Ok(items)
}

#[derive(Debug, Clone, Serialize)]
pub struct ChoiceRow {
    /// "A" or "B".
    pub matching: String,
    pub logprob_matching: f32,
    pub logprob_not_matching: f32,
    /// p(matching) / (p(matching) + p(not matching)).
    pub score: f64,
    /// p(A) + p(B): how much of the next-token distribution the two letters take (in `joint`
    /// mode, the probabilities of the two answers' scored tokens).
    pub letter_mass: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ChoiceReport {
    pub items: usize,
    /// Mean of the per-item scores: the behaviour score.
    pub mean_score: f64,
    /// Share of items where p(matching) > p(not matching).
    pub share_matching: f64,
    pub mean_letter_mass: f64,
    pub chat: bool,
    pub joint: bool,
    /// The token ids scored for "A" and "B" (of the first item; in `joint` mode they can
    /// depend on the item).
    pub letter_tokens: [Vec<u32>; 2],
    pub rows: Vec<ChoiceRow>,
}

/// The id of `letter` as a token of its own; an error if the tokenizer does not encode it as
/// exactly one token.
pub fn letter_token(tok: &Tok, letter: &str) -> Result<u32> {
    let ids = tok.encode(letter, false)?;
    match ids.as_slice() {
        [id] => Ok(*id),
        _ => Err(Error::Tokenizer(format!(
            "choice eval needs \"{letter}\" to be a single token, but this tokenizer encodes it as {} tokens {ids:?}",
            ids.len()
        ))),
    }
}

/// The prompt up to and including the "(" before the answer letter: the chat template's user turn
/// with the generation prompt followed by "(" when `chat`, else the question, a blank line and
/// "Answer: (" with the tokenizer's own special tokens.
pub fn prefix_ids(tok: &Tok, question: &str, chat: bool) -> Result<Vec<u32>> {
    if chat {
        let text = tok.apply_chat_messages(&[("user", question)], true)? + "(";
        tok.encode(&text, false)
    } else {
        tok.encode(&format!("{question}\n\nAnswer: ("), true)
    }
}

/// p(matching) / (p(matching) + p(not)) from log-probabilities, computed stably; swapping the
/// arguments gives 1 − the result.
pub fn pair_score(lp_matching: f32, lp_not: f32) -> f64 {
    1.0 / (1.0 + (lp_not as f64 - lp_matching as f64).exp())
}

#[derive(Debug, Clone)]
pub struct ChoiceOpts {
    /// Question as a chat user turn (else plain text, see [`prefix_ids`]).
    pub chat: bool,
    /// Score "(A" / "(B" as the tokenizer writes them (see the module doc).
    pub joint: bool,
    pub batch: usize,
}

impl Default for ChoiceOpts {
    fn default() -> Self {
        ChoiceOpts { chat: true, joint: false, batch: 8 }
    }
}

/// Prompt tokens and the tokens of each answer ("A", "B") to score after them, per item.
type Scored = (Vec<u32>, [Vec<u32>; 2]);

fn after_paren(tok: &Tok, items: &[ChoiceItem], chat: bool) -> Result<Vec<Scored>> {
    let letters = [letter_token(tok, "A")?, letter_token(tok, "B")?];
    items.iter().map(|it| Ok((prefix_ids(tok, &it.question, chat)?, [vec![letters[0]], vec![letters[1]]]))).collect()
}

fn joint(tok: &Tok, items: &[ChoiceItem], chat: bool) -> Result<Vec<Scored>> {
    let mut out = vec![];
    for (i, it) in items.iter().enumerate() {
        let enc = |l: &str| -> Result<Vec<u32>> {
            if chat {
                tok.encode(&(tok.apply_chat_messages(&[("user", &it.question)], true)? + "(" + l), false)
            } else {
                tok.encode(&format!("{}\n\nAnswer: ({l}", it.question), true)
            }
        };
        let (a, b) = (enc("A")?, enc("B")?);
        let common = a.iter().zip(&b).take_while(|(x, y)| x == y).count();
        if common == 0 || common == a.len() || common == b.len() {
            return Err(Error::Tokenizer(format!(
                "item {i}: the answers \"(A\" and \"(B\" do not tokenise to distinct continuations"
            )));
        }
        out.push((a[..common].to_vec(), [a[common..].to_vec(), b[common..].to_vec()]));
    }
    Ok(out)
}

pub fn choice_eval(model: &Model, tok: &Tok, items: &[ChoiceItem], opts: &ChoiceOpts) -> Result<ChoiceReport> {
    if items.is_empty() {
        return Err(Error::invalid("choice eval: no items"));
    }
    let scored = if opts.joint { joint(tok, items, opts.chat)? } else { after_paren(tok, items, opts.chat)? };
    let mut lps = vec![[0f32; 2]; items.len()];
    if scored.iter().all(|(_, c)| c[0].len() == 1 && c[1].len() == 1) {
        // One forward per item: both answers are single tokens after the same prompt.
        let prompts: Vec<Vec<u32>> = scored.iter().map(|(p, _)| p.clone()).collect();
        score::next_token_logprobs(model, &prompts, opts.batch, &mut Hooks::new(), |i, lp| {
            let c = &scored[i].1;
            lps[i] = [lp[c[0][0] as usize], lp[c[1][0] as usize]];
            Ok(())
        })?;
    } else {
        let prompts: Vec<Vec<u32>> = scored.iter().flat_map(|(p, _)| [p.clone(), p.clone()]).collect();
        let conts: Vec<Vec<u32>> = scored.iter().flat_map(|(_, c)| c.clone()).collect();
        let lp = score::continuation_logprobs(model, &prompts, &conts, opts.batch)?;
        for i in 0..items.len() {
            lps[i] = [lp[2 * i].iter().sum(), lp[2 * i + 1].iter().sum()];
        }
    }
    let idx = |c: char| if c == 'A' { 0 } else { 1 };
    let rows: Vec<ChoiceRow> = items
        .iter()
        .zip(&lps)
        .map(|(it, lp)| {
            let (m, n) = (lp[idx(it.matching)], lp[idx(it.not_matching)]);
            ChoiceRow {
                matching: it.matching.to_string(),
                logprob_matching: m,
                logprob_not_matching: n,
                score: pair_score(m, n),
                letter_mass: (lp[0] as f64).exp() + (lp[1] as f64).exp(),
            }
        })
        .collect();
    let n = rows.len() as f64;
    Ok(ChoiceReport {
        items: rows.len(),
        mean_score: rows.iter().map(|r| r.score).sum::<f64>() / n,
        share_matching: rows.iter().filter(|r| r.logprob_matching > r.logprob_not_matching).count() as f64 / n,
        mean_letter_mass: rows.iter().map(|r| r.letter_mass).sum::<f64>() / n,
        chat: opts.chat,
        joint: opts.joint,
        letter_tokens: scored[0].1.clone(),
        rows,
    })
}

/// A short human summary plus the first `show` items.
pub fn table(r: &ChoiceReport, show: usize) -> String {
    let mut s = format!(
        "{} items: behaviour score (mean p(matching)/(p(A)+p(B))) {:.4}, matching preferred on {:.1}%, mean p(A)+p(B) {:.3}\n",
        r.items,
        r.mean_score,
        100.0 * r.share_matching,
        r.mean_letter_mass
    );
    if show > 0 {
        s += &format!("{:>5} {:>8} {:>10} {:>10} {:>8}\n", "item", "matching", "lp(match)", "lp(other)", "score");
        for (i, row) in r.rows.iter().take(show).enumerate() {
            s += &format!(
                "{:>5} {:>8} {:>10.4} {:>10.4} {:>8.4}\n",
                i, row.matching, row.logprob_matching, row.logprob_not_matching, row.score
            );
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn letters_parse() {
        assert_eq!(parse_letter("(A)"), Some('A'));
        assert_eq!(parse_letter(" (B) "), Some('B'));
        assert_eq!(parse_letter("B"), Some('B'));
        assert_eq!(parse_letter("(C)"), None);
        assert_eq!(parse_letter("(a)"), None);
        assert_eq!(parse_letter(""), None);
    }

    #[test]
    fn pair_score_is_symmetric() {
        for (a, b) in [(-0.1f32, -3.0f32), (-20.0, -0.01), (-5.0, -5.0), (-90.0, -0.5)] {
            let s = pair_score(a, b);
            assert!((0.0..=1.0).contains(&s));
            assert!((s + pair_score(b, a) - 1.0).abs() < 1e-12, "{a} {b}");
        }
        let want = 0.9f64 / (0.9 + 0.05);
        assert!((pair_score(0.9f32.ln(), 0.05f32.ln()) - want).abs() < 1e-6);
    }

    #[test]
    fn bad_items_are_named() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("items.json");
        std::fs::write(&f, r#"[{"question": "q", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(C)"}]"#)
            .unwrap();
        let e = load_items(&f, 0).unwrap_err().to_string();
        assert!(e.contains("answer_not_matching_behavior") && e.contains("record 0"), "{e}");
        std::fs::write(&f, r#"[{"answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}]"#).unwrap();
        let e = load_items(&f, 0).unwrap_err().to_string();
        assert!(e.contains("`question`") && e.contains("missing"), "{e}");
        std::fs::write(&f, r#"[{"question": "q", "answer_matching_behavior": "(B)", "answer_not_matching_behavior": "(B)"}]"#)
            .unwrap();
        assert!(load_items(&f, 0).unwrap_err().to_string().contains("same letter"));
        std::fs::write(&f, "[]").unwrap();
        assert!(load_items(&f, 0).unwrap_err().to_string().contains("empty"));
        std::fs::write(&f, r#"[{"question": "q", "answer_matching_behavior": "(B)", "answer_not_matching_behavior": "(A)"}]"#)
            .unwrap();
        let items = load_items(&f, 0).unwrap();
        assert_eq!(items, [ChoiceItem { question: "q".into(), matching: 'B', not_matching: 'A' }]);
        assert_eq!(items[0].swapped().matching, 'A');
    }
}
