//! Findings: scores attached to components by a locate method, with the provenance needed to
//! trust or reproduce them (method, options, model hash, data hash). JSON is the machine form;
//! the text form prints one `COMPONENT  SCORE` line per component after a `;` header, in the IR's
//! notation (`L12.H3  0.4120`).
//!
//! Passes select from findings: [`Findings::lowest`], [`Findings::highest`], [`Findings::of_kind`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{Component, Kind};
use crate::error::{Error, Result, WithPath};

/// The `format` field of a findings file.
pub const FORMAT: &str = "mechc-findings/1";

/// A file (or inline input such as a prompt) and its SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Source {
    /// The path as given on the command line; `None` for inline inputs (e.g. `--prompt`, whose
    /// text is in the options).
    pub file: Option<PathBuf>,
    pub sha256: String,
}

impl Source {
    pub fn file(path: &Path) -> Result<Source> {
        Ok(Source {
            file: Some(path.to_path_buf()),
            sha256: crate::io::sha256_file(path)?,
        })
    }
    pub fn inline(text: &str) -> Source {
        Source {
            file: None,
            sha256: sha256_bytes(text.as_bytes()),
        }
    }
    /// A MODEL argument: the .gguf file's hash, or for an HF directory the hash of its
    /// safetensors files' names and hashes (config and tokenizer excluded: the weights are what
    /// findings depend on).
    pub fn model(path: &Path) -> Result<Source> {
        if !path.is_dir() {
            return Source::file(path);
        }
        let mut files: Vec<PathBuf> = std::fs::read_dir(path)
            .with_path(path)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        if files.is_empty() {
            return Err(Error::bad_file(path, "no .safetensors files to hash"));
        }
        files.sort();
        let mut listing = String::new();
        for f in &files {
            let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            listing.push_str(&format!("{name} {}\n", crate::io::sha256_file(f)?));
        }
        Ok(Source {
            file: Some(path.to_path_buf()),
            sha256: sha256_bytes(listing.as_bytes()),
        })
    }
}

/// `{ by = ID [, layer = L] }`: the vector of a `direction` step (its best layer's by default).
/// A fractional `L` (a pass's direction only) mixes the unit vectors of the layers either side.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct FromDirection {
    pub by: String,
    pub layer: Option<f64>,
}

pub fn sha256_bytes(b: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(b).iter().map(|b| format!("{b:02x}")).collect()
}

/// One component's score, plus method-specific values (e.g. a rank, the top tokens).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub component: Component,
    pub score: f64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Findings {
    pub format: String,
    /// The locate method, e.g. `block-influence`.
    pub method: String,
    /// What the score means (e.g. "1 − mean cos(resid_pre, resid_post); low = redundant").
    pub score_meaning: String,
    /// The method's options, as given (after defaults).
    pub options: Value,
    pub model: Source,
    pub data: Vec<Source>,
    pub mechc_version: String,
    pub scores: Vec<Score>,
    /// Method-level results that are not per component (e.g. the best block start).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub summary: BTreeMap<String, Value>,
}

impl Findings {
    pub fn new(method: &str, score_meaning: &str, options: Value, model: Source, data: Vec<Source>) -> Findings {
        Findings {
            format: FORMAT.into(),
            method: method.into(),
            score_meaning: score_meaning.into(),
            options,
            model,
            data,
            mechc_version: env!("CARGO_PKG_VERSION").into(),
            scores: vec![],
            summary: BTreeMap::new(),
        }
    }

    pub fn push(&mut self, component: Component, score: f64) -> &mut Score {
        self.scores.push(Score {
            component,
            score,
            extra: BTreeMap::new(),
        });
        self.scores.last_mut().expect("just pushed")
    }

    pub fn get(&self, c: Component) -> Option<f64> {
        self.scores.iter().find(|s| s.component == c).map(|s| s.score)
    }

    /// Scores sorted ascending (NaN last), ties in component order: deterministic.
    fn sorted(&self) -> Vec<&Score> {
        let mut v: Vec<&Score> = self.scores.iter().collect();
        v.sort_by(|a, b| {
            let key = |s: &Score| if s.score.is_nan() { f64::INFINITY } else { s.score };
            key(a).total_cmp(&key(b)).then(a.component.cmp(&b.component))
        });
        v
    }

    /// The `k` lowest-scoring components (fewer if there are fewer scores).
    pub fn lowest(&self, k: usize) -> Vec<Component> {
        self.sorted()
            .into_iter()
            .filter(|s| !s.score.is_nan())
            .take(k)
            .map(|s| s.component)
            .collect()
    }

    /// The `k` highest-scoring components.
    pub fn highest(&self, k: usize) -> Vec<Component> {
        let mut v: Vec<&Score> = self.sorted().into_iter().filter(|s| !s.score.is_nan()).collect();
        v.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.component.cmp(&b.component)));
        v.into_iter().take(k).map(|s| s.component).collect()
    }

    /// The findings restricted to one kind of component.
    pub fn of_kind(&self, kind: Kind) -> Findings {
        let mut f = self.clone();
        f.scores.retain(|s| s.component.kind() == kind);
        f
    }

    /// The text form: a `;` header with the provenance, then `COMPONENT  SCORE  [key=value...]`.
    pub fn to_text(&self) -> String {
        let mut s = format!("; findings {} ({})\n", self.method, self.score_meaning);
        let src = |x: &Source| {
            format!(
                "{}  sha256={}",
                x.file.as_ref().map_or("<inline>".into(), |p| p.display().to_string()),
                x.sha256
            )
        };
        s.push_str(&format!("; model {}\n", src(&self.model)));
        for d in &self.data {
            s.push_str(&format!("; data {}\n", src(d)));
        }
        s.push_str(&format!("; options {}\n", self.options));
        for (k, v) in &self.summary {
            s.push_str(&format!("; {k} {v}\n"));
        }
        let w = self.scores.iter().map(|x| x.component.to_string().len()).max().unwrap_or(0);
        for x in &self.scores {
            let mut line = format!("{:<w$}  {}", x.component.to_string(), fmt_score(x.score));
            for (k, v) in &x.extra {
                match v {
                    Value::Number(n) if !n.is_i64() && !n.is_u64() => {
                        line.push_str(&format!("  {k}={}", fmt_score(n.as_f64().unwrap_or(f64::NAN))))
                    }
                    Value::Array(_) | Value::Object(_) => {}
                    _ => line.push_str(&format!("  {k}={v}")),
                }
            }
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("findings serialise") + "\n"
    }

    /// Write the JSON form, whole or not at all.
    pub fn write(&self, path: &Path) -> Result<()> {
        crate::io::atomic::write_file(path, self.to_json().as_bytes())
    }

    pub fn read(path: &Path) -> Result<Findings> {
        let s = std::fs::read_to_string(path).with_path(path)?;
        let v: Value = serde_json::from_str(&s).map_err(|e| Error::bad_file(path, format!("not JSON: {e}")))?;
        match v.get("format").and_then(Value::as_str) {
            Some(FORMAT) => {}
            Some(other) => return Err(Error::bad_file(path, format!("field `format`: `{other}` is not {FORMAT}"))),
            None => {
                return Err(Error::bad_file(
                    path,
                    format!("field `format` missing (not a findings file, expected {FORMAT})"),
                ))
            }
        }
        serde_json::from_value(v).map_err(|e| Error::bad_file(path, format!("not a findings file: {e}")))
    }
}

/// Four decimals when that shows the value, scientific notation for small ones.
pub fn fmt_score(x: f64) -> String {
    if x == 0.0 || x.abs() >= 0.01 || !x.is_finite() {
        format!("{x:.4}")
    } else {
        format!("{x:.3e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Findings {
        let mut f = Findings::new(
            "test",
            "a score",
            serde_json::json!({"k": 1}),
            Source::inline("model"),
            vec![Source::inline("data")],
        );
        for (c, s) in [
            ("L0", 0.5),
            ("L1", 0.1),
            ("L2", 0.9),
            ("L1.H0", 0.005),
            ("L3", 0.1),
            ("L4", f64::NAN),
        ] {
            f.push(c.parse().unwrap(), s);
        }
        f.scores[0].extra.insert("rank".into(), 3.into());
        f
    }

    #[test]
    fn selection_is_by_score_then_component_order() {
        let f = sample();
        let blocks = f.of_kind(Kind::Block);
        let names = |v: Vec<Component>| v.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(" ");
        assert_eq!(names(blocks.lowest(3)), "L1 L3 L0");
        assert_eq!(names(blocks.highest(2)), "L2 L0");
        assert_eq!(names(f.lowest(1)), "L1.H0");
        assert_eq!(names(blocks.lowest(10)), "L1 L3 L0 L2", "NaN scores are never selected");
    }

    #[test]
    fn json_round_trips_and_text_uses_ir_names() {
        let mut f = sample();
        f.scores.pop(); // NaN is not JSON
        let dir = std::env::temp_dir().join(format!("mechc-findings-{}", std::process::id()));
        let p = dir.join("f.json");
        f.write(&p).unwrap();
        assert_eq!(Findings::read(&p).unwrap(), f);
        let t = f.to_text();
        assert!(
            t.contains("\nL1.H0  5.000e-3\n") && t.contains("\nL0     0.5000  rank=3\n"),
            "{t}"
        );
        std::fs::write(&p, "{\"format\": \"other\"}").unwrap();
        assert!(Findings::read(&p).unwrap_err().to_string().contains("format"));
        std::fs::write(&p, "{").unwrap();
        assert!(Findings::read(&p).unwrap_err().to_string().contains("f.json"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
