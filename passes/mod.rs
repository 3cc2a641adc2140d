//! Weight-rewriting passes, one file each, registered in [`REGISTRY`] with one line. Every pass
//! has a runtime twin (an intervention in `runtime::hooks`) that the property tests in
//! `tests/passes_twins.rs` hold it equal to, for every pass found here.
//!
//! A pass file holds: a doc comment (the text `mechc passes NAME` prints), an options struct
//! read from the pipeline's `[[pass]]` table (`deny_unknown_fields`), and `build`, which checks
//! the options against the model and returns the [`Pass`].

pub mod bake_steering;
pub mod common;
pub mod conditional_steer;
pub mod prune_heads;
pub mod prune_neurons;
pub mod rank_one_edit;
pub mod skip_layers;

use crate::error::Result;
use crate::model::Model;
use crate::runtime::Hooks;

/// A built pass: options checked, ready to rewrite a model.
pub trait Pass {
    /// Rewrite weights and config in place; return a one-line summary of what changed.
    fn run(&self, model: &mut Model) -> Result<String>;
    /// The runtime intervention on the source model that this pass compiles into weights:
    /// forward(run(source)) == forward(source, twin) (exactly, up to float rounding).
    fn twin(&self, source: &Model) -> Result<Hooks>;
    /// Files the pass exports besides the checkpoint (path, bytes), e.g. a llama.cpp control
    /// vector. The driver writes them after the checkpoint, each atomically, and never on a
    /// dry run or a failed budget.
    fn side_files(&self) -> Result<Vec<(std::path::PathBuf, Vec<u8>)>> {
        Ok(vec![])
    }
}

/// A registry entry.
pub struct PassInfo {
    pub name: &'static str,
    /// The pass's documentation: first line a summary, then the options.
    pub doc: &'static str,
    /// Parse options (a `[[pass]]` table minus `name`) and check them against the source model.
    pub build: fn(&toml::Table, &BuildCtx) -> Result<Box<dyn Pass>>,
    /// Random valid options for a model, from a seed (None if the model cannot take the pass,
    /// e.g. deleting a layer of a one-layer model): the generic property tests use them.
    pub example: fn(&Model, u64) -> Option<toml::Table>,
}

pub const REGISTRY: &[PassInfo] = &[
    skip_layers::INFO,
    prune_neurons::INFO,
    prune_heads::INFO,
    bake_steering::INFO,
    conditional_steer::INFO,
    rank_one_edit::INFO,
];

pub fn find(name: &str) -> Option<&'static PassInfo> {
    REGISTRY.iter().find(|p| p.name == name)
}

/// The registered names, for error messages.
pub fn names() -> String {
    if REGISTRY.is_empty() {
        return "none registered yet".into();
    }
    REGISTRY.iter().map(|p| p.name).collect::<Vec<_>>().join(", ")
}

/// Options of a pass from its `[[pass]]` table, with errors that say which option is wrong.
pub fn options<T: serde::de::DeserializeOwned>(t: &toml::Table) -> Result<T> {
    T::deserialize(toml::Value::Table(t.clone())).map_err(|e| crate::Error::invalid(e.message().to_string()))
}

/// What a pass's `build` may consult: the source model and the directory relative paths in
/// its options are resolved against (the pipeline file's, like the pipeline's own paths).
pub struct BuildCtx<'a> {
    pub source: &'a Model,
    pub base_dir: &'a std::path::Path,
    /// The source's tokenizer, for passes whose options are text (None for random test models).
    pub tok: Option<&'a crate::tokenizer::Tok>,
    /// Whether long work may draw progress bars.
    pub progress: bool,
}

impl<'a> BuildCtx<'a> {
    /// Relative paths resolve against the current directory.
    pub fn new(source: &'a Model) -> Self {
        BuildCtx { source, base_dir: std::path::Path::new("."), tok: None, progress: false }
    }

    /// A path from a pass option: absolute as is, relative against `base_dir`.
    pub fn path(&self, p: &str) -> std::path::PathBuf {
        let p = std::path::Path::new(p);
        if p.is_relative() { self.base_dir.join(p) } else { p.to_path_buf() }
    }
}
