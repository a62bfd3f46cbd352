//! `packsft arch` and `packsft generate`: look at a checkpoint.

use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Args;

use crate::data::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use crate::model::generate::{chat_ids, generate as decode, prompt_ids, GenerateOptions, Sampling};
use crate::model::DecoderModel;

#[derive(Args)]
pub(crate) struct ArchCmd {
    /// A model directory, or a Hub repo id in the local cache
    model_dir: PathBuf,
    /// Print the full specification as JSON
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub(crate) struct GenerateCmd {
    /// A model directory, or a Hub repo id in the local cache
    model_dir: PathBuf,
    /// A prompt (repeatable); printed followed by its continuation
    #[arg(long = "prompt", required_unless_present = "input")]
    prompts: Vec<String>,
    /// JSONL rows with `prompt` (text) or `messages` (a chat), instead of --prompt
    #[arg(long, conflicts_with = "prompts")]
    input: Option<PathBuf>,
    /// Write one JSONL row per input row, with its `completion` (instead of printing)
    #[arg(long)]
    output: Option<PathBuf>,
    /// Treat each --prompt as a user message and apply the tokenizer's chat template
    #[arg(long)]
    chat: bool,
    #[arg(long, default_value_t = 64)]
    max_new_tokens: usize,
    /// 0: greedy; otherwise sample at this temperature
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Sample among the k most likely tokens
    #[arg(long)]
    top_k: Option<usize>,
    /// Sample among the most likely tokens whose probabilities sum to p
    #[arg(long)]
    top_p: Option<f64>,
    /// Seed of the draws
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop where this text appears (repeatable)
    #[arg(long)]
    stop: Vec<String>,
}

pub(crate) fn arch(c: ArchCmd) -> Result<()> {
    let report = crate::model::arch::describe(&crate::hub::resolve(&c.model_dir)?)?;
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

/// The rows of `--input`: a prompt or a chat each, with where it came from.
fn input_rows(path: &PathBuf) -> Result<Vec<serde_json::Value>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut rows = Vec::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |msg: String| Error::Data {
            path: path.clone(),
            line: i + 1,
            msg,
        };
        let v: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(format!("invalid JSON: {e}")))?;
        if v.get("prompt").and_then(|p| p.as_str()).is_none()
            && v.get("messages").and_then(|m| m.as_array()).is_none()
        {
            return Err(bad("expected `prompt` (text) or `messages` (a list)".into()));
        }
        rows.push(v);
    }
    Ok(rows)
}

pub(crate) fn generate(c: GenerateCmd) -> Result<()> {
    let dev = candle_core::Device::Cpu;
    let dir = crate::hub::resolve(&c.model_dir)?;
    let model = DecoderModel::from_pretrained(&dir, &dev)?;
    let tok = TextTokenizer::load(&dir)?;
    let opts = GenerateOptions {
        max_new_tokens: c.max_new_tokens,
        sampling: Sampling {
            temperature: c.temperature,
            top_k: c.top_k,
            top_p: c.top_p,
            seed: c.seed,
        },
        stop: c.stop.clone(),
    };
    let rows: Vec<serde_json::Value> = match &c.input {
        Some(path) => input_rows(path)?,
        None if c.chat => c
            .prompts
            .iter()
            .map(|p| serde_json::json!({"messages": [{"role": "user", "content": p}]}))
            .collect(),
        None => c
            .prompts
            .iter()
            .map(|p| serde_json::json!({"prompt": p}))
            .collect(),
    };
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        let ids = match (
            row.get("prompt").and_then(|p| p.as_str()),
            row.get("messages"),
        ) {
            (Some(p), _) => prompt_ids(&tok, p)?,
            (None, Some(m)) => chat_ids(&tok, m.as_array().expect("checked"))?,
            (None, None) => unreachable!("rows are checked"),
        };
        let completion = decode(&model, &tok, ids, &opts)?;
        let mut row = row;
        row["completion"] = completion.into();
        out.push(row);
    }
    match &c.output {
        Some(path) => {
            let text: String = out.iter().map(|r| format!("{r}\n")).collect();
            crate::io::write_atomic(path, text.as_bytes())
        }
        None => {
            let mut stdout = std::io::stdout().lock();
            for r in &out {
                let shown = match r.get("prompt").and_then(|p| p.as_str()) {
                    Some(p) => format!("{p}{}", r["completion"].as_str().unwrap_or_default()),
                    None => r["completion"].as_str().unwrap_or_default().to_string(),
                };
                writeln!(stdout, "{shown}").map_err(|e| Error::io("stdout", e))?;
            }
            Ok(())
        }
    }
}
