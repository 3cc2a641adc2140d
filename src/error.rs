//! The one error type of the library. Every variant that concerns a file names it, so the CLI can
//! print a single line such as `model/config.json: field `num_key_value_heads`: 5 does not divide 9`.

use std::path::{Path, PathBuf};

#[derive(thiserror::Error, Debug)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    /// A file is malformed (truncated, bad header, offsets out of range, non-finite values...).
    #[error("{}: {msg}", path.display())]
    BadFile { path: PathBuf, msg: String },

    /// A configuration field is missing, has the wrong type, or contradicts another one.
    #[error("{}: field `{field}`: {msg}", path.display())]
    Config { path: PathBuf, field: String, msg: String },

    /// The architecture named by a config or GGUF is not supported.
    #[error("{}: unsupported architecture `{arch}` (supported: {supported})", path.display())]
    UnsupportedArch { path: PathBuf, arch: String, supported: String },

    /// The output exists and we were not asked to overwrite it, or it is the input.
    #[error("{}: {msg}", path.display())]
    Output { path: PathBuf, msg: String },

    /// A hook name, intervention or argument is invalid.
    #[error("{0}")]
    Invalid(String),

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("{}", candle_msg(.0))]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    pub fn io(path: impl AsRef<Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().to_path_buf(), source }
    }
    pub fn bad_file(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::BadFile { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn config(path: impl AsRef<Path>, field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { path: path.as_ref().to_path_buf(), field: field.into(), msg: msg.into() }
    }
    pub fn output(path: impl AsRef<Path>, msg: impl Into<String>) -> Self {
        Error::Output { path: path.as_ref().to_path_buf(), msg: msg.into() }
    }
    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}

/// A candle error's message without the backtrace candle attaches when RUST_BACKTRACE is set,
/// so every error stays one line.
pub fn candle_msg(e: &candle_core::Error) -> String {
    match e {
        candle_core::Error::WithBacktrace { inner, .. } => candle_msg(inner),
        other => other.to_string().lines().next().unwrap_or_default().to_string(),
    }
}

/// Attach a file name to candle errors raised while handling that file.
pub trait WithPath<T> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T>;
}

impl<T> WithPath<T> for std::result::Result<T, candle_core::Error> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::bad_file(path, candle_msg(&e)))
    }
}

impl<T> WithPath<T> for std::result::Result<T, std::io::Error> {
    fn with_path(self, path: impl AsRef<Path>) -> Result<T> {
        self.map_err(|e| Error::io(path, e))
    }
}
