//! Knowledge-edit metrics on CounterFact-style records, as ROME's evaluation computes them
//! (kmeng01/rome `experiments/py/eval_utils_counterfact.py`): for each record, the mean
//! per-token log-probability of " " + target after a prompt, for two competing targets.
//!
//! - **Efficacy**: after `prompt`, the new target is ahead of the true one (P(new) > P(true)).
//! - **Paraphrase**: the same after `rephrase_prompt`.
//! - **Neighbourhood**: after `locality_prompt` (a different subject), the true answer
//!   `locality_ground_truth` is still ahead of the new target.
//!
//! P = exp(mean per-token log-prob). Magnitudes are P(new) − P(true) (efficacy, paraphrase) and
//! P(true) − P(new) (neighbourhood), so positive is good everywhere. Rates are percentages;
//! Score is the harmonic mean of the three rates.
//!
//! Tokenisation: the prompt is encoded as a prompt (with the tokenizer's own special tokens, no
//! chat template) and " " + target separately without special tokens, then concatenated, as
//! ROME scores the separately tokenised target ids after the prompt.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::data::RecordSet;
use crate::error::{Error, Result};
use crate::model::decoder::Fwd;
use crate::model::Model;
use crate::tokenizer::Tok;

/// Which record fields hold what (CounterFact's names by default; remap for zsRE-like sets).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditFields {
    pub id: String,
    pub prompt: String,
    pub target_new: String,
    pub target_true: String,
    pub rephrase: String,
    pub locality_prompt: String,
    pub locality_true: String,
}

impl Default for EditFields {
    fn default() -> Self {
        EditFields {
            id: "case_id".into(),
            prompt: "prompt".into(),
            target_new: "target_new".into(),
            target_true: "ground_truth".into(),
            rephrase: "rephrase_prompt".into(),
            locality_prompt: "locality_prompt".into(),
            locality_true: "locality_ground_truth".into(),
        }
    }
}

/// The texts of one record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditCase {
    /// Position of the record in its file.
    pub index: usize,
    /// The record's id field (e.g. CounterFact's `case_id`), if it has one.
    pub id: Option<serde_json::Value>,
    pub prompt: String,
    pub target_new: String,
    pub target_true: String,
    pub rephrase: String,
    pub locality_prompt: String,
    pub locality_true: String,
}

/// Indices of the records whose `id_field` has one of `ids` (compared as JSON or as text), in
/// the order of `ids`; all records without `ids`. Errors on an unknown id or no records.
pub fn select(set: &RecordSet, id_field: &str, ids: Option<&[String]>) -> Result<Vec<usize>> {
    let chosen: Vec<usize> = match ids {
        None => (0..set.records.len()).collect(),
        Some(ids) => {
            let text = |v: &serde_json::Value| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let mut out = vec![];
            for want in ids {
                let i = (0..set.records.len())
                    .find(|&i| set.records[i].get(id_field).is_some_and(|v| text(v) == *want))
                    .ok_or_else(|| Error::config(&set.path, id_field, format!("no record has the id {want}")))?;
                out.push(i);
            }
            out
        }
    };
    if chosen.is_empty() {
        return Err(Error::bad_file(&set.path, "no records"));
    }
    Ok(chosen)
}

/// Read the cases from a record set. `ids` (values of the id field, compared as JSON or as
/// text) selects records; every selected record must have every text field.
pub fn cases(set: &RecordSet, fields: &EditFields, ids: Option<&[String]>) -> Result<Vec<EditCase>> {
    let id_of = |i: usize| set.records[i].get(&fields.id).cloned();
    let chosen = select(set, &fields.id, ids)?;
    chosen
        .into_iter()
        .map(|i| {
            let f = |name: &str| -> Result<String> {
                let s = set.str_field(i, name)?;
                if s.trim().is_empty() {
                    return Err(Error::config(&set.path, name, format!("record {i}: empty")));
                }
                Ok(s.to_string())
            };
            Ok(EditCase {
                index: i,
                id: id_of(i),
                prompt: f(&fields.prompt)?,
                target_new: f(&fields.target_new)?,
                target_true: f(&fields.target_true)?,
                rephrase: f(&fields.rephrase)?,
                locality_prompt: f(&fields.locality_prompt)?,
                locality_true: f(&fields.locality_true)?,
            })
        })
        .collect()
}

/// Two competing continuations of one prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pair {
    /// Mean per-token log-prob of " " + the new target.
    pub new_logprob: f64,
    /// Mean per-token log-prob of " " + the true target.
    pub true_logprob: f64,
    pub new_tokens: usize,
    pub true_tokens: usize,
    /// The metric's success: new ahead (efficacy, paraphrase) or true ahead (neighbourhood).
    pub success: bool,
    /// exp(new) − exp(true) (efficacy, paraphrase) or exp(true) − exp(new) (neighbourhood).
    pub magnitude: f64,
}

impl Pair {
    fn new(new_lp: &[f32], true_lp: &[f32], want_new: bool) -> Pair {
        let mean = |v: &[f32]| v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let (n, t) = (mean(new_lp), mean(true_lp));
        let (success, magnitude) = if want_new { (n > t, n.exp() - t.exp()) } else { (t > n, t.exp() - n.exp()) };
        Pair { new_logprob: n, true_logprob: t, new_tokens: new_lp.len(), true_tokens: true_lp.len(), success, magnitude }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordScore {
    pub index: usize,
    pub id: Option<serde_json::Value>,
    pub efficacy: Pair,
    pub paraphrase: Pair,
    pub neighbourhood: Pair,
}

/// Rate (%) and mean magnitude of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Metric {
    pub rate: f64,
    pub magnitude: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditReport {
    pub records_file: String,
    pub records_sha256: String,
    pub fields: EditFields,
    pub n: usize,
    /// Efficacy (ES).
    pub efficacy: Metric,
    /// Paraphrase (PS).
    pub paraphrase: Metric,
    /// Neighbourhood (NS).
    pub neighbourhood: Metric,
    /// Harmonic mean of the three rates (0 if any is 0).
    pub score: f64,
    pub records: Vec<RecordScore>,
}

/// Harmonic mean; 0 when any value is ≤ 0.
pub fn harmonic_mean(xs: &[f64]) -> f64 {
    if xs.is_empty() || xs.iter().any(|&x| x <= 0.0) {
        return 0.0;
    }
    xs.len() as f64 / xs.iter().map(|x| 1.0 / x).sum::<f64>()
}

fn metric(records: &[RecordScore], pick: impl Fn(&RecordScore) -> &Pair) -> Metric {
    let n = records.len().max(1) as f64;
    Metric {
        rate: 100.0 * records.iter().filter(|r| pick(r).success).count() as f64 / n,
        magnitude: records.iter().map(|r| pick(r).magnitude).sum::<f64>() / n,
    }
}

/// Aggregate per-record scores into a report.
pub fn aggregate(records: Vec<RecordScore>, set: &RecordSet, fields: &EditFields) -> EditReport {
    let efficacy = metric(&records, |r| &r.efficacy);
    let paraphrase = metric(&records, |r| &r.paraphrase);
    let neighbourhood = metric(&records, |r| &r.neighbourhood);
    EditReport {
        records_file: set.path.display().to_string(),
        records_sha256: set.sha256.clone(),
        fields: fields.clone(),
        n: records.len(),
        score: harmonic_mean(&[efficacy.rate, paraphrase.rate, neighbourhood.rate]),
        efficacy,
        paraphrase,
        neighbourhood,
        records,
    }
}

/// Score every case. `progress(done, total)` is called after each chunk of records.
pub fn evaluate(
    model: &Model,
    tok: &Tok,
    cases: &[EditCase],
    batch: usize,
    fwd: Fwd,
    mut progress: impl FnMut(usize, usize),
) -> Result<Vec<RecordScore>> {
    let enc_prompt = |s: &str| tok.prompt_ids(s, false);
    let enc_target = |s: &str| tok.encode(&format!(" {s}"), false);
    // Chunks of records keep the progress bar moving while still batching by length.
    let chunk = (batch.max(1) * 4).max(16);
    let mut out = Vec::with_capacity(cases.len());
    progress(0, cases.len());
    for group in cases.chunks(chunk) {
        let (mut prompts, mut conts) = (vec![], vec![]);
        for c in group {
            let (p, r, l) = (enc_prompt(&c.prompt)?, enc_prompt(&c.rephrase)?, enc_prompt(&c.locality_prompt)?);
            let (tn, tt, lt) = (enc_target(&c.target_new)?, enc_target(&c.target_true)?, enc_target(&c.locality_true)?);
            for (pr, ct) in [(&p, &tn), (&p, &tt), (&r, &tn), (&r, &tt), (&l, &tn), (&l, &lt)] {
                if pr.is_empty() || ct.is_empty() {
                    return Err(Error::invalid(format!("record {}: a prompt or target encodes to no tokens", c.index)));
                }
                prompts.push(pr.clone());
                conts.push(ct.clone());
            }
        }
        let lp = crate::runtime::score::continuation_logprobs_with(model, &prompts, &conts, batch, fwd)?;
        for (k, c) in group.iter().enumerate() {
            let s = &lp[6 * k..6 * k + 6];
            out.push(RecordScore {
                index: c.index,
                id: c.id.clone(),
                efficacy: Pair::new(&s[0], &s[1], true),
                paraphrase: Pair::new(&s[2], &s[3], true),
                neighbourhood: Pair::new(&s[4], &s[5], false),
            });
        }
        progress(out.len(), cases.len());
    }
    Ok(out)
}

/// Load the records, score them, aggregate.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_file(
    model: &Model,
    tok: &Tok,
    path: &Path,
    limit: usize,
    ids: Option<&[String]>,
    fields: &EditFields,
    batch: usize,
    fwd: Fwd,
    progress: impl FnMut(usize, usize),
) -> Result<EditReport> {
    let set = RecordSet::load(path, if ids.is_some() { 0 } else { limit })?;
    let cases = cases(&set, fields, ids)?;
    let records = evaluate(model, tok, &cases, batch, fwd, progress)?;
    Ok(aggregate(records, &set, fields))
}

/// Change of one metric, edited − source.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricDelta {
    pub rate: f64,
    pub magnitude: f64,
    /// Records that fail in the source and succeed in the edited model.
    pub gained: usize,
    /// Records that succeed in the source and fail in the edited model.
    pub lost: usize,
}

/// Per-record change of the mean log-probs (edited − source): (new, true) per metric.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordDelta {
    pub index: usize,
    pub efficacy: [f64; 2],
    pub paraphrase: [f64; 2],
    pub neighbourhood: [f64; 2],
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditDelta {
    pub efficacy: MetricDelta,
    pub paraphrase: MetricDelta,
    pub neighbourhood: MetricDelta,
    pub score: f64,
    pub records: Vec<RecordDelta>,
}

/// Compare an edited model's report with its source model's on the same records.
pub fn compare(edited: &EditReport, source: &EditReport) -> Result<EditDelta> {
    let same_records = edited.n == source.n
        && edited.records_sha256 == source.records_sha256
        && edited.fields == source.fields
        && edited.records.iter().zip(&source.records).all(|(a, b)| a.index == b.index);
    if !same_records {
        return Err(Error::invalid("compare: the two reports are not over the same records"));
    }
    let md = |pick: fn(&RecordScore) -> &Pair, a: Metric, b: Metric| {
        let mut d = MetricDelta { rate: a.rate - b.rate, magnitude: a.magnitude - b.magnitude, gained: 0, lost: 0 };
        for (e, s) in edited.records.iter().zip(&source.records) {
            match (pick(s).success, pick(e).success) {
                (false, true) => d.gained += 1,
                (true, false) => d.lost += 1,
                _ => {}
            }
        }
        d
    };
    let lp = |e: &Pair, s: &Pair| [e.new_logprob - s.new_logprob, e.true_logprob - s.true_logprob];
    Ok(EditDelta {
        efficacy: md(|r| &r.efficacy, edited.efficacy, source.efficacy),
        paraphrase: md(|r| &r.paraphrase, edited.paraphrase, source.paraphrase),
        neighbourhood: md(|r| &r.neighbourhood, edited.neighbourhood, source.neighbourhood),
        score: edited.score - source.score,
        records: edited
            .records
            .iter()
            .zip(&source.records)
            .map(|(e, s)| RecordDelta {
                index: e.index,
                efficacy: lp(&e.efficacy, &s.efficacy),
                paraphrase: lp(&e.paraphrase, &s.paraphrase),
                neighbourhood: lp(&e.neighbourhood, &s.neighbourhood),
            })
            .collect(),
    })
}

/// A human-readable table: the model's metrics, and the source's and the change when given.
pub fn table(model_name: &str, report: &EditReport, source: Option<(&str, &EditReport, &EditDelta)>) -> String {
    let mut s = format!("CounterFact-style edit metrics over {} records of {}\n", report.n, report.records_file);
    s += &format!("{:<28} {:>10} {:>11} {:>14} {:>8}\n", "", "Efficacy", "Paraphrase", "Neighbourhood", "Score");
    let row = |name: &str, r: &EditReport| {
        let mut s = format!(
            "{:<28} {:>9.1}% {:>10.1}% {:>13.1}% {:>8.2}\n",
            short(name),
            r.efficacy.rate,
            r.paraphrase.rate,
            r.neighbourhood.rate,
            r.score
        );
        s += &format!(
            "{:<28} {:>+10.4} {:>+11.4} {:>+14.4}\n",
            "  mean magnitude", r.efficacy.magnitude, r.paraphrase.magnitude, r.neighbourhood.magnitude
        );
        s
    };
    s += &row(model_name, report);
    if let Some((name, src, d)) = source {
        s += &row(name, src);
        s += &format!(
            "{:<28} {:>+9.1}% {:>+10.1}% {:>+13.1}% {:>+8.2}\n",
            "delta (model − source)", d.efficacy.rate, d.paraphrase.rate, d.neighbourhood.rate, d.score
        );
        s += &format!(
            "{:<28} {:>+10.4} {:>+11.4} {:>+14.4}\n",
            "  magnitude", d.efficacy.magnitude, d.paraphrase.magnitude, d.neighbourhood.magnitude
        );
        let gl = |m: &MetricDelta| format!("+{}/−{}", m.gained, m.lost);
        s += &format!(
            "{:<28} {:>10} {:>11} {:>14}\n",
            "  records gained/lost",
            gl(&d.efficacy),
            gl(&d.paraphrase),
            gl(&d.neighbourhood)
        );
    }
    s
}

fn short(name: &str) -> String {
    let n = name.chars().count();
    if n <= 28 {
        name.to_string()
    } else {
        format!("…{}", name.chars().skip(n - 27).collect::<String>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_directions_and_magnitudes() {
        let p = Pair::new(&[-1.0, -3.0], &[-4.0], true);
        assert_eq!((p.new_logprob, p.true_logprob, p.new_tokens, p.true_tokens), (-2.0, -4.0, 2, 1));
        assert!(p.success);
        assert!((p.magnitude - ((-2f64).exp() - (-4f64).exp())).abs() < 1e-12);
        // Neighbourhood wants the true answer ahead: the same numbers are a failure there.
        let q = Pair::new(&[-1.0, -3.0], &[-4.0], false);
        assert!(!q.success && q.magnitude < 0.0);
        // Ties are failures both ways.
        assert!(!Pair::new(&[-1.0], &[-1.0], true).success && !Pair::new(&[-1.0], &[-1.0], false).success);
    }

    #[test]
    fn harmonic_mean_basics() {
        assert!((harmonic_mean(&[100.0, 50.0, 50.0]) - 60.0).abs() < 1e-12);
        assert_eq!(harmonic_mean(&[100.0, 0.0, 50.0]), 0.0);
        assert!((harmonic_mean(&[80.0, 80.0, 80.0]) - 80.0).abs() < 1e-12);
    }

    fn write_records(dir: &Path, body: &str) -> std::path::PathBuf {
        let p = dir.join("cf.json");
        std::fs::write(&p, body).unwrap();
        p
    }

    #[test]
    fn cases_select_ids_and_name_missing_fields() {
        let d = tempfile::tempdir().unwrap();
        let rec = |id: u32, extra: &str| {
            format!(
                r#"{{"case_id": {id}, "prompt": "p{id}", "target_new": "n", "ground_truth": "t", "rephrase_prompt": "r",
                "locality_prompt": "l", "locality_ground_truth": "lt"{extra}}}"#
            )
        };
        let p = write_records(d.path(), &format!("[{}, {}, {}]", rec(0, ""), rec(4, ""), rec(9, "")));
        let set = RecordSet::load(&p, 0).unwrap();
        let f = EditFields::default();
        let c = cases(&set, &f, Some(&["9".into(), "0".into()])).unwrap();
        assert_eq!(c.iter().map(|c| (c.index, c.prompt.as_str())).collect::<Vec<_>>(), [(2, "p9"), (0, "p0")]);
        let err = cases(&set, &f, Some(&["5".into()])).unwrap_err().to_string();
        assert!(err.contains("cf.json") && err.contains("case_id") && err.contains('5'), "{err}");
        let remapped = EditFields { target_true: "nope".into(), ..EditFields::default() };
        let err = cases(&set, &remapped, None).unwrap_err().to_string();
        assert!(err.contains("cf.json") && err.contains("`nope`") && err.contains("missing"), "{err}");
    }

    #[test]
    fn compare_counts_flips_and_rejects_other_records() {
        let d = tempfile::tempdir().unwrap();
        let p = write_records(d.path(), "[{}, {}]");
        let set = RecordSet::load(&p, 0).unwrap();
        let f = EditFields::default();
        let rec = |index, e: bool| RecordScore {
            index,
            id: None,
            efficacy: Pair::new(if e { &[-1.0] } else { &[-3.0] }, &[-2.0], true),
            paraphrase: Pair::new(&[-3.0], &[-2.0], true),
            neighbourhood: Pair::new(&[-3.0], &[-2.0], false),
        };
        let src = aggregate(vec![rec(0, false), rec(1, true)], &set, &f);
        let edited = aggregate(vec![rec(0, true), rec(1, true)], &set, &f);
        assert_eq!((src.efficacy.rate, edited.efficacy.rate, edited.neighbourhood.rate), (50.0, 100.0, 100.0));
        let d = compare(&edited, &src).unwrap();
        assert_eq!((d.efficacy.rate, d.efficacy.gained, d.efficacy.lost), (50.0, 1, 0));
        assert_eq!(d.records[0].efficacy, [2.0, 0.0]);
        assert_eq!(d.records[1].efficacy, [0.0, 0.0]);
        let other = aggregate(vec![rec(1, true), rec(0, true)], &set, &f);
        assert!(compare(&other, &src).is_err());
    }
}
