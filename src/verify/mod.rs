//! Behaviour measurements of a model: perplexity now; diffs between models, task metrics and
//! budgets come with the verify issue.

pub mod perplexity;
