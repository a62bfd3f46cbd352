//! `packsft arch` and `packsft generate`: look at a checkpoint.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::PathBuf;

use clap::Args;

use crate::data::tokenizer::TextTokenizer;
use crate::error::{Error, Result};
use crate::model::generate::{
    chat_ids, generate_batch, generation_config_eos, prompt_ids, GenerateOptions, Sampling,
};
use crate::model::DecoderModel;

#[derive(Args)]
pub(crate) struct ArchCmd {
    /// A model directory, or a Hub repo id in the local cache
    model_dir: PathBuf,
    /// Print the full specification as JSON
    #[arg(long)]
    json: bool,
    /// Also show what LoRA of this rank would adapt and train
    #[arg(long)]
    lora_r: Option<usize>,
    /// LoRA targets: all-linear or comma-separated module names (default: PEFT's for the family)
    #[arg(long)]
    lora_target_modules: Option<String>,
    /// LoRA modules trained in full, comma-separated
    #[arg(long)]
    lora_modules_to_save: Option<String>,
    /// A PEFT adapter directory: show what it adapts in this checkpoint
    #[arg(long)]
    adapter: Option<PathBuf>,
}

#[derive(Args)]
pub(crate) struct MergeCmd {
    /// The base checkpoint directory (or a Hub repo id in the local cache)
    base_dir: PathBuf,
    /// The PEFT adapter directory (adapter_config.json, adapter_model.safetensors)
    adapter_dir: PathBuf,
    /// Where the merged checkpoint is written
    out_dir: PathBuf,
    /// bf16, f16 or f32
    #[arg(long, default_value = "bf16")]
    dtype: String,
}

/// `packsft merge`: the base with W + s·B·A, a complete Hugging Face checkpoint.
pub(crate) fn merge(c: MergeCmd) -> Result<()> {
    let dtype = match c.dtype.as_str() {
        "bf16" | "bfloat16" => candle_core::DType::BF16,
        "f16" | "float16" => candle_core::DType::F16,
        "f32" | "float32" => candle_core::DType::F32,
        other => {
            return Err(Error::Config(format!(
                "--dtype {other}: use bf16, f16 or f32"
            )))
        }
    };
    let base = crate::hub::resolve(&c.base_dir)?;
    let r = crate::model::lora::merge(&base, &c.adapter_dir, &c.out_dir, dtype)?;
    println!(
        "{}",
        serde_json::json!({
            "out_dir": c.out_dir.display().to_string(),
            "merged_matrices": r.merged,
            "replaced_tensors": r.replaced,
            "tensors": r.tensors,
        })
    );
    Ok(())
}

/// The LoRA configuration `arch`'s flags describe, if any.
fn arch_lora(c: &ArchCmd) -> Result<Option<crate::model::lora::LoraConfig>> {
    use crate::model::lora::{LoraConfig, Targets};
    if let Some(dir) = &c.adapter {
        return LoraConfig::from_peft_dir(dir).map(Some);
    }
    if c.lora_r.is_none() && c.lora_target_modules.is_none() && c.lora_modules_to_save.is_none() {
        return Ok(None);
    }
    let list = |s: &str| -> Vec<String> {
        s.split(',')
            .map(|x| x.trim().to_string())
            .filter(|x| !x.is_empty())
            .collect()
    };
    let d = LoraConfig::default();
    Ok(Some(LoraConfig {
        r: c.lora_r.unwrap_or(d.r),
        targets: match c.lora_target_modules.as_deref() {
            None => Targets::FamilyDefault,
            Some("all-linear") => Targets::AllLinear,
            Some(s) => Targets::Names(list(s)),
        },
        modules_to_save: c
            .lora_modules_to_save
            .as_deref()
            .map(list)
            .unwrap_or_default(),
        ..d
    }))
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
    /// A JSON object of extra chat-template variables, as apply_chat_template(**kwargs) takes
    /// them, e.g. '{"enable_thinking": false}' (Qwen3)
    #[arg(long, value_parser = parse_kwargs, default_value = "{}")]
    chat_template_kwargs: BTreeMap<String, serde_json::Value>,
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
    /// Prompts decoded together (each step runs one token of each as one batch)
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    /// `cpu`, `cuda` or `cuda:N` (float32 either way)
    #[arg(long, default_value = "cpu")]
    device: String,
}

/// `--chat-template-kwargs`: a JSON object.
fn parse_kwargs(s: &str) -> std::result::Result<BTreeMap<String, serde_json::Value>, String> {
    serde_json::from_str(s).map_err(|e| format!("a JSON object of template variables: {e}"))
}

pub(crate) fn arch(c: ArchCmd) -> Result<()> {
    let dir = crate::hub::resolve(&c.model_dir)?;
    let report = crate::model::arch::describe(&dir)?;
    let lora = match arch_lora(&c)? {
        Some(cfg) => Some(crate::model::arch::describe_lora(&dir, &cfg)?),
        None => None,
    };
    if c.json {
        let mut v = serde_json::to_value(&report.spec).expect("spec serialises");
        if let Some(l) = &lora {
            v["lora"] = serde_json::to_value(l).expect("report serialises");
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&v).expect("JSON serialises")
        );
    } else {
        print!("{report}");
        if let Some(l) = &lora {
            print!("{l}");
        }
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
    if c.batch_size == 0 {
        return Err(Error::Config("--batch-size must be at least 1".into()));
    }
    let dev = crate::device::open(&c.device)?;
    let dir = crate::hub::resolve(&c.model_dir)?;
    let model = load_model_or_adapter(&dir, &dev)?;
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
        // A chat model's end of turn (Llama 3's <|eot_id|>, Gemma's <end_of_turn>) beside EOS.
        eos_ids: generation_config_eos(&dir)?,
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
    let mut ids = Vec::with_capacity(rows.len());
    for row in &rows {
        ids.push(
            match (
                row.get("prompt").and_then(|p| p.as_str()),
                row.get("messages"),
            ) {
                (Some(p), _) => prompt_ids(&tok, p)?,
                (None, Some(m)) => chat_ids(
                    &tok,
                    m.as_array().expect("checked"),
                    &c.chat_template_kwargs,
                )?,
                (None, None) => unreachable!("rows are checked"),
            },
        );
    }
    // Checked here, with the row's number: the batches below number their prompts from 1.
    let limit = model.max_positions();
    if let Some((i, p)) = ids.iter().enumerate().find(|(_, p)| p.len() >= limit) {
        let row = match &c.input {
            Some(path) => format!("{} row {}", path.display(), i + 1),
            None => format!("--prompt {}", i + 1),
        };
        return Err(Error::Config(format!(
            "{row}: {} tokens leave no room to generate within the model's \
             max_position_embeddings = {limit}",
            p.len()
        )));
    }
    let mut completions = Vec::with_capacity(rows.len());
    for chunk in ids.chunks(c.batch_size) {
        completions.extend(generate_batch(&model, &tok, chunk.to_vec(), &opts)?);
    }
    let out: Vec<serde_json::Value> = (rows.into_iter().zip(completions))
        .map(|(mut row, completion)| {
            row["completion"] = completion.into();
            row
        })
        .collect();
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

/// The model in `dir`: a checkpoint, or a PEFT adapter directory on the base its
/// `adapter_config.json` names (`base_model_name_or_path`: a directory or a Hub id in the local
/// cache).
fn load_model_or_adapter(dir: &std::path::Path, dev: &candle_core::Device) -> Result<DecoderModel> {
    use crate::model::lora::{LoraConfig, ADAPTER_CONFIG_FILE};
    if !dir.join(ADAPTER_CONFIG_FILE).is_file() {
        return DecoderModel::from_pretrained(dir, dev);
    }
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(&path, format!("invalid JSON at line {}: {e}", e.line())))?;
    let base = v["base_model_name_or_path"].as_str().unwrap_or_default();
    if base.is_empty() {
        return Err(Error::model(
            &path,
            "no base_model_name_or_path: which model is this an adapter of?",
        ));
    }
    let base = crate::hub::resolve(std::path::Path::new(base))?;
    let setup = crate::model::LoraSetup {
        config: LoraConfig::from_peft_dir(dir)?,
        frozen_dtype: candle_core::DType::F32,
    };
    DecoderModel::from_pretrained_with_lora(&base, dev, &setup)
}
