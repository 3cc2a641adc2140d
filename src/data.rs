//! Prompt and record sets in the formats of `../shared/data/prompts/`, named on the command line
//! as `FILE[:FIELD]`:
//!
//! - `.json`: a list of strings, or a list of objects whose `FIELD` is the text;
//! - `.jsonl`: one string or object per line, likewise;
//! - `.csv`: a header row, `FIELD` names the column;
//! - anything else: plain text, one prompt per non-empty line (no `FIELD`).
//!
//! Every set is returned with the SHA-256 of its file, for the provenance of findings and reports.

use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::error::{Error, Result};

/// `$MECHC_SHARED_DATA`, default `../shared/data` (relative to the working directory).
pub fn shared_data_dir() -> PathBuf {
    std::env::var_os("MECHC_SHARED_DATA").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("../shared/data"))
}

/// A `FILE[:FIELD]` argument, split. A path that exists as written is never split, so file
/// names containing ':' still work.
#[derive(Debug, Clone, PartialEq)]
pub struct SetSpec {
    pub path: PathBuf,
    pub field: Option<String>,
}

impl SetSpec {
    pub fn parse(s: &str) -> SetSpec {
        if !Path::new(s).exists() {
            if let Some((p, f)) = s.rsplit_once(':') {
                if !p.is_empty() && !f.is_empty() && !f.contains('/') {
                    return SetSpec { path: p.into(), field: Some(f.to_string()) };
                }
            }
        }
        SetSpec { path: s.into(), field: None }
    }
}

impl std::str::FromStr for SetSpec {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(SetSpec::parse(s))
    }
}

/// Serialised as written on the command line, `FILE[:FIELD]`.
impl serde::Serialize for SetSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl std::fmt::Display for SetSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}:{field}", self.path.display()),
            None => write!(f, "{}", self.path.display()),
        }
    }
}

/// Texts of a set, plus the file's hash.
#[derive(Debug, Clone)]
pub struct TextSet {
    pub spec: SetSpec,
    pub texts: Vec<String>,
    pub sha256: String,
}

impl TextSet {
    /// Load the set; `limit` > 0 keeps the first `limit` texts.
    pub fn load(spec: &SetSpec, limit: usize) -> Result<TextSet> {
        let path = &spec.path;
        let mut texts = match extension(path).as_str() {
            "json" | "jsonl" => {
                let records = read_json_values(path)?;
                records.iter().enumerate().map(|(i, v)| text_of(path, i, v, spec.field.as_deref())).collect::<Result<Vec<_>>>()?
            }
            "csv" => read_csv_column(path, spec.field.as_deref())?,
            _ => {
                if let Some(f) = &spec.field {
                    return Err(Error::bad_file(path, format!("plain text files have no fields (asked for `{f}`)")));
                }
                read_string(path)?.lines().map(str::trim_end).filter(|l| !l.trim().is_empty()).map(String::from).collect()
            }
        };
        if texts.is_empty() {
            return Err(Error::bad_file(path, "the set is empty"));
        }
        if limit > 0 {
            texts.truncate(limit);
        }
        Ok(TextSet { spec: spec.clone(), texts, sha256: crate::io::sha256_file(path)? })
    }
}

/// A list of JSON objects (e.g. CounterFact records), plus the file's hash.
#[derive(Debug, Clone)]
pub struct RecordSet {
    pub path: PathBuf,
    pub records: Vec<serde_json::Map<String, Value>>,
    pub sha256: String,
}

impl RecordSet {
    pub fn load(path: &Path, limit: usize) -> Result<RecordSet> {
        let mut records = vec![];
        for (i, v) in read_json_values(path)?.into_iter().enumerate() {
            match v {
                Value::Object(m) => records.push(m),
                _ => return Err(Error::bad_file(path, format!("record {i} is not a JSON object"))),
            }
        }
        if limit > 0 {
            records.truncate(limit);
        }
        Ok(RecordSet { path: path.to_path_buf(), records, sha256: crate::io::sha256_file(path)? })
    }

    /// The string field `field` of record `i`, or an error naming the file, record and field.
    pub fn str_field(&self, i: usize, field: &str) -> Result<&str> {
        match self.records[i].get(field) {
            Some(Value::String(s)) => Ok(s),
            Some(_) => Err(Error::config(&self.path, field, format!("record {i}: not a string"))),
            None => Err(Error::config(&self.path, field, format!("record {i}: missing"))),
        }
    }
}

fn extension(path: &Path) -> String {
    path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase()
}

fn read_string(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    String::from_utf8(bytes).map_err(|_| Error::bad_file(path, "not valid UTF-8"))
}

fn read_json_values(path: &Path) -> Result<Vec<Value>> {
    let s = read_string(path)?;
    if extension(path) == "jsonl" {
        return s
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(n, l)| serde_json::from_str(l).map_err(|e| Error::bad_file(path, format!("line {}: {e}", n + 1))))
            .collect();
    }
    match serde_json::from_str(&s).map_err(|e| Error::bad_file(path, format!("invalid JSON: {e}")))? {
        Value::Array(v) => Ok(v),
        _ => Err(Error::bad_file(path, "expected a JSON list")),
    }
}

fn text_of(path: &Path, i: usize, v: &Value, field: Option<&str>) -> Result<String> {
    match (v, field) {
        (Value::String(s), None) => Ok(s.clone()),
        (Value::String(_), Some(f)) => Err(Error::bad_file(path, format!("the records are strings, not objects with a field `{f}`"))),
        (Value::Object(m), Some(f)) => match m.get(f) {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(Error::config(path, f, format!("record {i}: not a string"))),
            None => Err(Error::config(path, f, format!("record {i}: missing (fields: {})", keys(m)))),
        },
        (Value::Object(m), None) => {
            Err(Error::bad_file(path, format!("the records are objects: name the text field as FILE:FIELD (fields: {})", keys(m))))
        }
        _ => Err(Error::bad_file(path, format!("record {i} is neither a string nor an object"))),
    }
}

fn keys(m: &serde_json::Map<String, Value>) -> String {
    m.keys().cloned().collect::<Vec<_>>().join(", ")
}

fn read_csv_column(path: &Path, field: Option<&str>) -> Result<Vec<String>> {
    let mut r = csv::Reader::from_path(path).map_err(|e| Error::bad_file(path, e.to_string()))?;
    let headers = r.headers().map_err(|e| Error::bad_file(path, e.to_string()))?.clone();
    let names = headers.iter().collect::<Vec<_>>().join(", ");
    let Some(field) = field else {
        return Err(Error::bad_file(path, format!("name the column as FILE:COLUMN (columns: {names})")));
    };
    let col = headers
        .iter()
        .position(|h| h == field)
        .ok_or_else(|| Error::config(path, field, format!("no such column (columns: {names})")))?;
    let mut out = vec![];
    for (i, rec) in r.records().enumerate() {
        let rec = rec.map_err(|e| Error::bad_file(path, format!("row {}: {e}", i + 2)))?;
        out.push(rec.get(col).unwrap_or("").to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn formats() {
        let d = tempfile::tempdir().unwrap();
        let j = write(d.path(), "a.json", r#"[{"instruction": "x", "c": 1}, {"instruction": "y"}]"#);
        let s = TextSet::load(&SetSpec::parse(&format!("{}:instruction", j.display())), 0).unwrap();
        assert_eq!(s.texts, ["x", "y"]);
        let err = TextSet::load(&SetSpec::parse(j.to_str().unwrap()), 0).unwrap_err().to_string();
        assert!(err.contains("fields: instruction, c"), "{err}");
        let l = write(d.path(), "b.json", r#"["p", "q", "r"]"#);
        assert_eq!(TextSet::load(&SetSpec::parse(l.to_str().unwrap()), 2).unwrap().texts, ["p", "q"]);
        let c = write(d.path(), "c.csv", "goal,target\n\"a, b\",t1\nc,t2\n");
        assert_eq!(TextSet::load(&SetSpec::parse(&format!("{}:goal", c.display())), 0).unwrap().texts, ["a, b", "c"]);
        let err = TextSet::load(&SetSpec::parse(&format!("{}:nope", c.display())), 0).unwrap_err().to_string();
        assert!(err.contains("columns: goal, target"), "{err}");
        let t = write(d.path(), "d.txt", "one\r\n\r\ntwo\n");
        assert_eq!(TextSet::load(&SetSpec::parse(t.to_str().unwrap()), 0).unwrap().texts, ["one", "two"]);
        let jl = write(d.path(), "e.jsonl", "{\"t\": \"u\"}\n\n{\"t\": \"v\"}\n");
        assert_eq!(TextSet::load(&SetSpec::parse(&format!("{}:t", jl.display())), 0).unwrap().texts, ["u", "v"]);
        let bad = write(d.path(), "f.json", "[1, 2");
        assert!(TextSet::load(&SetSpec::parse(bad.to_str().unwrap()), 0).unwrap_err().to_string().contains("invalid JSON"));
    }

    #[test]
    fn spec_keeps_existing_paths_whole() {
        let d = tempfile::tempdir().unwrap();
        let p = write(d.path(), "odd:name.txt", "x\n");
        assert_eq!(SetSpec::parse(p.to_str().unwrap()).field, None);
        let s = SetSpec::parse("nothere.json:instruction");
        assert_eq!((s.path, s.field), (PathBuf::from("nothere.json"), Some("instruction".into())));
    }
}
