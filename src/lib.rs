//! mechc: a compiler for trained language models.
//!
//! Layers, from the bottom: [`io`] reads and writes checkpoints (HF directories, GGUF import);
//! [`model`] holds the architectures and the decoder forward; [`runtime`] adds hook sites,
//! interventions, batching, the KV cache and generation; [`cli`] is one file per subcommand.
//! Passes live in `passes/` (see docs/architecture.md); searches over their parameters
//! (`coeff = "auto"`) in [`search`], run by the compile driver.

pub mod cli;
pub mod compile;
pub mod data;
pub mod error;
pub mod io;
pub mod ir;
pub mod locate;
pub mod model;
pub mod progress;
pub mod report;
pub mod rome;
pub mod runtime;
pub mod search;
pub mod tokenizer;
pub mod verify;

#[path = "../passes/mod.rs"]
pub mod passes;

pub use error::{Error, Result};
