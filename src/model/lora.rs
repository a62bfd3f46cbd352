//! LoRA adapters as PEFT defines and writes them: the configuration (`LoraConfig`, PEFT's
//! `LoraConfig` fields), which modules a configuration targets, the two files of an adapter
//! directory (`adapter_config.json`, `adapter_model.safetensors`) and `merge` (the base weights
//! plus s·B·A, PEFT's `merge_and_unload`). The decoder computes with the adapters
//! (`decoder/parts.rs`, `Lin`); this file knows only names, files and arithmetic on tensors.
//!
//! Source: PEFT 0.13.2, `peft/tuners/lora/{config,layer,model}.py` and
//! `peft/utils/{constants,save_and_load}.py`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use serde_json::{json, Value};

use super::weights::{save_safetensors, CheckpointWeights, CONFIG_FILE, WEIGHTS_FILE};
use crate::error::{Error, Result};

/// PEFT's adapter configuration file.
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's adapter weights file.
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The prefix PEFT's `PeftModelForCausalLM` puts before a transformers module path.
pub const PEFT_PREFIX: &str = "base_model.model.";

/// Which linear modules get an adapter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Targets {
    /// PEFT's list for the family (`TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`); an
    /// error for families PEFT has none for.
    FamilyDefault,
    /// Every linear layer but the output projection (`lm_head`), MoE routers included; not
    /// DBRX's expert tensors, which are parameters, not linear layers (PEFT's rule).
    AllLinear,
    /// Modules whose path is a name or ends with `.` and a name (`q_proj` targets
    /// `model.layers.0.self_attn.q_proj`), PEFT's rule for a list.
    Names(Vec<String>),
}

/// How new adapters start (PEFT's `init_lora_weights`); B starts at zero either way, so a new
/// adapter leaves the model's outputs unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoraInit {
    /// A from Kaiming-uniform with a = √5 (uniform in ±1/√in), as PEFT's default.
    Default,
    /// A from normal(0, 1/r), PEFT's `gaussian`.
    Gaussian,
}

/// A LoRA configuration: PEFT's `LoraConfig` fields packsft computes.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// The rank of every adapter.
    pub r: usize,
    /// `lora_alpha`: the adapter's output is scaled by alpha / r (alpha / √r with rsLoRA).
    pub alpha: f64,
    /// Dropout probability on the adapter's input, while training only.
    pub dropout: f64,
    /// Which linear modules get adapters.
    pub targets: Targets,
    /// Scale by alpha / √r instead of alpha / r (rank-stabilised LoRA).
    pub use_rslora: bool,
    /// Modules trained in full and saved with the adapter (`embed_tokens`, `lm_head`, ...).
    pub modules_to_save: Vec<String>,
    /// How new adapters start.
    pub init: LoraInit,
    /// Seed of the adapters' initialisation and of their dropout masks.
    pub seed: u64,
    /// A PEFT adapter directory to start from (continue training, or evaluate).
    pub adapter: Option<PathBuf>,
}

impl Default for LoraConfig {
    /// PEFT's defaults: r 8, alpha 8, no dropout, the family's default targets.
    fn default() -> Self {
        Self {
            r: 8,
            alpha: 8.0,
            dropout: 0.0,
            targets: Targets::FamilyDefault,
            use_rslora: false,
            modules_to_save: Vec::new(),
            init: LoraInit::Default,
            seed: 0,
            adapter: None,
        }
    }
}

impl LoraConfig {
    /// The factor on B·A: alpha / r, or alpha / √r with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Checks every value's range, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, msg: String| Err(Error::Config(format!("lora.{field}: {msg}")));
        if self.r == 0 {
            return bad("r", "must be at least 1".into());
        }
        if !self.alpha.is_finite() || self.alpha <= 0.0 {
            return bad("alpha", format!("{} is not a positive number", self.alpha));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return bad("dropout", format!("{} is not in [0, 1)", self.dropout));
        }
        if let Targets::Names(v) = &self.targets {
            if v.is_empty() {
                return bad("target_modules", "is an empty list".into());
            }
        }
        Ok(())
    }

    /// The configuration of a PEFT adapter directory (`adapter_config.json`), `adapter` set to
    /// `dir`. Options packsft does not compute (DoRA, biases, rank or alpha patterns, layer
    /// subsets, ...) are errors naming the key, not silently different adapters.
    pub fn from_peft_dir(dir: &Path) -> Result<Self> {
        let path = dir.join(ADAPTER_CONFIG_FILE);
        if !path.is_file() {
            return Err(Error::model(
                dir,
                format!("no {ADAPTER_CONFIG_FILE}: not a PEFT adapter directory"),
            ));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        let v: Value = serde_json::from_str(&text)
            .map_err(|e| Error::model(&path, format!("invalid JSON at line {}: {e}", e.line())))?;
        let err = |msg: String| Error::model(&path, msg);
        let peft_type = v.get("peft_type").and_then(Value::as_str).unwrap_or("");
        if peft_type != "LORA" {
            return Err(err(format!(
                "peft_type is {peft_type:?}; packsft reads LORA adapters only"
            )));
        }
        if let Some(t) = v.get("task_type").and_then(Value::as_str) {
            if t != "CAUSAL_LM" {
                return Err(err(format!(
                    "task_type is {t:?}; packsft trains causal language models (CAUSAL_LM)"
                )));
            }
        }
        let num = |k: &str| v.get(k).and_then(Value::as_f64);
        let r = v
            .get("r")
            .and_then(Value::as_u64)
            .ok_or_else(|| err("missing integer `r`".into()))? as usize;
        let alpha = num("lora_alpha").ok_or_else(|| err("missing number `lora_alpha`".into()))?;
        // Keys whose non-default values change what the adapter computes.
        let unsupported: [(&str, Value); 8] = [
            ("use_dora", json!(false)),
            ("bias", json!("none")),
            ("fan_in_fan_out", json!(false)),
            ("rank_pattern", json!({})),
            ("alpha_pattern", json!({})),
            ("layers_to_transform", Value::Null),
            ("layer_replication", Value::Null),
            ("use_qalora", json!(false)),
        ];
        for (k, default) in unsupported {
            if let Some(x) = v.get(k) {
                let is_default = x == &default || (default == json!({}) && x.is_null());
                if !is_default {
                    return Err(err(format!(
                        "`{k}: {x}` is not supported by packsft (only {default})"
                    )));
                }
            }
        }
        let targets = match v.get("target_modules") {
            Some(Value::Array(a)) => Targets::Names(
                a.iter()
                    .map(|x| {
                        x.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| err(format!("target_modules holds {x}, not a name")))
                    })
                    .collect::<Result<_>>()?,
            ),
            Some(Value::String(s)) if s == "all-linear" => Targets::AllLinear,
            Some(Value::String(s)) => {
                return Err(err(format!(
                    "target_modules is the regular expression {s:?}; packsft reads a list of module names"
                )))
            }
            _ => Targets::FamilyDefault,
        };
        let modules_to_save = match v.get("modules_to_save") {
            Some(Value::Array(a)) => a
                .iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect(),
            _ => Vec::new(),
        };
        let cfg = Self {
            r,
            alpha,
            dropout: num("lora_dropout").unwrap_or(0.0),
            targets,
            use_rslora: v
                .get("use_rslora")
                .and_then(Value::as_bool)
                .unwrap_or(false),
            modules_to_save,
            init: LoraInit::Default,
            seed: 0,
            adapter: Some(dir.to_path_buf()),
        };
        cfg.validate().map_err(|e| err(e.to_string()))?;
        Ok(cfg)
    }

    /// PEFT's `adapter_config.json` for this configuration: `target_modules` the distinct
    /// module names that got adapters (what PEFT writes after resolving `all-linear` or its
    /// family default), keys sorted, 2-space indent.
    pub fn adapter_config_json(&self, targeted: &[String], base_model: &str) -> String {
        let mut names: Vec<&str> = targeted.iter().map(|m| leaf(m)).collect();
        names.sort_unstable();
        names.dedup();
        let modules_to_save = if self.modules_to_save.is_empty() {
            Value::Null
        } else {
            json!(self.modules_to_save)
        };
        let cfg: BTreeMap<&str, Value> = [
            ("alpha_pattern", json!({})),
            ("auto_mapping", Value::Null),
            ("base_model_name_or_path", json!(base_model)),
            ("bias", json!("none")),
            ("fan_in_fan_out", json!(false)),
            ("inference_mode", json!(true)),
            (
                "init_lora_weights",
                match self.init {
                    LoraInit::Default => json!(true),
                    LoraInit::Gaussian => json!("gaussian"),
                },
            ),
            ("layer_replication", Value::Null),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", Value::Null),
            ("loftq_config", json!({})),
            ("lora_alpha", json_number(self.alpha)),
            ("lora_dropout", json!(self.dropout)),
            ("megatron_config", Value::Null),
            ("megatron_core", json!("megatron.core")),
            ("modules_to_save", modules_to_save),
            ("peft_type", json!("LORA")),
            ("r", json!(self.r)),
            ("rank_pattern", json!({})),
            ("revision", Value::Null),
            ("target_modules", json!(names)),
            ("task_type", json!("CAUSAL_LM")),
            ("use_dora", json!(false)),
            ("use_rslora", json!(self.use_rslora)),
        ]
        .into_iter()
        .collect();
        serde_json::to_string_pretty(&cfg).expect("JSON serialises")
    }
}

/// An integral alpha as an integer (PEFT's field is an int), else a float.
fn json_number(x: f64) -> Value {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        json!(x as i64)
    } else {
        json!(x)
    }
}

/// PEFT 0.13.2's default target modules of a family (`peft/utils/constants.py`,
/// `TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING`); `None` where PEFT has none.
pub fn peft_default_targets(model_type: &str) -> Option<&'static [&'static str]> {
    Some(match model_type {
        "llama" | "mistral" | "mixtral" | "gemma" | "gemma2" | "qwen2" | "stablelm" => {
            &["q_proj", "v_proj"]
        }
        "falcon" => &["query_key_value"],
        "phi" => &["q_proj", "v_proj", "fc1", "fc2"],
        _ => return None,
    })
}

/// The module paths `cfg` adapts, in model order, among `linear` (every linear module but the
/// output projection, `ModelNames::linear_modules`) and the output projection `lm_head` (`None`
/// where it is tied to the embedding, which PEFT leaves alone). Errors name the key: a family
/// without a PEFT default, a name that matches no linear module.
pub fn resolve_targets(
    cfg: &LoraConfig,
    model_type: &str,
    linear: &[String],
    lm_head: Option<&str>,
) -> Result<Vec<String>> {
    let mut leaves: Vec<&str> = linear.iter().map(|m| leaf(m)).collect();
    leaves.sort_unstable();
    leaves.dedup();
    let leaves = leaves.join(", ");
    let names: Vec<String> = match &cfg.targets {
        Targets::AllLinear => return Ok(linear.to_vec()),
        Targets::Names(v) => v.clone(),
        Targets::FamilyDefault => match peft_default_targets(model_type) {
            Some(d) => d.iter().map(|s| s.to_string()).collect(),
            None => {
                return Err(Error::Config(format!(
                "lora.target_modules: PEFT has no default list for {model_type}; name the modules \
                     to adapt (its linear modules: {leaves}, and lm_head) or give all-linear"
            )))
            }
        },
    };
    let candidates: Vec<&str> = linear.iter().map(String::as_str).chain(lm_head).collect();
    for n in &names {
        if !candidates
            .iter()
            .any(|m| module_matches(m, std::slice::from_ref(n)))
        {
            let experts = if model_type == "dbrx" && matches!(n.as_str(), "w1" | "v1" | "w2") {
                " (DBRX's experts are parameters, not linear layers: PEFT does not adapt them either)"
            } else {
                ""
            };
            return Err(Error::Config(format!(
                "lora.target_modules: `{n}` matches no linear module of this {model_type} model{experts}; \
                 its linear modules: {leaves}"
            )));
        }
    }
    Ok(candidates
        .into_iter()
        .filter(|m| module_matches(m, &names))
        .map(str::to_owned)
        .collect())
}

/// The last component of a module path (`q_proj` of `model.layers.0.self_attn.q_proj`).
pub fn leaf(module: &str) -> &str {
    module.rsplit('.').next().unwrap_or(module)
}

/// PEFT's rule for a list of names: the module path is a name, or ends with `.` and a name.
pub fn module_matches(module: &str, names: &[String]) -> bool {
    names
        .iter()
        .any(|n| module == n || module.ends_with(&format!(".{n}")))
}

/// The adapter file's keys of a module's A and B.
pub fn adapter_keys(module: &str) -> (String, String) {
    (
        format!("{PEFT_PREFIX}{module}.lora_A.weight"),
        format!("{PEFT_PREFIX}{module}.lora_B.weight"),
    )
}

/// The adapter file's key of a fully trained tensor (`modules_to_save`).
pub fn saved_key(hf_name: &str) -> String {
    format!("{PEFT_PREFIX}{hf_name}")
}

/// What `merge` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeReport {
    /// Weight matrices that received s·B·A.
    pub merged: usize,
    /// Tensors replaced by the adapter's fully trained copy (`modules_to_save`).
    pub replaced: usize,
    /// Tensors written in all.
    pub tensors: usize,
}

/// Files besides the weights that a merged checkpoint needs to load and tokenize, taken from
/// the adapter directory where present (it was saved with the run's tokenizer), else the base.
const SIDE_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
];

/// Writes `base_dir`'s checkpoint with the adapter of `adapter_dir` merged in (W + s·B·A for
/// every adapted matrix, computed in float32; `modules_to_save` tensors replaced) into
/// `out_dir` as a complete Hugging Face checkpoint in `dtype`: PEFT's `merge_and_unload()`
/// followed by `save_pretrained`. Every tensor of the adapter must be used.
pub fn merge(
    base_dir: &Path,
    adapter_dir: &Path,
    out_dir: &Path,
    dtype: DType,
) -> Result<MergeReport> {
    if !matches!(dtype, DType::F32 | DType::BF16 | DType::F16) {
        return Err(Error::Config(format!(
            "merge writes float32, bfloat16 or float16, not {dtype:?}"
        )));
    }
    let cfg = LoraConfig::from_peft_dir(adapter_dir)?;
    let s = cfg.scaling();
    let cpu = Device::Cpu;
    let mut base = CheckpointWeights::open(base_dir)?;
    let mut adapter = CheckpointWeights::open_file(&adapter_dir.join(ADAPTER_WEIGHTS_FILE))?;
    let names: Vec<String> = base.names().to_vec();
    let mut out = BTreeMap::new();
    let (mut merged, mut replaced) = (0, 0);
    for name in &names {
        let shape = base.shapes_of(name)?;
        let mut t = base.get(name, &shape, DType::F32, &cpu)?;
        let saved = saved_key(name);
        if adapter.contains(&saved) {
            t = adapter.get(&saved, &shape, DType::F32, &cpu)?;
            replaced += 1;
        }
        if let Some(module) = name.strip_suffix(".weight") {
            let (ka, kb) = adapter_keys(module);
            if adapter.contains(&ka) || adapter.contains(&kb) {
                if shape.len() != 2 {
                    return Err(Error::model(
                        adapter_dir,
                        format!("adapter for `{module}`, whose weight {shape:?} is not a matrix"),
                    ));
                }
                let a = adapter.get(&ka, &[cfg.r, shape[1]], DType::F32, &cpu)?;
                let b = adapter.get(&kb, &[shape[0], cfg.r], DType::F32, &cpu)?;
                t = (t + (b.matmul(&a)? * s)?)?;
                merged += 1;
            }
        }
        out.insert(name.clone(), t.to_dtype(dtype)?);
    }
    if let Some(extra) = adapter.unused().first() {
        return Err(Error::model(
            adapter_dir.join(ADAPTER_WEIGHTS_FILE),
            format!(
                "tensor `{extra}` matches no weight of the base model {}",
                base_dir.display()
            ),
        ));
    }
    std::fs::create_dir_all(out_dir).map_err(|e| Error::io(out_dir, e))?;
    let cfg_path = base_dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let mut config: Value = serde_json::from_str(&text)
        .map_err(|e| Error::model(&cfg_path, format!("invalid JSON at line {}: {e}", e.line())))?;
    config["torch_dtype"] = json!(match dtype {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    });
    crate::io::write_atomic(
        &out_dir.join(CONFIG_FILE),
        serde_json::to_string_pretty(&config)
            .expect("JSON serialises")
            .as_bytes(),
    )?;
    save_safetensors(&out, &out_dir.join(WEIGHTS_FILE))?;
    for f in SIDE_FILES {
        let src = [adapter_dir, base_dir]
            .iter()
            .map(|d| d.join(f))
            .find(|p| p.is_file());
        if let Some(src) = src {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            crate::io::write_atomic(&out_dir.join(f), &bytes)?;
        }
    }
    Ok(MergeReport {
        merged,
        replaced,
        tensors: out.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_matches_a_name_or_a_dotted_suffix_only() {
        let names = vec!["q_proj".to_string(), "mlp.fc1".to_string()];
        assert!(module_matches("model.layers.0.self_attn.q_proj", &names));
        assert!(module_matches("q_proj", &names));
        assert!(module_matches("model.layers.3.mlp.fc1", &names));
        assert!(!module_matches("model.layers.0.self_attn.qq_proj", &names));
        assert!(!module_matches("model.layers.0.self_attn.q_proj_x", &names));
        assert!(!module_matches("model.layers.0.fc1", &names));
    }

    #[test]
    fn scaling_is_alpha_over_r_or_over_its_root_with_rslora() {
        let mut c = LoraConfig {
            r: 16,
            alpha: 32.0,
            ..Default::default()
        };
        assert_eq!(c.scaling(), 2.0);
        c.use_rslora = true;
        assert_eq!(c.scaling(), 8.0);
    }

    #[test]
    fn ranges_are_checked_naming_the_field() {
        let bad = |c: LoraConfig| c.validate().unwrap_err().to_string();
        assert!(bad(LoraConfig {
            r: 0,
            ..Default::default()
        })
        .contains("lora.r"));
        assert!(bad(LoraConfig {
            dropout: 1.0,
            ..Default::default()
        })
        .contains("lora.dropout"));
        assert!(bad(LoraConfig {
            alpha: -1.0,
            ..Default::default()
        })
        .contains("lora.alpha"));
        assert!(bad(LoraConfig {
            targets: Targets::Names(vec![]),
            ..Default::default()
        })
        .contains("lora.target_modules"));
    }

    #[test]
    fn adapter_config_round_trips_and_refuses_what_it_does_not_compute() {
        let dir = tempfile::tempdir().unwrap();
        let c = LoraConfig {
            r: 4,
            alpha: 8.0,
            dropout: 0.05,
            targets: Targets::AllLinear,
            use_rslora: true,
            modules_to_save: vec!["lm_head".into()],
            ..Default::default()
        };
        let targeted = vec![
            "model.layers.0.self_attn.q_proj".to_string(),
            "model.layers.1.self_attn.q_proj".to_string(),
            "model.layers.0.mlp.down_proj".to_string(),
        ];
        let text = c.adapter_config_json(&targeted, "base");
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["target_modules"], json!(["down_proj", "q_proj"]));
        assert_eq!(v["lora_alpha"], json!(8));
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), &text).unwrap();
        let back = LoraConfig::from_peft_dir(dir.path()).unwrap();
        assert_eq!(back.r, 4);
        assert_eq!(back.scaling(), c.scaling());
        assert_eq!(
            back.targets,
            Targets::Names(vec!["down_proj".into(), "q_proj".into()])
        );
        assert_eq!(back.modules_to_save, c.modules_to_save);
        let mut v2 = v.clone();
        v2["use_dora"] = json!(true);
        std::fs::write(dir.path().join(ADAPTER_CONFIG_FILE), v2.to_string()).unwrap();
        let e = LoraConfig::from_peft_dir(dir.path())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("use_dora") && e.contains(ADAPTER_CONFIG_FILE),
            "{e}"
        );
    }
}
