//! `mechc cache`: list and prune the cache (GGUF imports, findings, covariances).

use clap::{Args, Subcommand};

use super::Global;
use crate::io::cache::{self, ago, human_bytes, PruneFilter};

/// List the cache (what each entry is, its size, last use) or prune it.
///
/// The cache root is $MECHC_CACHE if set; else the .cache/ of the git checkout mechc was built
/// from (where scripts/fetch_models.sh puts the models, so the scripts and a hand-run mechc share
/// one cache); else ~/.cache/mechc. Entries: `gguf` (a .gguf imported once as an HF directory,
/// keyed by the file's SHA-256), `findings` (a pipeline's [[locate]] step, keyed by method, flags,
/// model and data hashes), `rome-cov` (a ROME/MEMIT covariance, keyed by weights and tokens).
/// Deleting one only costs the time to make it again. The scripts' folders in the same root
/// (models/, venv/, demo/, bench/) are listed but never pruned.
#[derive(Args, Debug)]
pub struct CacheArgs {
    #[command(subcommand)]
    pub action: Option<Action>,
    /// Print only the cache root.
    #[arg(long)]
    pub path: bool,
    /// Machine-readable listing.
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum Action {
    Prune(PruneArgs),
}

/// Delete cache entries: those last used more than --older-than DAYS ago, of --kind, or --all.
///
/// Filters combine (`--older-than 30 --kind gguf`: imports unused for a month). Give at least one
/// of --older-than, --kind or --all; --dry-run lists what would go.
#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Only entries last used more than DAYS days ago (fractions allowed).
    #[arg(long, value_name = "DAYS")]
    pub older_than: Option<f64>,
    /// Only entries of this kind.
    #[arg(long, value_parser = ["gguf", "findings", "rome-cov"])]
    pub kind: Option<String>,
    /// Every entry (of --kind, if given).
    #[arg(long)]
    pub all: bool,
    /// List what would be deleted; delete nothing.
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(a: CacheArgs, g: &Global) -> anyhow::Result<()> {
    let (root, why) = crate::io::cache_root();
    if a.path {
        println!("{}", root.display());
        return Ok(());
    }
    match a.action {
        None => {
            let l = cache::list(&root, why)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&l)?);
            } else {
                print!("{}", table(&l));
            }
        }
        Some(Action::Prune(p)) => {
            if let Some(d) = p.older_than {
                if !(d >= 0.0 && d.is_finite()) {
                    anyhow::bail!("--older-than {d}: expected a number of days ≥ 0");
                }
            }
            if p.older_than.is_none() && p.kind.is_none() && !p.all {
                anyhow::bail!("say what to prune: --older-than DAYS, --kind gguf|findings|rome-cov, or --all (--dry-run to preview)");
            }
            let l = cache::list(&root, why)?;
            let filter = PruneFilter { older_than_days: p.older_than, kind: p.kind.clone() };
            let gone = cache::prune(&l, &filter, p.dry_run)?;
            let bytes: u64 = gone.iter().map(|e| e.bytes).sum();
            if !g.quiet {
                for e in &gone {
                    println!("{} {:<9} {:>10}  {}  {}", if p.dry_run { "would delete" } else { "deleted" }, e.kind, human_bytes(e.bytes), rel(&l.root, &e.path), e.what);
                }
                let verb = if p.dry_run { "would free" } else { "freed" };
                println!("{} entries, {verb} {} in {}", gone.len(), human_bytes(bytes), root.display());
            }
        }
    }
    Ok(())
}

fn rel(root: &std::path::Path, p: &std::path::Path) -> String {
    p.strip_prefix(root).unwrap_or(p).display().to_string()
}

fn table(l: &cache::Listing) -> String {
    use std::fmt::Write;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let mut s = String::new();
    let _ = writeln!(s, "cache {}  ({})", l.root.display(), l.why);
    if l.entries.is_empty() {
        let _ = writeln!(s, "no entries");
    } else {
        let _ = writeln!(s, "{:<9} {:>10}  {:<12}  {:<32}  what", "kind", "size", "last use", "entry");
        for e in &l.entries {
            let _ = writeln!(s, "{:<9} {:>10}  {:<12}  {:<32}  {}", e.kind, human_bytes(e.bytes), ago(e.last_used, now), rel(&l.root, &e.path), e.what);
        }
    }
    let total: u64 = l.entries.iter().map(|e| e.bytes).sum();
    let _ = writeln!(s, "total {} in {} entries (`mechc cache prune --help` to free space)", human_bytes(total), l.entries.len());
    if !l.others.is_empty() {
        let _ = writeln!(s, "\nalso in this folder, not managed by mechc:");
        for o in &l.others {
            let _ = writeln!(s, "  {:<10} {:>10}  {}", rel(&l.root, &o.path), human_bytes(o.bytes), o.what);
        }
    }
    s
}
