//! The compiler: a pipeline file → passes over the weights (the structural verifier after each)
//! → behaviour verification against the source under the `[verify]` budgets → the emitter.
//!
//! [`compile`] is the whole compile and owns its one rule: the output is checked before any
//! work, and a violated budget writes nothing. Its stages ([`Plan::new`], [`Plan::run_passes`],
//! [`Plan::verify`], [`Plan::emit`]) are public for callers that measure without emitting; an
//! [`Observer`] sees each stage as it ends (the CLI prints there).

pub mod emit;
pub mod locate_steps;
pub mod pipeline;
pub mod select;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use crate::data::{SetSpec, TextSet};
use crate::error::{Error, Result};
use crate::model::{verifier, Model};
use crate::passes::{self, Pass};
use crate::verify::budget::{self, BudgetCheck};
use crate::verify::diff::{diff_prompts, diff_text, DiffOpts, PromptsDiff, TextDiff};
use pipeline::PipelineFile;

/// A pipeline checked against the registry and the source model, ready to run.
pub struct Plan {
    pub file: PipelineFile,
    pub source_path: PathBuf,
    pub out: PathBuf,
    pub emit: emit::EmitOpts,
    pub passes: Vec<(String, Box<dyn Pass>)>,
    /// Each pass's options after `select` / `direction = { by }` became explicit targets.
    pub options: Vec<toml::Table>,
    /// The `[[locate]]` steps' findings.
    pub steps: Vec<locate_steps::StepFindings>,
    /// Per pass, the findings its options were chosen from.
    pub used: Vec<Vec<serde_json::Value>>,
    /// Per pass, the parameter search (`coeff = "auto"`) run just before it, if any; the pass
    /// in `passes` was built with a placeholder value and is rebuilt with the chosen one.
    pub searches: Vec<Option<crate::search::ParamSearch>>,
}

/// What one pass did.
#[derive(Debug, Clone, Serialize)]
pub struct PassRecord {
    pub name: String,
    /// The options as run (selections and searched values made explicit).
    pub options: toml::Table,
    /// The findings the options were selected from.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub findings: Vec<serde_json::Value>,
    pub summary: String,
    pub parameters_before: usize,
    pub parameters_after: usize,
    /// The parameter search that chose one of the options, if any (`crate::search`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub search: Option<crate::search::SearchRecord>,
    /// The search's trials as a table, for people (printed under the summary line).
    #[serde(skip)]
    pub details_text: Option<String>,
    /// Files to write beside the checkpoint (the pass's and its search's), built when the pass
    /// ran so their errors stop the compile before anything is written.
    #[serde(skip)]
    pub side_files: Vec<(PathBuf, Vec<u8>)>,
    #[serde(skip)]
    pub seconds: f64,
}

/// The behaviour check of the compiled model against its source.
#[derive(Debug, Clone, Serialize)]
pub struct Verdict {
    pub metrics: BTreeMap<String, f64>,
    pub checks: Vec<BudgetCheck>,
    #[serde(skip)]
    pub prompts: Option<PromptsDiff>,
    #[serde(skip)]
    pub text: Option<TextDiff>,
}

impl Verdict {
    pub fn ok(&self) -> bool {
        self.checks.iter().all(|c| c.ok)
    }
}

impl Plan {
    /// Resolve paths and options, run (or reuse) the `[[locate]]` steps, select targets from
    /// their findings, build every pass (unknown names and bad options fail here, before the
    /// passes run). `say` reports the locate steps.
    pub fn new(file: PipelineFile, out: Option<PathBuf>, force: bool, loaded: &crate::io::Loaded, progress: bool, say: &dyn Fn(String)) -> Result<Plan> {
        let prepared = locate_steps::prepare(&file)?;
        Plan::with_steps(file, prepared, out, force, loaded, progress, say)
    }

    /// [`Plan::new`] with the `[[locate]]` steps already parsed and checked.
    fn with_steps(
        file: PipelineFile,
        prepared: locate_steps::Prepared,
        out: Option<PathBuf>,
        force: bool,
        loaded: &crate::io::Loaded,
        progress: bool,
        say: &dyn Fn(String),
    ) -> Result<Plan> {
        let (source, source_dtype) = (&loaded.model, loaded.stored_dtype);
        let p = &file.pipeline;
        let out = output_path(&file, out.as_deref())?;
        let gguf = gguf_output(&file)?;
        let dtype = match &p.output.dtype {
            Some(_) if gguf.is_some() => candle_core::DType::F32,
            Some(d) => crate::io::st::parse_dtype(d).map_err(|e| Error::config(&file.path, "output.dtype", e.to_string()))?,
            None => source_dtype,
        };
        let shard_size = p
            .output
            .shard_size
            .as_deref()
            .map(pipeline::parse_size)
            .transpose()
            .map_err(|e| Error::config(&file.path, "output.shard_size", e.to_string()))?;
        if let Some(v) = &p.verify {
            v.validate(&file.path)?;
        }
        for (i, spec) in p.passes.iter().enumerate() {
            passes::find(&spec.name).ok_or_else(|| {
                Error::config(&file.path, format!("pass[{i}].name"), format!("unknown pass `{}` (passes: {})", spec.name, passes::names()))
            })?;
        }
        let source_path = file.resolve(&p.model.path);
        let steps = if prepared.is_empty() {
            vec![]
        } else {
            let model = crate::ir::Source::model(&source_path)?;
            locate_steps::run(&file, prepared, loaded, &model, progress, say)?
        };
        let ir = crate::ir::Ir::from_model(source);
        let (mut built, mut options, mut used, mut searches) = (vec![], vec![], vec![], vec![]);
        for (i, spec) in p.passes.iter().enumerate() {
            let info = passes::find(&spec.name).expect("checked above");
            let at = |e: Error| match e {
                Error::Invalid(m) => Error::config(&file.path, format!("pass[{i}] ({})", spec.name), m),
                other => other,
            };
            let (opts, from) = select::resolve(&spec.options, &steps, &ir).map_err(at)?;
            for u in &from {
                say(format!("pass {}: {}", spec.name, select::describe(u)));
            }
            let base = file.path.parent().unwrap_or(std::path::Path::new("."));
            let cx = passes::BuildCtx { source, base_dir: base, tok: loaded.tok.as_ref(), progress };
            let resolve = |t: &toml::Table| select::resolve(t, &steps, &ir).map(|(o, _)| o);
            let search = crate::search::extract(&spec.name, &spec.options, &resolve, &cx).map_err(at)?;
            let placeholder = search.as_ref().map(|s| s.placeholder_options(&resolve)).transpose().map_err(at)?;
            let pass = (info.build)(placeholder.as_ref().unwrap_or(&opts), &cx).map_err(at)?;
            built.push((spec.name.clone(), pass));
            options.push(opts);
            used.push(from);
            searches.push(search);
        }
        // `[verify.steer] direction = { by }` becomes the step's vectors file, as in a pass.
        let mut file = file;
        if let Some(st) = file.pipeline.verify.as_mut().and_then(|v| v.steer.as_mut()) {
            if let budget::DirectionRef::Found(d) = &st.direction {
                let (path, _) = select::direction(d, &steps).map_err(|e| Error::config(&file.path, "verify.steer.direction", e.to_string()))?;
                st.direction = budget::DirectionRef::File(path);
            }
        }
        Ok(Plan { file, source_path, out, emit: emit::EmitOpts { dtype, shard_size, force, gguf }, passes: built, options, steps, used, searches })
    }

    /// Run the passes in order on a copy of the source, the structural verifier after each.
    pub fn run_passes(&self, source: &Model, mut on_pass: impl FnMut(&PassRecord, &Model)) -> Result<(Model, Vec<PassRecord>)> {
        let mut model = source.clone();
        verifier::check(&model).map_err(|e| Error::invalid(format!("the source model fails the verifier: {e}")))?;
        let mut records = vec![];
        let ir = self.searches.iter().any(Option::is_some).then(|| crate::ir::Ir::from_model(source));
        for (i, (name, pass)) in self.passes.iter().enumerate() {
            let before = model.param_count();
            let t = Instant::now();
            // A search runs on the model as this pass receives it; the pass is rebuilt with its choice.
            let (searched, options, findings, search) = match &self.searches[i] {
                Some(s) => {
                    let ir = ir.as_ref().expect("built when a search exists");
                    let resolve = |t: &toml::Table| select::resolve(t, &self.steps, ir).map(|(o, _)| o);
                    let (p, written, r) = s.run(&model, source, &resolve)?;
                    // What the chosen values took from findings (e.g. a searched direction layer).
                    let (o, used) = select::resolve(&written, &self.steps, ir)?;
                    (Some(p), o, used, Some(r))
                }
                None => (None, self.options[i].clone(), self.used[i].clone(), None),
            };
            let pass = searched.as_deref().unwrap_or(pass.as_ref());
            let mut summary = pass.run(&mut model)?;
            let mut side_files = pass.side_files()?;
            if let (Some(r), Some(s)) = (&search, &self.searches[i]) {
                summary = format!("{}; {summary}", r.summary());
                side_files.extend(s.side_files(r)?);
            }
            verifier::check(&model).map_err(|e| Error::invalid(format!("pass {i} ({name}) left an invalid model: {e}")))?;
            let rec = PassRecord {
                name: name.clone(),
                options,
                findings,
                summary,
                parameters_before: before,
                parameters_after: model.param_count(),
                details_text: search.as_ref().map(|r| r.table()),
                search,
                side_files,
                seconds: t.elapsed().as_secs_f64(),
            };
            on_pass(&rec, &model);
            records.push(rec);
        }
        Ok((model, records))
    }

    /// Diff the compiled model against the source on `[verify]`'s data and check the budgets.
    pub fn verify(&self, source: &Model, compiled: &Model, tok: &crate::tokenizer::Tok, progress: bool) -> Result<Option<Verdict>> {
        let Some(v) = &self.file.pipeline.verify else { return Ok(None) };
        let prompts = match &v.prompts {
            Some(spec) => {
                let mut s = SetSpec::parse(spec);
                s.path = self.file.resolve(&s.path);
                let set = TextSet::load(&s, v.limit)?;
                let ids = tok.prompts_ids(&set.texts, v.chat)?;
                let opts = DiffOpts { batch: v.batch_size, top_moved: 0, gen_tokens: 0, stop: vec![] };
                let bar = crate::progress::bar(ids.len() as u64, "verify", progress);
                let d = diff_prompts(source, compiled, &ids, &set.texts, &opts, |_| Ok(String::new()), |i, _| bar.set_position(i as u64))?;
                bar.finish_and_clear();
                Some(d)
            }
            None => None,
        };
        let text = match &v.text {
            Some(t) => {
                let path = self.file.resolve(std::path::Path::new(t));
                let s = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?.replace("\r\n", "\n");
                let mut ids = tok.encode(&s, false)?;
                ids.truncate(v.tokens);
                Some(diff_text(source, compiled, &ids, v.seq_len, |_, _| {})?)
            }
            None => None,
        };
        let mut metrics = budget::metrics(prompts.as_ref(), text.as_ref());
        if let Some(r) = &v.refusal {
            let mut spec = SetSpec::parse(&r.prompts);
            spec.path = self.file.resolve(&spec.path);
            let set = TextSet::load(&spec, r.limit)?;
            let opts = crate::verify::refusal::RefusalOpts { max_tokens: r.max_tokens, batch: v.batch_size, chat: r.chat, ..Default::default() };
            for (name, m) in [("refusal_rate_source", source), ("refusal_rate", compiled)] {
                let bar = crate::progress::bar(set.texts.len() as u64, "refusal", progress);
                let rep = crate::verify::refusal::refusal_eval(m, tok, &set.texts, &opts, |i, _| bar.set_position(i as u64))?;
                bar.finish_and_clear();
                metrics.insert(name.into(), rep.rate);
            }
        }
        if let Some(e) = &v.edit {
            let path = self.file.resolve(std::path::Path::new(&e.records));
            let ids = (!e.ids.is_empty()).then_some(e.ids.as_slice());
            let fields = crate::verify::edit::EditFields::default();
            for (suffix, m) in [("_source", source), ("", compiled)] {
                let r = crate::verify::edit::evaluate_file(m, tok, &path, e.limit, ids, &fields, v.batch_size, Default::default(), |_, _| {})?;
                metrics.insert(format!("edit_score{suffix}"), r.score);
                metrics.insert(format!("edit_efficacy{suffix}"), r.efficacy.rate);
                metrics.insert(format!("edit_paraphrase{suffix}"), r.paraphrase.rate);
                metrics.insert(format!("edit_neighbourhood{suffix}"), r.neighbourhood.rate);
            }
        }
        if let Some(st) = &v.steer {
            use crate::verify::steer::{self, SteerMetric, SteerOpts};
            let mut spec = SetSpec::parse(&st.prompts);
            spec.path = self.file.resolve(&spec.path);
            let set = TextSet::load(&spec, st.limit)?;
            let ids = tok.prompts_ids(&set.texts, st.chat)?;
            let budget::DirectionRef::File(direction) = &st.direction else {
                return Err(Error::invalid("verify.steer.direction: `{ by }` is resolved when the plan is made"));
            };
            let mut dspec = SetSpec::parse(direction);
            dspec.path = self.file.resolve(&dspec.path);
            let dir = steer::load_direction(&dspec, source.cfg.hidden_size)?;
            let metric = st.metric.unwrap_or(SteerMetric::Projection);
            let opts = SteerOpts {
                layer: 0,
                measure_layer: st.measure_layer,
                coeffs: vec![0.0],
                metric,
                targets: steer::target_tokens(tok, &st.targets)?,
                normalize: false,
                batch: v.batch_size,
            };
            for (name, m) in [("steer_score_source", source), ("steer_score", compiled)] {
                let r = steer::steer_sweep(m, &ids, &dir, &opts, |_, _| {})?;
                metrics.insert(name.into(), r.points[0].score);
            }
            metrics.insert("steer_gain".into(), metrics["steer_score"] - metrics["steer_score_source"]);
        }
        let checks = v.check(&metrics);
        Ok(Some(Verdict { metrics, checks, prompts, text }))
    }

    /// One line per violated budget, pointing at its line in the pipeline file.
    pub fn violations(&self, verdict: &Verdict) -> Vec<String> {
        verdict
            .checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| {
                let (section, key) = match c.budget.rsplit_once('.') {
                    Some((sub, key)) => (format!("verify.{sub}"), key),
                    None => ("verify".to_string(), c.budget.as_str()),
                };
                format!("{}  (measured {} = {:.6})", self.file.locate_key(&section, key), c.metric, c.measured)
            })
            .collect()
    }

    /// Write the compiled model with its manifest.
    pub fn emit(&self, compiled: &Model, source_dir: &std::path::Path, records: &[PassRecord], verdict: Option<&Verdict>) -> Result<PathBuf> {
        let source_hash = source_hash(&self.source_path, source_dir)?;
        let pipeline_hash = self.file.sha256();
        let meta: BTreeMap<String, String> = [
            ("mechc_version".to_string(), env!("CARGO_PKG_VERSION").to_string()),
            ("mechc_pipeline_sha256".to_string(), pipeline_hash.clone()),
            ("mechc_source_sha256".to_string(), source_hash.clone()),
        ]
        .into_iter()
        .collect();
        let manifest = json!({
            "mechc_version": env!("CARGO_PKG_VERSION"),
            "pipeline": {"path": self.file.path.file_name().map(|n| n.to_string_lossy().into_owned()), "sha256": pipeline_hash,
                         "text": self.file.text},
            "source": {"path": self.file.pipeline.model.path, "sha256": source_hash},
            "locate": self.steps,
            "passes": records,
            "parameters": compiled.param_count(),
            "verify": verdict,
        });
        // Side files were built when their pass ran (so their errors stopped the compile before
        // anything was written) and are written after the checkpoint.
        let side: Vec<_> = records.iter().flat_map(|r| r.side_files.iter().cloned()).collect();
        let out = emit::emit(compiled, source_dir, &self.out, &[&self.source_path, source_dir], &self.emit, &meta, manifest)?;
        for (path, bytes) in side {
            crate::io::atomic::write_file(&path, &bytes)?;
        }
        Ok(out)
    }
}

/// What [`compile`] is asked to do besides the pipeline file.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Overrides `[output] path`.
    pub out: Option<PathBuf>,
    /// Replace an existing output.
    pub force: bool,
    /// Run the passes in memory and stop: nothing verified, nothing written.
    pub dry_run: bool,
    /// Whether long work may draw progress bars.
    pub progress: bool,
}

/// What a compile tells its caller as it goes. Every method has a default that does nothing.
pub trait Observer {
    /// A line for people (what is loaded, located, selected, written).
    fn say(&self, _line: String) {}
    /// The source model, before the first pass.
    fn source(&mut self, _model: &Model) {}
    /// A pass ran; `model` is the result so far.
    fn pass(&mut self, _record: &PassRecord, _model: &Model) {}
    /// The budgets were checked (whether they held or not), before anything is written.
    fn verified(&mut self, _verdict: &Verdict, _source: &Model, _compiled: &Model, _out: &std::path::Path) -> Result<()> {
        Ok(())
    }
}

/// A finished compile.
#[derive(Debug)]
pub struct Emitted {
    /// The directory written; `None` for a dry run.
    pub out: Option<PathBuf>,
    /// Where it would have been written (the same as `out` unless a dry run).
    pub target: PathBuf,
    pub records: Vec<PassRecord>,
    pub verdict: Option<Verdict>,
}

/// Why a compile wrote nothing.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error(transparent)]
    Error(#[from] Error),
    /// One line per violated budget, each pointing at its line in the pipeline file.
    #[error("budget violated, nothing written: {}", .violations.join("; "))]
    Budget { violations: Vec<String>, verdict: Box<Verdict> },
}

/// The output a pipeline asks for: `--out`, else `[output] path` (relative to the pipeline file).
pub fn output_path(file: &PipelineFile, out: Option<&std::path::Path>) -> Result<PathBuf> {
    match (out, &file.pipeline.output.path) {
        (Some(o), _) => Ok(o.to_path_buf()),
        (None, Some(o)) => Ok(file.resolve(o)),
        (None, None) => Err(Error::config(&file.path, "output.path", "missing (or pass --out DIR)")),
    }
}

/// `[output] format = "gguf"`: the GGUF type (`dtype`, default f32); `None` for safetensors.
fn gguf_output(file: &PipelineFile) -> Result<Option<crate::io::gguf_export::GgufType>> {
    let o = &file.pipeline.output;
    match o.format.as_deref() {
        None | Some("safetensors") => Ok(None),
        Some("gguf") if o.shard_size.is_some() => {
            Err(Error::config(&file.path, "output.shard_size", "GGUF output is one file (shard_size is for safetensors)"))
        }
        Some("gguf") => crate::io::gguf_export::GgufType::parse(o.dtype.as_deref().unwrap_or("f32"))
            .map(Some)
            .map_err(|e| Error::config(&file.path, "output.dtype", e.to_string())),
        Some(other) => Err(Error::config(&file.path, "output.format", format!("`{other}` is not one of safetensors, gguf"))),
    }
}

/// Compile a pipeline: check the output and the steps' options (before anything is loaded),
/// load the source, locate, run the passes, verify the budgets, emit — or write nothing.
pub fn compile(file: PipelineFile, req: &Request, obs: &mut dyn Observer) -> std::result::Result<Emitted, Failure> {
    let target = output_path(&file, req.out.as_deref())?;
    if !req.dry_run && target.exists() && !req.force {
        return Err(Error::output(&target, "already exists (pass --force to replace it)").into());
    }
    gguf_output(&file)?;
    let prepared = locate_steps::prepare(&file)?;
    let source_path = file.resolve(&file.pipeline.model.path);
    let loaded = crate::io::load(&source_path, req.progress)?;
    obs.say(format!("source {} ({:.2}M parameters)", file.pipeline.model.path.display(), loaded.model.param_count() as f64 / 1e6));
    let plan = {
        let say = |s: String| obs.say(s);
        Plan::with_steps(file, prepared, Some(target.clone()), req.force, &loaded, req.progress, &say)?
    };
    obs.source(&loaded.model);
    let (compiled, records) = plan.run_passes(&loaded.model, |r, m| obs.pass(r, m))?;
    if req.dry_run {
        return Ok(Emitted { out: None, target, records, verdict: None });
    }
    if plan.emit.gguf.is_some() {
        // What GGUF cannot express is known now: say it before minutes of verification.
        crate::io::gguf_export::check(&compiled.cfg)?;
    }
    let verdict = plan.verify(&loaded.model, &compiled, loaded.tok()?, req.progress)?;
    if let Some(v) = &verdict {
        obs.verified(v, &loaded.model, &compiled, &target)?;
        let violations = plan.violations(v);
        if !violations.is_empty() {
            return Err(Failure::Budget { violations, verdict: Box::new(v.clone()) });
        }
    }
    let out = plan.emit(&compiled, &loaded.dir, &records, verdict.as_ref())?;
    Ok(Emitted { out: Some(out), target, records, verdict })
}

/// Hash of the source: the .gguf file, or the directory's config and weight files in name order.
fn source_hash(path: &std::path::Path, dir: &std::path::Path) -> Result<String> {
    use sha2::{Digest, Sha256};
    if crate::io::is_gguf(path) {
        return crate::io::sha256_file(path);
    }
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors") || p.file_name().is_some_and(|n| n == "config.json"))
        .collect();
    names.sort();
    let mut h = Sha256::new();
    for p in names {
        h.update(p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        h.update(crate::io::sha256_file(&p)?.as_bytes());
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}
