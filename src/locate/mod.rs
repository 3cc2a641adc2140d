//! Locate: methods that score components and return [`crate::ir::Findings`]. One file per method;
//! the CLI for each lives in `src/cli/locate/`.

pub mod attribute;
pub mod block_influence;
pub mod causal_trace;
pub mod direction;
pub mod importance;
pub mod logit_lens;
pub mod patch;
pub mod probe;

use std::path::Path;

use crate::error::{Error, Result, WithPath};
use crate::tokenizer::Tok;

/// The first `tokens` tokens of a plain-text file (CRLF normalised to LF; 0 = all). Only a
/// prefix of the text is tokenized when that gives enough tokens (WikiText-2 test is 1.3 MB).
pub fn text_ids(tok: &Tok, path: &Path, tokens: usize) -> Result<Vec<u32>> {
    let text = std::fs::read_to_string(path).with_path(path)?.replace("\r\n", "\n");
    let mut chars = if tokens == 0 { text.len() } else { tokens.saturating_mul(8) };
    loop {
        let mut end = chars.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        let mut ids = tok.encode(&text[..end], false)?;
        if tokens == 0 || ids.len() > tokens || end == text.len() {
            // Drop the last token of a cut prefix: it may be a word cut in half.
            if end < text.len() {
                ids.pop();
            }
            if tokens > 0 {
                ids.truncate(tokens);
            }
            if ids.len() < 2 {
                return Err(Error::bad_file(path, format!("has {} token(s); need at least 2", ids.len())));
            }
            return Ok(ids);
        }
        chars = chars.saturating_mul(2);
    }
}
