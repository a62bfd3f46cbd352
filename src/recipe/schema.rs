//! Recipes: YAML files that say what to train on what, typed with serde, unknown keys
//! rejected, errors located by line and column; `key.path=value` overrides on the command line.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::collate::LossNormalization;
use crate::data::{DataLimits, DataSpec, Format, LossOn, TokenTemplate, Truncation};
use crate::error::{Error, Result};
use crate::train::{Schedule, TrainerConfig};

/// A whole recipe file: the model, the data, batching and masking, training settings and where
/// to write the results.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// `model:`: the checkpoint or inline config to start from, and the tokenizer.
    pub model: ModelSection,
    /// `data:`: the training and evaluation data and how rows become examples.
    pub data: DataSection,
    /// `collator:`: padding-free or padded batches, and TRL-style template masking.
    #[serde(default)]
    pub collator: CollatorSection,
    /// `train:`: optimizer, schedule, batching, evaluation, checkpoints and compute settings.
    #[serde(default)]
    pub train: TrainSection,
    /// `logging:`: where metrics go besides `metrics.jsonl`.
    #[serde(default)]
    pub logging: LoggingSection,
    /// `lora:`: LoRA adapters on a frozen base instead of full fine-tuning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lora: Option<super::LoraSection>,
    /// `dist:`: how the ranks of a multi-process run share the work.
    #[serde(default)]
    pub dist: super::DistSection,
    /// Where the trained model, tokenizer, metrics and checkpoints are written.
    pub output_dir: PathBuf,
    /// `latest` (the newest checkpoint in output_dir, or a fresh start if there is none) or
    /// the path of a checkpoint directory.
    #[serde(default)]
    pub resume_from: Option<String>,
}

/// `logging:`: TensorBoard event files (every `metrics.jsonl` field as a scalar, the resolved
/// recipe as text), and eval-time samples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggingSection {
    /// The directory of the event files; `output_dir/runs` when unset.
    #[serde(default)]
    pub tensorboard: Option<PathBuf>,
    /// At each evaluation, this many eval prompts (the first ones) continued greedily and logged
    /// with the eval metrics; 0: none.
    #[serde(default)]
    pub eval_samples: usize,
    /// New tokens at most per eval sample.
    #[serde(default = "default_sample_tokens")]
    pub eval_sample_tokens: usize,
}

fn default_sample_tokens() -> usize {
    64
}

impl Default for LoggingSection {
    fn default() -> Self {
        Self {
            tensorboard: None,
            eval_samples: 0,
            eval_sample_tokens: default_sample_tokens(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face checkpoint directory (config.json + safetensors).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// An inline config.json (any supported `model_type`, llama by default) for a freshly
    /// initialised model.
    #[serde(default)]
    pub config: Option<serde_json::Value>,
    /// tokenizer.json or a directory holding it; defaults to `path`.
    #[serde(default)]
    pub tokenizer: Option<PathBuf>,
}

fn default_max_length() -> usize {
    2048
}

fn default_max_dropped_fraction() -> Option<f64> {
    Some(0.5)
}

/// Where the training (and evaluation) data come from and how rows become examples.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    /// A JSONL, JSON or Parquet file, a directory of them, or a glob; or several such sources
    /// mixed by weight (`[{path: a.jsonl, weight: 0.7}, {path: b.jsonl, weight: 0.3}]`).
    pub train: TrainData,
    #[serde(default)]
    pub eval: Option<PathBuf>,
    /// The split a Hub dataset named without its files (`hf://datasets/org/name`) trains on;
    /// `train` when unset.
    #[serde(default)]
    pub split: Option<String>,
    /// The split such an eval dataset evaluates on; `validation`, else `test`, when unset.
    #[serde(default)]
    pub eval_split: Option<String>,
    /// The subset (configuration) of such datasets, where they have several.
    #[serde(default)]
    pub subset: Option<String>,
    /// Without `eval`: hold out this fraction of the training rows (a seeded draw) for evaluation.
    #[serde(default)]
    pub eval_ratio: f64,
    /// Seed of that draw (default: train.seed).
    #[serde(default)]
    pub split_seed: Option<u64>,
    /// `auto`, `text`, `prompt_completion`, `messages`, `sharegpt`, `alpaca`, `columns`, `tokens`.
    #[serde(default)]
    pub format: Format,
    /// A shipped template name, a `.jinja` file, or `tokenizer` (the model's chat_template).
    #[serde(default)]
    pub template: Option<String>,
    /// Extra variables of every template render, as `apply_chat_template(**kwargs)` passes
    /// them (TRL's `chat_template_kwargs`), e.g. `{enable_thinking: false}` for Qwen3.
    #[serde(default)]
    pub chat_template_kwargs: BTreeMap<String, serde_json::Value>,
    /// Canonical field → the column that holds it, e.g. `{prompt: question, completion: answer}`.
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Extra role names of messages / ShareGPT `from` → system, user, assistant or tool.
    #[serde(default)]
    pub roles: BTreeMap<String, String>,
    /// `completion`, `assistant`, `last_assistant` or `all` (default: per format).
    #[serde(default)]
    pub loss_on: Option<LossOn>,
    /// Strings that close an assistant turn, besides EOS and the usual ones.
    #[serde(default)]
    pub end_of_turn: Vec<String>,
    #[serde(default = "default_max_length")]
    pub max_length: usize,
    #[serde(default)]
    pub truncation: Truncation,
    /// Stop before training when more rows than this are dropped (null: never).
    #[serde(default = "default_max_dropped_fraction")]
    pub max_dropped_fraction: Option<f64>,
    #[serde(default)]
    pub max_truncated_fraction: Option<f64>,
    #[serde(default)]
    pub max_template_missing_fraction: Option<f64>,
    #[serde(default)]
    pub min_supervised_ratio: Option<f64>,
    /// Keep encoded datasets in the tokenization cache (`PACKSFT_CACHE`, else
    /// `~/.cache/packsft`) and read them back when nothing that decides them changed.
    #[serde(default = "yes")]
    pub cache: bool,
}

/// `data.train`: one source, or several interleaved by weight.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum TrainData {
    /// One file, directory or glob.
    Path(PathBuf),
    /// Sources drawn from in proportion to their weights (a seeded draw, `train.seed`), until
    /// the first one runs out: `datasets.interleave_datasets(..., probabilities,
    /// stopping_strategy="first_exhausted")`.
    Mix(Vec<MixSource>),
}

/// One source of a mix: where it is, its weight, and how its rows read where they differ from
/// the `data:` section's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MixSource {
    /// A file, directory or glob.
    pub path: PathBuf,
    /// Relative weight (> 0).
    #[serde(default = "one")]
    pub weight: f64,
    /// This source's row format (else `data.format`).
    #[serde(default)]
    pub format: Option<Format>,
    /// This source's template (else `data.template`).
    #[serde(default)]
    pub template: Option<String>,
    /// This source's field mapping (else `data.fields`).
    #[serde(default)]
    pub fields: Option<BTreeMap<String, String>>,
    /// What this source trains on (else `data.loss_on`).
    #[serde(default)]
    pub loss_on: Option<LossOn>,
}

fn one() -> f64 {
    1.0
}

impl DataSection {
    pub fn limits(&self) -> DataLimits {
        DataLimits {
            max_dropped_fraction: self.max_dropped_fraction,
            max_truncated_fraction: self.max_truncated_fraction,
            max_template_missing_fraction: self.max_template_missing_fraction,
            min_supervised_ratio: self.min_supervised_ratio,
        }
    }

    /// Whether the run has evaluation data (a file, or a held-out share of the training rows).
    pub fn has_eval(&self) -> bool {
        self.eval.is_some() || self.eval_ratio > 0.0
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CollatorSection {
    #[serde(default = "yes")]
    pub padding_free: bool,
    #[serde(default)]
    pub pad_to_multiple_of: Option<usize>,
    /// TRL-compatible masking: loss only after this template (text, or a list of token ids).
    #[serde(default)]
    pub response_template: Option<TokenTemplate>,
    /// With `response_template`: multi-turn masking from each instruction to the next response.
    #[serde(default)]
    pub instruction_template: Option<TokenTemplate>,
}

impl Default for CollatorSection {
    fn default() -> Self {
        Self {
            padding_free: true,
            pad_to_multiple_of: None,
            response_template: None,
            instruction_template: None,
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSection {
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Optimizer steps; 0 means `epochs` passes over the data.
    pub max_steps: usize,
    pub epochs: usize,
    pub lr: f64,
    pub lr_scheduler: Schedule,
    pub warmup_steps: usize,
    /// Warmup as a fraction of total steps (when warmup_steps is 0).
    pub warmup_ratio: f64,
    /// Floor of `cosine_with_min_lr` and `warmup_stable_decay`, as a fraction of `lr`.
    pub min_lr_ratio: f64,
    /// `warmup_stable_decay`: fraction of the steps spent decaying.
    pub decay_ratio: f64,
    /// `tokens` (mean over the step's target tokens) or `sequences` (mean of per-sequence means).
    pub loss_normalization: LossNormalization,
    /// Token budget per micro-batch instead of `batch_size` examples.
    pub max_tokens_per_batch: Option<usize>,
    pub group_by_length: bool,
    /// Global gradient-norm clip; 0 disables clipping.
    pub max_grad_norm: f64,
    pub weight_decay: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_epsilon: f64,
    pub seed: u64,
    pub shuffle: bool,
    /// Log a line every this many steps when no progress bar is shown.
    pub logging_steps: usize,
    /// Evaluate on `data.eval` every this many steps (0: only at the end).
    pub eval_steps: usize,
    /// Save a checkpoint every this many steps (0: only when stopped by a signal or callback).
    pub save_steps: usize,
    /// Keep only the newest N checkpoints.
    pub save_total_limit: Option<usize>,
    /// Stop when the eval loss has not improved for this many evaluations (0: off).
    pub early_stopping_patience: usize,
    /// Recompute each layer in the backward pass instead of keeping its activations.
    pub gradient_checkpointing: bool,
    /// Compute dtype: `f32`, or `bf16` / `f16` with float32 master weights.
    pub dtype: ComputeDtype,
    /// `auto` (flash attention where it can run), `eager` or `flash`.
    pub attention: crate::nn::attention::AttentionImpl,
    /// `cpu`, `cuda` or `cuda:N` (needs a build with `--features cuda`).
    pub device: String,
    /// Enqueue each step on the GPU before the previous one is reported (unset: on a GPU).
    pub overlap_steps: Option<bool>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ComputeDtype {
    #[default]
    F32,
    Bf16,
    F16,
}

impl ComputeDtype {
    pub fn dtype(self) -> candle_core::DType {
        match self {
            ComputeDtype::F32 => candle_core::DType::F32,
            ComputeDtype::Bf16 => candle_core::DType::BF16,
            ComputeDtype::F16 => candle_core::DType::F16,
        }
    }
}

impl Default for TrainSection {
    /// The library's training defaults ([`TrainerConfig::default`]), so a recipe key left out
    /// means what leaving the field out of a `TrainerConfig` means; the keys only a recipe has
    /// (device, dtype, attention, ...) default here.
    fn default() -> Self {
        let c = TrainerConfig::default();
        Self {
            batch_size: c.batch_size,
            grad_accum: c.grad_accum,
            max_steps: c.max_steps,
            epochs: c.epochs,
            lr: c.adamw.lr,
            lr_scheduler: c.schedule,
            warmup_steps: c.warmup_steps,
            warmup_ratio: c.warmup_ratio,
            min_lr_ratio: c.min_lr_ratio,
            decay_ratio: c.decay_ratio,
            loss_normalization: LossNormalization::Tokens,
            max_tokens_per_batch: c.max_tokens_per_batch,
            group_by_length: c.group_by_length,
            max_grad_norm: c.max_grad_norm,
            weight_decay: c.adamw.weight_decay,
            adam_beta1: c.adamw.beta1,
            adam_beta2: c.adamw.beta2,
            adam_epsilon: c.adamw.eps,
            seed: c.seed,
            shuffle: c.shuffle,
            logging_steps: c.logging_steps,
            eval_steps: c.eval_steps,
            save_steps: c.save_steps,
            save_total_limit: c.save_total_limit,
            early_stopping_patience: 0,
            gradient_checkpointing: false,
            dtype: ComputeDtype::F32,
            attention: crate::nn::attention::AttentionImpl::Auto,
            device: "cpu".into(),
            overlap_steps: c.overlap_steps,
        }
    }
}

fn recipe_err(path: &Path, e: &serde_yaml::Error, prefix: &str) -> Error {
    let loc = e.location();
    Error::Recipe {
        path: path.to_path_buf(),
        line: loc.as_ref().map(|l| l.line()),
        column: loc.as_ref().map(|l| l.column()),
        msg: format!("{prefix}{e}"),
    }
}

/// A YAML syntax error on a line `key: value` whose value holds `: ` or ends in `:` (TRL's
/// templates do: `### Answer:`) is an unquoted string, and says so instead of serde's message.
fn unquoted_colon(text: &str, path: &Path, e: &serde_yaml::Error) -> Option<Error> {
    let loc = e.location()?;
    let line = text.lines().nth(loc.line().checked_sub(1)?)?;
    let (key, value) = line.split_once(": ")?;
    let (key, value) = (key.trim().trim_start_matches("- "), value.trim());
    let quoted = value.starts_with('"') || value.starts_with('\'');
    if quoted || !(value.ends_with(':') || value.contains(": ")) {
        return None;
    }
    Some(Error::Recipe {
        path: path.to_path_buf(),
        line: Some(loc.line()),
        column: Some(loc.column()),
        msg: format!(
            "the value of `{key}` holds a colon: quote it, e.g. {key}: \"{}\"",
            value.replace('"', "\\\"")
        ),
    })
}

/// Template keys of `tree` that are present but null: in YAML an unquoted value starting with `#`
/// is a comment (`response_template: ### Answer:` is null), and a null template silently trains
/// on the default masking.
fn null_template_keys(tree: &serde_yaml::Value) -> Vec<&'static str> {
    let keys = [
        (
            "collator",
            "response_template",
            "collator.response_template",
        ),
        (
            "collator",
            "instruction_template",
            "collator.instruction_template",
        ),
        ("data", "template", "data.template"),
    ];
    keys.into_iter()
        .filter(|(section, key, _)| {
            tree.get(section)
                .and_then(|s| s.as_mapping())
                .and_then(|m| m.get(*key))
                .is_some_and(serde_yaml::Value::is_null)
        })
        .map(|(_, _, name)| name)
        .collect()
}

/// Applies one `a.b.c=value` override to a YAML tree; the value is parsed as YAML, so numbers
/// and booleans keep their type.
fn apply_override(root: &mut serde_yaml::Value, spec: &str) -> std::result::Result<(), String> {
    let (key, value) = spec
        .split_once('=')
        .ok_or_else(|| format!("override {spec:?} is not of the form key.path=value"))?;
    // A value starting with `#` would be a YAML comment (null): on the command line it is text.
    let value: serde_yaml::Value = if value.trim_start().starts_with('#') {
        serde_yaml::Value::String(value.to_string())
    } else {
        serde_yaml::from_str(value).map_err(|e| format!("override {spec:?}: bad value: {e}"))?
    };
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("override {spec:?}: empty key segment"));
    }
    let mut node = root;
    for (i, part) in parts.iter().enumerate() {
        if node.is_null() {
            *node = serde_yaml::Value::Mapping(Default::default());
        }
        let map = node.as_mapping_mut().ok_or_else(|| {
            format!(
                "override {spec:?}: `{}` is not a mapping",
                parts[..i].join(".")
            )
        })?;
        let k = serde_yaml::Value::String((*part).to_string());
        if i + 1 == parts.len() {
            map.insert(k, value);
            return Ok(());
        }
        node = map.entry(k).or_insert(serde_yaml::Value::Null);
    }
    unreachable!("the loop returns at the last segment")
}

impl Recipe {
    /// Reads a recipe file and applies `overrides` (`key.path=value`).
    /// Reads a recipe file, applies `overrides` (`key.path=value`), and resolves Hugging Face
    /// repo ids in `model.path` and `model.tokenizer` (`org/name`, `org/name@revision`; a path
    /// that exists is a path) to their snapshot in the local cache (`hub`).
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut r = Self::parse(&text, path, overrides)?;
        let recipe_err = |key: &str, e: Error| Error::Recipe {
            path: path.to_path_buf(),
            line: None,
            column: None,
            msg: format!("{key}: {e}"),
        };
        // A Hub dataset named without its files: the split (and subset) the recipe says.
        let subset = r.data.subset.clone();
        let train_split = [r.data.split.as_deref().unwrap_or("train")];
        let train = crate::hub::DataSplit {
            subset: subset.as_deref(),
            splits: &train_split,
        };
        let eval_splits: Vec<&str> = match r.data.eval_split.as_deref() {
            Some(s) => vec![s],
            None => vec!["validation", "test"],
        };
        let eval = crate::hub::DataSplit {
            subset: subset.as_deref(),
            splits: &eval_splits,
        };
        match &mut r.data.train {
            TrainData::Path(p) => {
                *p = crate::hub::resolve_data(p, train).map_err(|e| recipe_err("data.train", e))?
            }
            TrainData::Mix(sources) => {
                for s in sources.iter_mut() {
                    s.path = crate::hub::resolve_data(&s.path, train)
                        .map_err(|e| recipe_err("data.train", e))?;
                }
            }
        }
        if let Some(p) = r.data.eval.as_mut() {
            *p = crate::hub::resolve_data(p, eval).map_err(|e| recipe_err("data.eval", e))?;
        }
        // The tokenizer named by the model's own Hub id is the model's snapshot: asked once.
        let same_id = r.model.tokenizer.is_some() && r.model.tokenizer == r.model.path;
        for (key, p) in [
            ("model.path", &mut r.model.path),
            ("model.tokenizer", &mut r.model.tokenizer),
        ] {
            if key == "model.tokenizer" && same_id {
                continue;
            }
            if let Some(v) = p.as_mut() {
                *v = crate::hub::resolve(v).map_err(|e| Error::Recipe {
                    path: path.to_path_buf(),
                    line: None,
                    column: None,
                    msg: format!("{key}: {e}"),
                })?;
            }
        }
        if same_id {
            r.model.tokenizer = r.model.path.clone();
        }
        Ok(r)
    }

    /// Parses recipe text read from `path` (named in errors), applies `overrides` and checks
    /// the settings against each other.
    pub fn parse(text: &str, path: &Path, overrides: &[String]) -> Result<Self> {
        // The file alone first, so its errors carry line and column.
        let recipe: Recipe = serde_yaml::from_str(text).map_err(|e| {
            unquoted_colon(text, path, &e).unwrap_or_else(|| recipe_err(path, &e, ""))
        })?;
        if let Ok(tree) = serde_yaml::from_str::<serde_yaml::Value>(text) {
            for key in null_template_keys(&tree) {
                tracing::warn!(
                    recipe = %path.display(),
                    "{key} is null: an unquoted value starting with `#` is a YAML comment; quote it \
                     (e.g. \"### Answer:\") or remove the key"
                );
            }
        }
        let recipe = if overrides.is_empty() {
            recipe
        } else {
            let mut tree: serde_yaml::Value =
                serde_yaml::from_str(text).map_err(|e| recipe_err(path, &e, ""))?;
            for o in overrides {
                apply_override(&mut tree, o).map_err(|msg| Error::Recipe {
                    path: path.to_path_buf(),
                    line: None,
                    column: None,
                    msg,
                })?;
            }
            serde_yaml::from_value(tree).map_err(|e| {
                recipe_err(
                    path,
                    &e,
                    &format!("after overrides {}: ", overrides.join(" ")),
                )
            })?
        };
        recipe.validate(path)?;
        Ok(recipe)
    }

    /// The `train:` section's ranges and combinations (NaN fails every range).
    fn check_train(&self) -> std::result::Result<(), String> {
        let t = &self.train;
        if t.batch_size == 0 {
            return Err("train.batch_size must be at least 1".into());
        }
        if t.grad_accum == 0 {
            return Err("train.grad_accum must be at least 1".into());
        }
        if t.max_steps == 0 && t.epochs == 0 {
            return Err("train.max_steps and train.epochs are both 0: nothing to train".into());
        }
        if !(t.lr > 0.0 && t.lr.is_finite()) {
            return Err(format!("train.lr = {} must be a positive number", t.lr));
        }
        // Written so that NaN fails every check too.
        for (key, v) in [
            ("max_grad_norm", t.max_grad_norm),
            ("weight_decay", t.weight_decay),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("train.{key} = {v} must be a number >= 0"));
            }
        }
        if !(t.adam_epsilon > 0.0 && t.adam_epsilon.is_finite()) {
            // 0 divides 0 by 0 for every weight without a gradient: NaN weights at step 1.
            return Err(format!(
                "train.adam_epsilon = {} must be a positive number",
                t.adam_epsilon
            ));
        }
        if !(0.0..1.0).contains(&t.adam_beta1) || !(0.0..1.0).contains(&t.adam_beta2) {
            return Err("train.adam_beta1 and train.adam_beta2 must be in [0, 1)".into());
        }
        if !(0.0..1.0).contains(&t.warmup_ratio) {
            return Err(format!(
                "train.warmup_ratio = {} must be in [0, 1)",
                t.warmup_ratio
            ));
        }
        if t.warmup_ratio > 0.0 && t.warmup_steps > 0 {
            return Err("set train.warmup_steps or train.warmup_ratio, not both".into());
        }
        if !(0.0..=1.0).contains(&t.min_lr_ratio) || !(0.0..=1.0).contains(&t.decay_ratio) {
            return Err("train.min_lr_ratio and train.decay_ratio must be in [0, 1]".into());
        }
        if crate::device::parse(&t.device).is_err() {
            return Err(format!(
                "train.device = {:?}: expected cpu, cuda or cuda:N",
                t.device
            ));
        }
        if t.max_tokens_per_batch == Some(0) {
            return Err("train.max_tokens_per_batch must be at least 1".into());
        }
        if t.save_total_limit == Some(0) {
            return Err("train.save_total_limit must be at least 1 (or unset)".into());
        }
        if t.early_stopping_patience > 0 && !self.data.has_eval() {
            return Err(
                "train.early_stopping_patience needs data.eval (or data.eval_ratio)".into(),
            );
        }
        if t.eval_steps > 0 && !self.data.has_eval() {
            return Err(format!(
                "train.eval_steps = {} but data.eval (or data.eval_ratio) is not set",
                t.eval_steps
            ));
        }
        Ok(())
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |msg: String| {
            Err(Error::Recipe {
                path: path.to_path_buf(),
                line: None,
                column: None,
                msg,
            })
        };
        match (&self.model.path, &self.model.config) {
            (Some(_), Some(_)) => {
                return bad("set one of model.path and model.config, not both".into())
            }
            (None, None) => {
                return bad(
                    "set model.path (a checkpoint directory) or model.config (fresh init)".into(),
                )
            }
            (None, Some(_)) if self.model.tokenizer.is_none() => {
                return bad(
                    "model.config needs model.tokenizer (a tokenizer.json or its directory)".into(),
                )
            }
            _ => {}
        }
        self.check_train().or_else(bad)?;
        let d = &self.data;
        if !(0.0..1.0).contains(&d.eval_ratio) {
            return bad(format!(
                "data.eval_ratio = {} must be in [0, 1)",
                d.eval_ratio
            ));
        }
        if d.eval_ratio > 0.0 && d.eval.is_some() {
            return bad("set data.eval or data.eval_ratio, not both".into());
        }
        if let TrainData::Mix(sources) = &d.train {
            if sources.is_empty() {
                return bad("data.train is an empty list of sources".into());
            }
            if d.eval_ratio > 0.0 {
                return bad(
                    "data.eval_ratio splits one source: with a mix of sources set data.eval".into(),
                );
            }
            if let Some((i, s)) = sources
                .iter()
                .enumerate()
                .find(|(_, s)| !(s.weight > 0.0 && s.weight.is_finite()))
            {
                return bad(format!(
                    "data.train[{i}] ({}): weight {} must be a positive number",
                    s.path.display(),
                    s.weight
                ));
            }
        }
        for (key, v) in [
            ("max_dropped_fraction", d.max_dropped_fraction),
            ("max_truncated_fraction", d.max_truncated_fraction),
            (
                "max_template_missing_fraction",
                d.max_template_missing_fraction,
            ),
            ("min_supervised_ratio", d.min_supervised_ratio),
        ] {
            if let Some(v) = v {
                if !(0.0..=1.0).contains(&v) {
                    return bad(format!("data.{key} = {v} must be in [0, 1]"));
                }
            }
        }
        if self.collator.instruction_template.is_some() && self.collator.response_template.is_none()
        {
            return bad("collator.instruction_template needs collator.response_template".into());
        }
        if self.data.max_length < 2 {
            return bad(format!(
                "data.max_length = {} must be at least 2",
                self.data.max_length
            ));
        }
        if self.collator.pad_to_multiple_of == Some(0) {
            return bad("collator.pad_to_multiple_of must be at least 1".into());
        }
        if let Some(l) = &self.lora {
            if let Err(msg) = l.to_config(self.train.seed) {
                return bad(msg);
            }
            if l.merge && self.model.path.is_none() {
                return bad("lora.merge needs model.path: the base weights to merge into".into());
            }
        }
        Ok(())
    }

    /// What the data layer needs of the recipe: format, template, fields, masking.
    pub fn data_spec(&self) -> DataSpec {
        let d = &self.data;
        DataSpec {
            format: d.format,
            template: d.template.clone(),
            fields: d.fields.clone(),
            roles: d.roles.clone(),
            loss_on: d.loss_on,
            response_template: self.collator.response_template.clone(),
            instruction_template: self.collator.instruction_template.clone(),
            end_of_turn: d.end_of_turn.clone(),
            chat_template_kwargs: d.chat_template_kwargs.clone(),
        }
    }

    /// The recipe as YAML, defaults filled in (what a run saves as `recipe.yaml`).
    pub fn to_yaml(&self) -> String {
        serde_yaml::to_string(self).expect("recipe serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "model: {path: m}\ndata: {train: t.jsonl}\noutput_dir: out\n";

    fn template_of(r: &Recipe) -> Option<TokenTemplate> {
        r.collator.response_template.clone()
    }

    #[test]
    fn an_override_value_starting_with_a_hash_is_that_text() {
        let o = vec!["collator.response_template=### Answer:".to_string()];
        let r = Recipe::parse(BASE, Path::new("r.yaml"), &o).unwrap();
        assert_eq!(
            template_of(&r),
            Some(TokenTemplate::Text("### Answer:".into()))
        );
        let o = vec!["data.template=#chatml".to_string()];
        let r = Recipe::parse(BASE, Path::new("r.yaml"), &o).unwrap();
        assert_eq!(r.data.template.as_deref(), Some("#chatml"));
    }

    #[test]
    fn template_keys_made_null_by_a_comment_are_found() {
        let text = format!("{BASE}collator:\n  response_template: ### Answer:\n");
        let tree: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(null_template_keys(&tree), ["collator.response_template"]);
        let quoted = format!("{BASE}collator:\n  response_template: \"### Answer:\"\n");
        let tree: serde_yaml::Value = serde_yaml::from_str(&quoted).unwrap();
        assert!(null_template_keys(&tree).is_empty());
        let r = Recipe::parse(&quoted, Path::new("r.yaml"), &[]).unwrap();
        assert_eq!(
            template_of(&r),
            Some(TokenTemplate::Text("### Answer:".into()))
        );
    }
}
