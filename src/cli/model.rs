//! `packsft arch` and `packsft generate`: look at a checkpoint.

use std::path::PathBuf;

use clap::Args;

use crate::data::tokenizer::TextTokenizer;
use crate::error::Result;
use crate::model::{generate as decode, DecoderModel};

#[derive(Args)]
pub(crate) struct ArchCmd {
    model_dir: PathBuf,
    /// Print the full specification as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct GenerateCmd {
    model_dir: PathBuf,
    #[arg(long = "prompt", required = true)]
    prompts: Vec<String>,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
}

pub(crate) fn arch(c: ArchCmd) -> Result<()> {
    let report = crate::model::arch::describe(&c.model_dir)?;
    if c.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report.spec).expect("spec serialises")
        );
    } else {
        print!("{report}");
    }
    Ok(())
}

pub(crate) fn generate(c: GenerateCmd) -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let model = DecoderModel::from_pretrained(&c.model_dir, &dev)?;
    let tok = TextTokenizer::load(&c.model_dir)?;
    for p in c.prompts {
        let out = decode::greedy(&model, &tok, &p, c.max_new_tokens)?;
        println!("{p}{out}");
    }
    Ok(())
}
