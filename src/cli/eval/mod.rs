//! `mechc eval TASK`: task metrics of one model, one file per task.

pub mod choice;
pub mod edit;
pub mod perplexity;
pub mod refusal;
pub mod steer;

use clap::{Args, Subcommand};

use super::Global;

/// Measure a model on a task.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub task: Task,
}

#[derive(Subcommand, Debug)]
pub enum Task {
    Perplexity(perplexity::PerplexityArgs),
    Edit(edit::EditArgs),
    Steer(steer::SteerArgs),
    Refusal(refusal::RefusalArgs),
    Choice(choice::ChoiceArgs),
}

pub fn run(a: EvalArgs, g: &Global) -> anyhow::Result<()> {
    match a.task {
        Task::Perplexity(p) => perplexity::run(p, g),
        Task::Edit(p) => edit::run(p, g),
        Task::Steer(p) => steer::run(p, g),
        Task::Refusal(a) => refusal::run(a, g),
        Task::Choice(a) => choice::run(a, g),
    }
}
