//! Behaviour measurements of a model: perplexity, batched scoring, and (with the verify issue)
//! diffs between models, task metrics and budgets.

pub mod choice;
pub mod perplexity;
pub mod refusal;
pub mod score;
