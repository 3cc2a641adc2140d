//! `mechc bench`: prefill and decode speed plus peak memory, for side-by-side comparison with
//! the Python reference (scripts/bench.sh runs both in one go and prints the ratios).

use std::path::PathBuf;
use std::time::Instant;

use clap::Args;
use serde_json::json;

use super::Global;
use crate::model::decoder::Fwd;
use crate::runtime::generate::{generate, GenOpts};
use crate::runtime::{Batch, Hooks};

/// Time prefill and decode and measure peak memory, as JSON.
///
/// Time prefill (64 and 512 tokens unless --prefill says otherwise; median of --runs after one
/// warm-up) and greedy decode (64 new tokens from a 16-token prompt, KV cache), and report peak
/// RSS, as JSON.
#[derive(Args, Debug)]
pub struct BenchArgs {
    /// HF model directory or .gguf file.
    pub model: PathBuf,
    /// JSON list of token ids to use, at least the longest --prefill (default: the tokenised text
    /// of --text).
    #[arg(long)]
    pub ids_file: Option<PathBuf>,
    /// Text to tokenise when no --ids-file is given.
    #[arg(long)]
    pub text: Option<PathBuf>,
    /// Prefill lengths to time (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = [64, 512])]
    pub prefill: Vec<usize>,
    /// Timed runs per prefill length.
    #[arg(long, default_value_t = 5)]
    pub runs: usize,
    /// Timed greedy generations (64 tokens each); 0 skips decode.
    #[arg(long, default_value_t = 3)]
    pub decode_runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap_or(std::cmp::Ordering::Equal));
    v[v.len() / 2]
}

/// Peak resident set size of this process in MB (Linux), if known.
pub fn peak_rss_mb() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

pub fn run(a: BenchArgs, g: &Global) -> anyhow::Result<()> {
    let loaded = crate::io::load(&a.model, g.progress())?;
    let ids: Vec<u32> = match (&a.ids_file, &a.text) {
        (Some(f), _) => serde_json::from_str(&std::fs::read_to_string(f)?)?,
        (None, Some(t)) => loaded.tok()?.encode(&std::fs::read_to_string(t)?, false)?,
        (None, None) => anyhow::bail!("give --ids-file or --text"),
    };
    let need = a.prefill.iter().copied().max().unwrap_or(0).max(16);
    if ids.len() < need {
        anyhow::bail!("need at least {need} token ids, got {}", ids.len());
    }
    let m = &loaded.model;
    let prefill = |n: usize| -> anyhow::Result<f64> {
        let batch = Batch::single(&ids[..n]);
        m.forward(&batch, None, &mut Hooks::new(), Fwd::default())?;
        let mut times = vec![];
        for _ in 0..a.runs.max(1) {
            let t = Instant::now();
            m.forward(&batch, None, &mut Hooks::new(), Fwd::default())?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        Ok(median(times))
    };
    let mut out = json!({ "impl": "mechc" });
    for &n in &a.prefill {
        out[format!("prefill_{n}_ms")] = json!(prefill(n)?);
    }
    let opts = GenOpts { max_tokens: 64, ..GenOpts::default() };
    let mut rates = vec![];
    for _ in 0..a.decode_runs {
        let t = Instant::now();
        let n = generate(m, &ids[..16], &opts, &mut Hooks::new(), |_| Ok(()))?.len();
        rates.push(n as f64 / t.elapsed().as_secs_f64());
    }
    if !rates.is_empty() {
        out["decode_tok_s"] = json!(median(rates));
    }
    out["peak_rss_mb"] = json!(peak_rss_mb());
    out["threads"] = json!(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    println!("{}", serde_json::to_string(&out)?);
    Ok(())
}
