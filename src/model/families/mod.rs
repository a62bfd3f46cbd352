#![doc = include_str!("README.md")]

use serde_json::Value;

use super::spec::*;
use crate::error::{Error, Result};

mod common;
mod dbrx;
mod falcon;
mod gemma;
mod llama;
mod olmo;
mod phi;
mod qwen2;
mod qwen3;
mod stablelm;
mod starcoder2;

use common::Cfg;
use dbrx::dbrx;
use falcon::falcon;
use gemma::{gemma, gemma2, gemma3_text};
use llama::{granitemoe, llama_like, mistral, mixtral};
use olmo::{olmo, olmo2};
use phi::{phi, phi3};
use qwen2::{qwen2, qwen2_moe};
use qwen3::{qwen3, qwen3_moe};
use stablelm::stablelm;
use starcoder2::starcoder2;

/// The config.json `model_type` values that `from_config` accepts.
pub const SUPPORTED: &[&str] = &[
    "llama",
    "mistral",
    "mixtral",
    "granite",
    "granitemoe",
    "dbrx",
    "falcon",
    "gemma",
    "gemma2",
    "gemma3_text",
    "olmo",
    "olmo2",
    "phi",
    "phi3",
    "qwen2",
    "qwen2_moe",
    "qwen3",
    "qwen3_moe",
    "stablelm",
    "starcoder2",
];

/// The spec and parameter names of a config.json, dispatched on `model_type`.
pub fn from_config(config: &Value) -> Result<(ArchSpec, ModelNames)> {
    from_config_tracked(config).map(|(s, n, _)| (s, n))
}

/// `from_config`, plus the top-level keys the family reads (for rejecting typos in configs
/// written by hand, such as a recipe's inline `model.config`).
pub fn from_config_tracked(
    config: &Value,
) -> Result<(ArchSpec, ModelNames, std::collections::BTreeSet<String>)> {
    let read = std::cell::RefCell::new(std::collections::BTreeSet::new());
    let Some(mt) = config.get("model_type").and_then(Value::as_str) else {
        return Err(Error::Config(format!(
            "config.json has no `model_type` (a string, one of: {})",
            SUPPORTED.join(", ")
        )));
    };
    let c = Cfg::new(config, mt, &read);
    let (spec, names) = match mt {
        "llama" | "granite" => llama_like(&c, mt)?,
        "mistral" => mistral(&c)?,
        "mixtral" => mixtral(&c)?,
        "granitemoe" => granitemoe(&c)?,
        "dbrx" => dbrx(&c)?,
        "falcon" => falcon(&c)?,
        "gemma" => gemma(&c)?,
        "gemma2" => gemma2(&c)?,
        "gemma3_text" => gemma3_text(&c)?,
        "olmo" => olmo(&c)?,
        "olmo2" => olmo2(&c)?,
        "phi" => phi(&c)?,
        "phi3" => phi3(&c)?,
        "qwen2" => qwen2(&c)?,
        "qwen2_moe" => qwen2_moe(&c)?,
        "qwen3" => qwen3(&c)?,
        "qwen3_moe" => qwen3_moe(&c)?,
        "stablelm" => stablelm(&c)?,
        "starcoder2" => starcoder2(&c)?,
        other => {
            return Err(Error::Config(format!(
                "config.json: model_type {other:?} is not supported (supported: {})",
                SUPPORTED.join(", ")
            )))
        }
    };
    if spec.hidden == 0 || spec.layers == 0 || spec.vocab == 0 {
        return Err(c.err("vocab_size, hidden size and layer count must be positive"));
    }
    for k in [
        "model_type",
        "architectures",
        "pad_token_id",
        "initializer_range",
        "bos_token_id",
        "eos_token_id",
        "torch_dtype",
        "transformers_version",
        "use_cache",
    ] {
        read.borrow_mut().insert(k.into());
    }
    let keys = read.into_inner();
    Ok((spec, names, keys))
}

/// The `architectures` entry transformers expects for a family.
pub fn architecture(model_type: &str) -> &'static str {
    match model_type {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "mixtral" => "MixtralForCausalLM",
        "granite" => "GraniteForCausalLM",
        "granitemoe" => "GraniteMoeForCausalLM",
        "dbrx" => "DbrxForCausalLM",
        "falcon" => "FalconForCausalLM",
        "gemma" => "GemmaForCausalLM",
        "gemma2" => "Gemma2ForCausalLM",
        "gemma3_text" => "Gemma3ForCausalLM",
        "olmo" => "OlmoForCausalLM",
        "olmo2" => "Olmo2ForCausalLM",
        "phi" => "PhiForCausalLM",
        "phi3" => "Phi3ForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        "qwen2_moe" => "Qwen2MoeForCausalLM",
        "qwen3" => "Qwen3ForCausalLM",
        "qwen3_moe" => "Qwen3MoeForCausalLM",
        "stablelm" => "StableLmForCausalLM",
        "starcoder2" => "Starcoder2ForCausalLM",
        _ => "",
    }
}
