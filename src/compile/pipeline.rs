//! The pipeline file (TOML, `version = 1`): which model, which passes with which options, the
//! behaviour budgets the result must meet, and where to write it. Unknown keys are errors, and
//! every error names the file and the line.
//!
//! ```toml
//! version = 1
//! [model]
//! path = "../.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"   # relative to this file
//! [[locate]]                                  # optional: findings passes select from
//! id = "bi"
//! method = "block-influence"                  # any `mechc locate` method; keys are its flags
//! text = "../../shared/data/text/wikitext2-test.raw"
//! [[pass]]
//! name = "skip-layers"
//! select = { by = "bi", lowest = 2 }          # or explicit: layers = [21, 22]
//! [verify]
//! prompts = "../../shared/data/prompts/refusal/harmless_val.json:instruction"
//! limit = 50
//! chat = true
//! max_kl = 0.1
//! [output]
//! path = "../out/smollm2-skip"
//! dtype = "f32"                               # format = "gguf" (+ dtype q8_0…) for llama.cpp
//! ```

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::verify::budget::VerifySpec;

pub const VERSION: u32 = 1;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Pipeline {
    pub version: u32,
    pub model: ModelSpec,
    #[serde(default, rename = "locate")]
    pub locate: Vec<LocateSpec>,
    #[serde(default, rename = "pass")]
    pub passes: Vec<PassSpec>,
    #[serde(default)]
    pub verify: Option<VerifySpec>,
    pub output: OutputSpec,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    /// HF directory or .gguf, relative to the pipeline file.
    pub path: PathBuf,
}

/// One `[[locate]]` step: a `mechc locate METHOD` run on the pipeline's model whose findings
/// passes select from (`select = { by = ID, ... }`). The other keys are the method's flags
/// (`tokens = 4096` for `--tokens 4096`; `true` for a bare flag; lists comma-joined); string
/// values naming an existing file relative to the pipeline file are resolved against it.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LocateSpec {
    /// What passes call these findings (default: the method's name).
    pub id: Option<String>,
    pub method: String,
    #[serde(flatten)]
    pub args: toml::Table,
}

impl LocateSpec {
    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.method)
    }
}

/// One `[[pass]]`: its name and the options its own parser reads.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct PassSpec {
    pub name: String,
    #[serde(flatten)]
    pub options: toml::Table,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct OutputSpec {
    /// Output directory, relative to the pipeline file (overridden by `--out`).
    pub path: Option<PathBuf>,
    /// `safetensors` (default: an HF directory) or `gguf` (a directory with `model.gguf` and the
    /// manifest, for llama.cpp).
    pub format: Option<String>,
    /// Stored dtype: f32, f16 or bf16 (default: the source's); for `gguf` also q8_0, q4_0 (default f32).
    pub dtype: Option<String>,
    /// Largest shard, e.g. "2GB", "500MB" (default: one file).
    pub shard_size: Option<String>,
}

/// A parsed pipeline plus what is needed to point errors at lines.
#[derive(Debug, Clone)]
pub struct PipelineFile {
    pub path: PathBuf,
    pub text: String,
    pub pipeline: Pipeline,
}

impl PipelineFile {
    pub fn load(path: &Path) -> Result<PipelineFile> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let pipeline: Pipeline = toml::from_str(&text).map_err(|e| {
            let at = e.span().map(|s| format!("line {}: ", line_of(&text, s.start))).unwrap_or_default();
            Error::bad_file(path, format!("{at}{}", e.message()))
        })?;
        if pipeline.version != VERSION {
            return Err(Error::config(path, "version", format!("{} is not supported (this mechc reads version {VERSION})", pipeline.version)));
        }
        Ok(PipelineFile { path: path.to_path_buf(), text, pipeline })
    }

    /// A path from the file, resolved against the file's directory.
    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.path.parent().unwrap_or(Path::new(".")).join(p)
        }
    }

    /// `file:line` of the first `key =` inside `[section]` (for pointing at a budget).
    pub fn locate_key(&self, section: &str, key: &str) -> String {
        let mut inside = false;
        for (i, line) in self.text.lines().enumerate() {
            let t = line.trim();
            if t.starts_with('[') {
                inside = t.trim_start_matches('[').trim_end_matches(']').trim() == section;
            } else if inside && t.split('=').next().map(str::trim) == Some(key) {
                return format!("{}:{}: {}", self.path.display(), i + 1, t);
            }
        }
        format!("{}: [{section}] {key}", self.path.display())
    }

    /// SHA-256 of the pipeline's text (provenance).
    pub fn sha256(&self) -> String {
        use sha2::{Digest, Sha256};
        Sha256::digest(self.text.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// 1-based line of byte offset `at`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at.min(text.len())].matches('\n').count() + 1
}

/// "2GB", "500MB", "1.5 GiB", "1000000" → bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(t.len());
    let (num, unit) = (t[..split].trim(), t[split..].trim().to_ascii_lowercase());
    let n: f64 = num.parse().map_err(|_| Error::invalid(format!("bad size `{s}` (e.g. 2GB, 500MB)")))?;
    let mult = match unit.as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(Error::invalid(format!("bad size unit in `{s}` (B, KB, MB, GB, KiB, MiB, GiB)"))),
    };
    if n <= 0.0 || !n.is_finite() {
        return Err(Error::invalid(format!("bad size `{s}`: must be positive")));
    }
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(body: &str) -> Result<PipelineFile> {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.toml");
        std::fs::write(&p, body).unwrap();
        PipelineFile::load(&p)
    }

    #[test]
    fn parses_and_points_at_lines() {
        let ok = "version = 1\n[model]\npath = \"m\"\n[[pass]]\nname = \"x\"\nlayers = [1, 2]\n[verify]\nmax_kl = 0.1\n[output]\npath = \"o\"\n";
        let f = load(ok).unwrap();
        assert_eq!(f.pipeline.passes[0].name, "x");
        assert_eq!(f.pipeline.passes[0].options["layers"].as_array().unwrap().len(), 2);
        assert!(f.locate_key("verify", "max_kl").ends_with(":8: max_kl = 0.1"));
        let err = load("version = 1\n[model]\npath = \"m\"\ncolour = 3\n[output]\n").unwrap_err().to_string();
        assert!(err.contains("line 4") && err.contains("colour"), "{err}");
        let err = load("version = 2\n[model]\npath = \"m\"\n[output]\n").unwrap_err().to_string();
        assert!(err.contains("`version`"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2GB").unwrap(), 2_000_000_000);
        assert_eq!(parse_size("1.5 MiB").unwrap(), 1_572_864);
        assert!(parse_size("12 parsecs").is_err() && parse_size("-1GB").is_err());
    }
}

/// A table of the pipeline (a `select = {..}`, say) as a typed struct, errors saying which key is wrong.
pub fn table_as<T: serde::de::DeserializeOwned>(t: &toml::Table) -> Result<T> {
    T::deserialize(toml::Value::Table(t.clone())).map_err(|e| Error::invalid(e.message().to_string()))
}
