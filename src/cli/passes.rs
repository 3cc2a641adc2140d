//! `mechc passes [NAME]`: the registered passes and their documentation.

use clap::Args;

use super::Global;

/// List the passes a pipeline can use, or print one pass's documentation and options.
#[derive(Args, Debug)]
pub struct PassesArgs {
    /// A pass name: print its full documentation.
    pub name: Option<String>,
}

pub fn run(a: PassesArgs, _g: &Global) -> anyhow::Result<()> {
    match a.name {
        Some(n) => {
            let p = crate::passes::find(&n)
                .ok_or_else(|| anyhow::anyhow!("unknown pass `{n}` (passes: {})", crate::passes::names()))?;
            println!("{}\n\n{}", p.name, p.doc.trim());
        }
        None => {
            if crate::passes::REGISTRY.is_empty() {
                println!("no passes registered yet");
            }
            let width = crate::passes::REGISTRY.iter().map(|p| p.name.len()).max().unwrap_or(0);
            for p in crate::passes::REGISTRY {
                println!("{:<width$}  {}", p.name, p.doc.trim().lines().next().unwrap_or(""));
            }
        }
    }
    Ok(())
}
