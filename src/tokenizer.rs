//! The tokenizer of a model directory (tokenizer.json via the `tokenizers` crate) and its chat
//! template (tokenizer_config.json, rendered with minijinja as transformers renders it).

use std::path::Path;

use crate::error::{Error, Result, WithPath};

#[derive(Clone)]
pub struct Tok {
    pub inner: tokenizers::Tokenizer,
    pub chat_template: Option<String>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    /// tokenizer_config.json's `unk_token` / `pad_token` (what a GGUF export names).
    pub unk_token: Option<String>,
    pub pad_token: Option<String>,
}

impl Tok {
    pub fn from_dir(dir: &Path) -> Result<Tok> {
        let path = dir.join("tokenizer.json");
        let inner = tokenizers::Tokenizer::from_file(&path)
            .map_err(|e| Error::bad_file(&path, format!("cannot load tokenizer: {e}")))?;
        let cfg_path = dir.join("tokenizer_config.json");
        let mut tok = Tok { inner, chat_template: None, bos_token: None, eos_token: None, unk_token: None, pad_token: None };
        if cfg_path.exists() {
            let text = std::fs::read_to_string(&cfg_path).with_path(&cfg_path)?;
            let cfg: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, format!("invalid JSON: {e}")))?;
            let token_str = |k: &str| -> Option<String> {
                match cfg.get(k)? {
                    serde_json::Value::String(s) => Some(s.clone()),
                    serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
                    _ => None,
                }
            };
            tok.bos_token = token_str("bos_token");
            tok.eos_token = token_str("eos_token");
            tok.unk_token = token_str("unk_token");
            tok.pad_token = token_str("pad_token");
            tok.chat_template = match cfg.get("chat_template") {
                Some(serde_json::Value::String(s)) => Some(s.clone()),
                _ => None,
            };
        }
        if tok.chat_template.is_none() {
            let jinja = dir.join("chat_template.jinja");
            if jinja.exists() {
                tok.chat_template = Some(std::fs::read_to_string(&jinja).with_path(&jinja)?);
            }
        }
        Ok(tok)
    }

    /// Token ids; `special` adds the tokenizer's BOS/EOS as transformers' `add_special_tokens`.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, special).map_err(|e| Error::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(|e| Error::Tokenizer(e.to_string()))
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Render the chat template for one user message with the generation prompt, as
    /// `apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)`.
    /// Token ids for a prompt: the chat template (user turn + generation prompt) when `chat`,
    /// else the tokenizer's own special tokens (e.g. BOS for SentencePiece models).
    pub fn prompt_ids(&self, text: &str, chat: bool) -> Result<Vec<u32>> {
        if chat {
            self.encode(&self.apply_chat(text)?, false)
        } else {
            self.encode(text, true)
        }
    }

    /// [`Tok::prompt_ids`] of every prompt; an error names a prompt that yields no tokens.
    pub fn prompts_ids(&self, prompts: &[String], chat: bool) -> Result<Vec<Vec<u32>>> {
        let mut out = Vec::with_capacity(prompts.len());
        for (i, p) in prompts.iter().enumerate() {
            let ids = self.prompt_ids(p, chat)?;
            if ids.is_empty() {
                return Err(Error::invalid(format!("prompt {i} encodes to no tokens (empty text and no BOS token)")));
            }
            out.push(ids);
        }
        Ok(out)
    }

    pub fn apply_chat(&self, user: &str) -> Result<String> {
        self.apply_chat_messages(&[("user", user)], true)
    }

    pub fn apply_chat_messages(&self, messages: &[(&str, &str)], add_generation_prompt: bool) -> Result<String> {
        let tpl = self
            .chat_template
            .as_deref()
            .ok_or_else(|| Error::Tokenizer("this model has no chat template".into()))?;
        let mut env = minijinja::Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template("chat", tpl).map_err(|e| Error::Tokenizer(format!("chat template: {e}")))?;
        let msgs: Vec<_> = messages
            .iter()
            .map(|(r, c)| minijinja::context! { role => *r, content => *c })
            .collect();
        env.get_template("chat")
            .and_then(|t| {
                t.render(minijinja::context! {
                    messages => msgs,
                    add_generation_prompt => add_generation_prompt,
                    bos_token => self.bos_token.clone().unwrap_or_default(),
                    eos_token => self.eos_token.clone().unwrap_or_default(),
                })
            })
            .map_err(|e| Error::Tokenizer(format!("chat template: {e}")))
    }
}
