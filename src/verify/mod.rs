//! Behaviour measurements: batched scoring, perplexity, diffs between models, task metrics
//! (knowledge edits, refusal, steering, multiple choice) and the budgets a compile must meet.

pub mod budget;
pub mod choice;
pub mod diff;
pub mod edit;
pub mod perplexity;
pub mod refusal;
pub mod report;
pub mod steer;
