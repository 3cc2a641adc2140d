//! The runtime around the decoder: hook sites and interventions, batching with padding, the KV
//! cache, generation, and the gradient mode's frozen linear op.

pub mod batch;
pub mod frozen;
pub mod generate;
pub mod hooks;
pub mod score;

pub use batch::{Batch, KvCache};
pub use hooks::{HookPoint, Hooks, Op};
