//! `mechc eval edit`.

use std::path::PathBuf;

use clap::Args;

use crate::cli::Global;
use crate::model::decoder::Fwd;
use crate::verify::edit::{self, EditFields};

/// Knowledge-edit metrics on CounterFact records (efficacy, paraphrase, neighbourhood).
///
/// Knowledge-edit metrics on CounterFact-style records, as ROME evaluates them: Efficacy (the
/// new target's mean per-token probability beats the true one's after the edit prompt),
/// Paraphrase (the same after the rephrased prompt), Neighbourhood (the true answer still beats
/// the new target on a neighbouring subject's prompt), their magnitudes (probability
/// differences) and Score (harmonic mean of the three rates). With --source, also the source
/// model's numbers and the change. --json prints {"model": report, "source": report|null,
/// "delta": delta|null}.
#[derive(Args, Debug)]
pub struct EditArgs {
    /// HF model directory or .gguf file (e.g. the edited model).
    #[arg(long)]
    pub model: PathBuf,
    /// The model it was compiled from: prints its numbers and the deltas too.
    #[arg(long)]
    pub source: Option<PathBuf>,
    /// Records (JSON list or JSONL of objects). Default:
    /// $MECHC_SHARED_DATA/prompts/counterfact/counterfact-edit.json.
    #[arg(long)]
    pub records: Option<PathBuf>,
    /// Use only the first N records (0 = all).
    #[arg(long, default_value_t = 100, conflicts_with = "ids")]
    pub limit: usize,
    /// Only the records with these ids (values of --id-field), comma-separated.
    #[arg(long, value_delimiter = ',')]
    pub ids: Option<Vec<String>>,
    /// Sequences per forward pass.
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    /// Multiply the projections in f64 (log-probs at least as accurate as transformers'; slower).
    #[arg(long)]
    pub precise: bool,
    /// Record field names (for sets that name them differently).
    #[arg(long, default_value = "case_id")]
    pub id_field: String,
    #[arg(long, default_value = "prompt")]
    pub prompt_field: String,
    #[arg(long, default_value = "target_new")]
    pub new_field: String,
    #[arg(long, default_value = "ground_truth")]
    pub true_field: String,
    #[arg(long, default_value = "rephrase_prompt")]
    pub rephrase_field: String,
    #[arg(long, default_value = "locality_prompt")]
    pub locality_prompt_field: String,
    #[arg(long, default_value = "locality_ground_truth")]
    pub locality_true_field: String,
    #[command(flatten)]
    pub out: crate::cli::ReportArgs,
}

pub fn run(a: EditArgs, g: &Global) -> anyhow::Result<()> {
    a.out.check(&[a.model.as_path()])?;
    if a.batch_size == 0 {
        anyhow::bail!("--batch-size must be at least 1");
    }
    let path = a.records.clone().unwrap_or_else(|| crate::data::shared_data_dir().join("prompts/counterfact/counterfact-edit.json"));
    let fields = EditFields {
        id: a.id_field.clone(),
        prompt: a.prompt_field.clone(),
        target_new: a.new_field.clone(),
        target_true: a.true_field.clone(),
        rephrase: a.rephrase_field.clone(),
        locality_prompt: a.locality_prompt_field.clone(),
        locality_true: a.locality_true_field.clone(),
    };
    let fwd = Fwd { precise: a.precise, ..Fwd::default() };
    let eval_one = |model_path: &PathBuf| -> anyhow::Result<edit::EditReport> {
        let loaded = crate::io::load(model_path, g.progress())?;
        let bar = crate::progress::bar(0, "records", g.progress());
        let r = edit::evaluate_file(&loaded.model, loaded.tok()?, &path, a.limit, a.ids.as_deref(), &fields, a.batch_size, fwd, |i, n| {
            bar.set_length(n as u64);
            bar.set_position(i as u64);
        })?;
        bar.finish_and_clear();
        Ok(r)
    };
    let report = eval_one(&a.model)?;
    let source = match &a.source {
        Some(s) => {
            let r = eval_one(s)?;
            let d = edit::compare(&report, &r)?;
            Some((r, d))
        }
        None => None,
    };
    if let Some(path) = &a.out.report {
        let mut rep = crate::report::Report::new(&format!("mechc eval edit: {}", a.model.display()));
        crate::verify::report::edit(&mut rep, &report, source.as_ref().map(|(r, d)| (r, d)))?;
        rep.write(path)?;
    }
    if a.out.json {
        let out = serde_json::json!({
            "model": report,
            "source": source.as_ref().map(|s| &s.0),
            "delta": source.as_ref().map(|s| &s.1),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        let name = a.model.display().to_string();
        let src_name = a.source.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        print!("{}", edit::table(&name, &report, source.as_ref().map(|(r, d)| (src_name.as_str(), r, d))));
    }
    Ok(())
}
