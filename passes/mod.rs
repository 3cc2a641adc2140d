//! Weight-rewriting passes, one file each, registered in [`REGISTRY`]. Every pass has a runtime
//! twin (an intervention in `runtime::hooks`) that property tests hold it equal to.
//!
//! No pass is implemented yet: the compile issue adds them here.

/// Name and one-line summary of every registered pass.
pub const REGISTRY: &[(&str, &str)] = &[];
