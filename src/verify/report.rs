//! HTML reports of verify's results: the `diff` report and the sections of the `eval` tasks
//! (`--report FILE.html`), drawn with the primitives of `crate::report`.

use std::path::Path;

use crate::report::{histogram_svg, lines_svg, one_line, Report};
use crate::verify::diff::{PromptsDiff, Side, TextDiff};
use crate::error::Result;
use crate::verify::choice::ChoiceReport;
use crate::verify::edit::{EditDelta, EditReport};
use crate::verify::perplexity::Perplexity;
use crate::verify::refusal::{KlReport, RefusalReport};
use crate::verify::steer::SteerReport;

fn pct(x: f64) -> String {
    format!("{:.1}%", 100.0 * x)
}

pub fn perplexity(r: &mut Report, p: &Perplexity) {
    r.heading("Perplexity").table(
        &["perplexity", "mean NLL (nats)", "scored tokens", "tokens", "windows", "seq len", "stride"],
        &[vec![
            format!("{:.4}", p.perplexity),
            format!("{:.5}", p.nll),
            p.scored_tokens.to_string(),
            p.total_tokens.to_string(),
            p.windows.to_string(),
            p.seq_len.to_string(),
            p.stride.to_string(),
        ]],
    );
}

/// Rates per set, the optional first-token KL, and every completion.
pub fn refusal(r: &mut Report, sets: &[(&str, &RefusalReport)], kl: Option<&KlReport>) -> Result<()> {
    let rows: Vec<Vec<String>> =
        sets.iter().map(|(n, s)| vec![n.to_string(), s.prompts.to_string(), s.refused.to_string(), pct(s.rate)]).collect();
    r.heading("Refusal rate").table(&["set", "prompts", "refused", "rate"], &rows);
    if let Some(k) = kl {
        r.para(&format!("First-token KL(reference ‖ model) over {} prompts: mean {:.5}, max {:.5} nats.", k.prompts, k.mean, k.max));
        r.svg(&histogram_svg(&k.per_prompt, 30, "First-token KL per prompt", "KL (nats)")?);
    }
    for (name, s) in sets {
        r.heading(&format!("Completions: {name}"));
        let rows: Vec<Vec<String>> = s
            .completions
            .iter()
            .map(|c| {
                let verdict = c.matched.as_deref().map(|m| format!("refused ({m})")).unwrap_or_else(|| "answered".into());
                vec![one_line(&c.prompt, 300), one_line(&c.completion, 600), verdict]
            })
            .collect();
        r.table(&["prompt", "completion", "judged"], &rows);
    }
    Ok(())
}

/// Score, target probabilities and KL against the coefficient, as plots and a table.
pub fn steer(r: &mut Report, s: &SteerReport) -> Result<()> {
    r.heading(&format!("Steering at {} ({} prompts, ‖v‖ = {:.3}{})", s.hook, s.n_prompts, s.direction_norm, if s.normalized { ", normalised" } else { "" }));
    let pts = |f: &dyn Fn(&crate::verify::steer::SteerPoint) -> f64| s.points.iter().map(|p| (p.coeff, f(p))).collect::<Vec<_>>();
    r.svg(&lines_svg(&[(format!("{:?} score", s.metric), pts(&|p| p.score))], "Behaviour score", "coefficient", "score")?);
    r.svg(&lines_svg(
        &[("KL mean".into(), pts(&|p| p.kl_mean)), ("KL max".into(), pts(&|p| p.kl_max))],
        "KL(unsteered ‖ steered), next token",
        "coefficient",
        "nats",
    )?);
    let mut headers = vec!["coeff".to_string(), "score".into(), "projection".into(), "KL mean".into(), "KL max".into()];
    if let Some(p) = s.points.first() {
        headers.extend(p.targets.iter().map(|t| format!("p({:?})", t.text)));
    }
    let rows: Vec<Vec<String>> = s
        .points
        .iter()
        .map(|p| {
            let mut row = vec![format!("{}", p.coeff), format!("{:.4}", p.score), format!("{:.3}", p.projection)];
            row.extend([format!("{:.4}", p.kl_mean), format!("{:.4}", p.kl_max)]);
            row.extend(p.targets.iter().map(|t| format!("{:.5}", t.prob)));
            row
        })
        .collect();
    let h: Vec<&str> = headers.iter().map(String::as_str).collect();
    r.table(&h, &rows);
    Ok(())
}

/// ES / PS / NS / score (and the source with deltas), then every record.
pub fn edit(r: &mut Report, e: &EditReport, source: Option<(&EditReport, &EditDelta)>) -> Result<()> {
    let row = |name: &str, x: &EditReport| {
        vec![
            name.to_string(),
            x.n.to_string(),
            format!("{:.1}", x.efficacy.rate),
            format!("{:.1}", x.paraphrase.rate),
            format!("{:.1}", x.neighbourhood.rate),
            format!("{:.1}", x.score),
        ]
    };
    let mut rows = vec![row("model", e)];
    if let Some((s, _)) = source {
        rows.push(row("source", s));
    }
    r.heading("Knowledge-edit metrics (%)").table(&["", "records", "efficacy", "paraphrase", "neighbourhood", "score"], &rows);
    let mags: Vec<f64> = e.records.iter().map(|x| x.efficacy.magnitude).collect();
    r.svg(&histogram_svg(&mags, 30, "Efficacy magnitude P(new) − P(true) per record", "probability difference")?);
    let rows: Vec<Vec<String>> = e
        .records
        .iter()
        .map(|x| {
            let id = x.id.as_ref().map(|v| v.to_string()).unwrap_or_else(|| x.index.to_string());
            let ok = |b: bool| if b { "yes" } else { "no" }.to_string();
            vec![id, ok(x.efficacy.success), ok(x.paraphrase.success), ok(x.neighbourhood.success), format!("{:.4}", x.efficacy.magnitude)]
        })
        .collect();
    r.heading("Records").table(&["id", "efficacy", "paraphrase", "neighbourhood", "P(new) − P(true)"], &rows);
    Ok(())
}

pub fn choice(r: &mut Report, c: &ChoiceReport) -> Result<()> {
    r.heading("A/B choice").table(
        &["items", "mean score", "matching ahead", "mean p(A)+p(B)"],
        &[vec![c.items.to_string(), format!("{:.4}", c.mean_score), pct(c.share_matching), format!("{:.3}", c.mean_letter_mass)]],
    );
    let scores: Vec<f64> = c.rows.iter().map(|x| x.score).collect();
    r.svg(&histogram_svg(&scores, 20, "p(matching) / (p(matching) + p(other)) per item", "score")?);
    Ok(())
}

/// The `diff` report: both models, the summary tables, the KL histogram and the moved prompts.
pub fn diff(path: &Path, sides: &[Side; 2], p: Option<&PromptsDiff>, t: Option<&TextDiff>) -> Result<()> {
    let mut r = Report::new("mechc diff");
    let rows: Vec<Vec<String>> = ["A", "B"]
        .iter()
        .zip(sides)
        .map(|(n, s)| {
            vec![
                n.to_string(),
                s.path.display().to_string(),
                s.architecture.clone(),
                s.layers.to_string(),
                format!("{:.2}M", s.parameters as f64 / 1e6),
                format!("{:.1} MB", s.file_bytes as f64 / 1e6),
            ]
        })
        .collect();
    r.heading("Models").table(&["", "path", "architecture", "layers", "parameters", "weights"], &rows);
    if let Some(p) = p {
        r.heading(&format!("Prompts ({} prompts, {} tokens)", p.prompts, p.tokens));
        let row = |name: &str, s: &crate::verify::diff::PosStats| {
            vec![name.to_string(), format!("{:.6}", s.kl_mean), format!("{:.6}", s.kl_max), format!("{:.2}%", 100.0 * s.top1_agreement)]
        };
        r.table(&["positions", "KL(A‖B) mean", "KL max", "top-1 agreement"], &[row("every position", &p.all), row("first generated token", &p.first)]);
        let kls: Vec<f64> = p.per_prompt.iter().map(|d| d.kl_first).collect();
        r.svg(&histogram_svg(&kls, 30, "First-token KL(A‖B) per prompt", "KL (nats)")?);
        if !p.moved.is_empty() {
            r.heading("Prompts that moved most");
            let rows: Vec<Vec<String>> = p
                .moved
                .iter()
                .map(|m| vec![m.index.to_string(), format!("{:.4}", m.kl_first), one_line(&m.prompt, 200), m.continuation_a.clone(), m.continuation_b.clone()])
                .collect();
            r.table(&["#", "KL first", "prompt", "A continues", "B continues"], &rows);
        }
        r.para(&format!(
            "{:.1} s; {:.0} tokens/s through both models; model A's forward alone {:.0} tokens/s.",
            p.timing.total_s, p.timing.tokens_per_s, p.timing.forward_a_tokens_per_s
        ));
    }
    if let Some(t) = t {
        r.heading(&format!("Text ({} tokens, {} windows of {})", t.tokens, t.windows, t.seq_len));
        r.table(
            &["perplexity A", "perplexity B", "B / A", "KL mean", "KL max", "top-1 agreement"],
            &[vec![
                format!("{:.4}", t.perplexity_a),
                format!("{:.4}", t.perplexity_b),
                format!("{:.4}", t.perplexity_ratio),
                format!("{:.6}", t.all.kl_mean),
                format!("{:.6}", t.all.kl_max),
                format!("{:.2}%", 100.0 * t.all.top1_agreement),
            ]],
        );
    }
    r.write(path)
}
