#![doc = include_str!("README.md")]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::error::Result;

mod bench;
mod bench_generate;
mod inspect;
mod launch;
mod model;
mod train;

#[derive(Parser)]
#[command(
    name = "packsft",
    version,
    about = "Supervised fine-tuning with padding-free packing"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Train as a recipe says: packsft train recipes/quickstart.yaml [train.lr=1e-3 ...]
    Train(train::TrainCmd),
    /// Loss on the recipe's data.eval; the last stdout line is {"eval_loss": .., "eval_tokens": ..}
    Eval(train::EvalCmd),
    /// What packsft understood of a checkpoint: family, sizes, every structural choice
    Arch(model::ArchCmd),
    /// Mask audit: the dataset report and the first batches token by token, trained tokens
    /// highlighted (--json: input_ids, labels, position_ids, cu_seq_lens per batch)
    Inspect(inspect::InspectCmd),
    /// Throughput of the data pipeline: the recipe's training rows to padding-free batches
    BenchData(inspect::BenchDataCmd),
    /// Attention alone, forward and forward+backward: the lengths of real batches of DATA, or
    /// `--equal BxL` sequences of L tokens
    BenchAttn(bench::BenchAttnCmd),
    /// Continuation of one or more prompts with a saved model directory (greedy or sampled)
    Generate(model::GenerateCmd),
    /// Decoding throughput: random prompts through a random model at a bench shape
    BenchGenerate(bench_generate::BenchGenerateCmd),
    /// Training throughput on pre-tokenized data (shared/bench/make_bench_data.py)
    Bench(bench::BenchCmd),
    /// Merge a PEFT LoRA adapter into its base: a complete Hugging Face checkpoint with
    /// W + s·B·A (PEFT's merge_and_unload)
    Merge(model::MergeCmd),
    /// Run a command on several ranks (one process per GPU) with torchrun's variables:
    /// packsft launch --nproc-per-node 8 -- train recipe.yaml
    Launch(launch::LaunchCmd),
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Train(c) => train::train(c),
        Cmd::Eval(c) => train::eval(c),
        Cmd::Arch(c) => model::arch(c),
        Cmd::Inspect(c) => inspect::run_inspect(c),
        Cmd::BenchData(c) => inspect::run_bench_data(c),
        Cmd::BenchAttn(c) => bench::run_bench_attn(c),
        Cmd::Generate(c) => model::generate(c),
        Cmd::BenchGenerate(c) => bench_generate::run(c),
        Cmd::Bench(c) => bench::run_bench(c),
        Cmd::Merge(c) => model::merge(c),
        Cmd::Launch(c) => launch::launch(c),
    }
}

/// The `packsft` command line: parses the arguments, runs the command, and maps an error to a
/// message on stderr and a failing exit status. Logs go to stderr through a `tracing`
/// subscriber (`RUST_LOG` filters them; `info` by default).
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
