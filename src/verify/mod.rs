//! Behaviour measurements of a model: perplexity, batched scoring, and (with the verify issue)
//! diffs between models, task metrics and budgets.

pub mod edit;
pub mod perplexity;
pub mod score;
pub mod steer;
