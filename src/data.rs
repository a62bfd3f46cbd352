//! Dataset rows to token-level examples.
//!
//! Rows come from JSONL, JSON arrays or Parquet files (`source`), in one of the formats of
//! [`Format`] (detected from the first row by default). Text rows are rendered (a prompt template's
//! blocks, a chat template, or plain concatenation), tokenized once, and masked: by default each
//! trained part is a byte range of the rendered text mapped to tokens through the tokenizer's
//! offsets; with a response template, TRL's token-id search (`masking`). EOS ends every
//! completion and final assistant turn as a target. Then the length policy, and rows left without
//! a target are dropped and counted in the [`DataReport`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use minijinja::value::{Value, ValueKind};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::masking::{mask_from_spans, response_template_mask, TemplateSearch};
pub use crate::source::Loc;
use crate::source::{RawRow, SourceFiles};
use crate::template::{Template, TemplateKind};
use crate::tokenizer::TextTokenizer;

/// One training example: token ids and, per token, whether it is a target of the loss.
/// `loss_mask[0]` is never used: the first token of an example has nothing to be predicted from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input_ids: Vec<u32>,
    pub loss_mask: Vec<bool>,
}

impl Example {
    pub fn new(input_ids: Vec<u32>, loss_mask: Vec<bool>) -> Self {
        assert_eq!(input_ids.len(), loss_mask.len(), "one mask entry per token");
        Self {
            input_ids,
            loss_mask,
        }
    }
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.input_ids.is_empty()
    }
    /// Tokens that carry loss once the first token (never a target) is left out.
    pub fn n_targets(&self) -> usize {
        self.loss_mask.iter().skip(1).filter(|&&m| m).count()
    }
}

/// What to do with an example longer than `max_length`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Truncation {
    /// Keep the first `max_length` tokens (the end of the completion is lost).
    #[default]
    #[serde(alias = "truncate")]
    KeepStart,
    /// Keep the last `max_length` tokens (the start of the prompt is lost).
    KeepEnd,
    /// Leave the example out, and count it in the report.
    Drop,
    /// Stop with an error that names the file and line.
    Error,
}

#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub max_length: usize,
    pub truncation: Truncation,
    /// Token ids must be below this (the model's vocabulary size).
    pub vocab_size: usize,
}

/// How the rows of a dataset are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Format {
    /// Decided from the first row's fields (after `data.fields` renaming).
    #[default]
    Auto,
    /// `{"text": ...}`: language modelling (loss on every token unless a response template
    /// says otherwise).
    Text,
    /// `{"prompt": ..., "completion": ...}`.
    #[serde(alias = "completion")]
    PromptCompletion,
    /// `{"messages": [{"role": ..., "content": ...}, ...]}` with system, user, assistant and
    /// tool roles.
    #[serde(alias = "chat")]
    Messages,
    /// ShareGPT: `{"conversations": [{"from": "human", "value": ...}, ...]}`.
    #[serde(alias = "conversations")]
    Sharegpt,
    /// Alpaca: `instruction`, optional `input`, `output`, through a prompt template (`alpaca`
    /// unless `data.template` names another).
    Alpaca,
    /// Any named columns through a prompt template (its variables are the row's columns).
    Columns,
    /// Pre-tokenized: `input_ids` with an optional `completion_mask` (1 = loss), `labels` (-100
    /// = no loss) or `assistant_masks`.
    #[serde(alias = "pretokenized", alias = "tokenized")]
    Tokens,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Auto => "auto",
            Format::Text => "text",
            Format::PromptCompletion => "prompt_completion",
            Format::Messages => "messages",
            Format::Sharegpt => "sharegpt",
            Format::Alpaca => "alpaca",
            Format::Columns => "columns",
            Format::Tokens => "tokens",
        }
    }
}

/// Which tokens carry loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    /// The completion (prompt/completion, Alpaca, columns; pre-tokenized rows: their mask).
    Completion,
    /// Every assistant turn of a conversation.
    Assistant,
    /// The last assistant turn only.
    LastAssistant,
    /// Every token.
    All,
}

impl LossOn {
    pub fn name(self) -> &'static str {
        match self {
            LossOn::Completion => "completion",
            LossOn::Assistant => "assistant",
            LossOn::LastAssistant => "last_assistant",
            LossOn::All => "all",
        }
    }
}

/// A response or instruction template of the TRL-compatible method: text (encoded alone,
/// without special tokens, as TRL does) or token ids.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenTemplate {
    Ids(Vec<u32>),
    Text(String),
}

/// What a recipe says about turning rows into examples.
#[derive(Debug, Clone, Default)]
pub struct DataSpec {
    pub format: Format,
    /// A shipped template name, a `.jinja` path, or `tokenizer`.
    pub template: Option<String>,
    /// Canonical field (`prompt`, `completion`, `messages`, `instruction`, `role`, ...) → the
    /// column or key that holds it.
    pub fields: BTreeMap<String, String>,
    /// Extra role names → `system`, `user`, `assistant` or `tool` (messages and ShareGPT).
    pub roles: BTreeMap<String, String>,
    pub loss_on: Option<LossOn>,
    /// Set: the TRL-compatible masking method instead of spans.
    pub response_template: Option<TokenTemplate>,
    pub instruction_template: Option<TokenTemplate>,
    /// Strings that end an assistant turn, besides EOS and the usual ones (`<|eot_id|>`, ...).
    pub end_of_turn: Vec<String>,
}

/// Thresholds on the dataset report that stop a run before training.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DataLimits {
    /// Most rows that may be dropped (too long, no target, template missing), as a fraction.
    pub max_dropped_fraction: Option<f64>,
    pub max_truncated_fraction: Option<f64>,
    /// Most rows whose response (or instruction) template is missing, as a fraction.
    pub max_template_missing_fraction: Option<f64>,
    /// Fewest target tokens per token.
    pub min_supervised_ratio: Option<f64>,
}

/// What loading a dataset did, for the log, `packsft inspect` and thresholds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataReport {
    pub format: String,
    pub template: Option<String>,
    /// `spans` or `response_template`.
    pub method: String,
    pub loss_on: String,
    pub rows: usize,
    pub examples: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    pub dropped_no_target: usize,
    /// Dropped because the response or instruction template was not found (TRL method).
    pub dropped_template_missing: usize,
    pub response_template_missing: usize,
    pub instruction_template_missing: usize,
    /// Examples that should end with an EOS target but do not: cut off by `keep_start`
    /// truncation, masked as the pad id (TRL method with pad == EOS), or no EOS token at all.
    pub eos_not_target: usize,
    pub eos_truncated: usize,
    pub eos_masked_as_pad: usize,
    pub tokens: usize,
    pub target_tokens: usize,
    /// The first few dropped rows, `file:line (reason)`, to look at.
    pub dropped_rows: Vec<String>,
}

impl DataReport {
    pub fn dropped(&self) -> usize {
        self.dropped_too_long + self.dropped_no_target + self.dropped_template_missing
    }

    /// Target tokens per token (first tokens of examples included in the count of tokens).
    pub fn supervised_ratio(&self) -> f64 {
        self.target_tokens as f64 / self.tokens.max(1) as f64
    }

    /// Stops with an error naming the dataset when a threshold is crossed.
    pub fn check(&self, limits: &DataLimits, path: &Path) -> Result<()> {
        let rows = self.rows.max(1) as f64;
        let over = |what: &str, n: usize, key: &str, max: Option<f64>| -> Result<()> {
            match max {
                Some(m) if n as f64 / rows > m => Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg: format!(
                        "{n} of {} rows {what} ({:.1}%), more than data.{key} = {m}",
                        self.rows,
                        100.0 * n as f64 / rows
                    ),
                }),
                _ => Ok(()),
            }
        };
        over(
            &format!(
                "dropped ({} too long, {} without a target token, {} template missing)",
                self.dropped_too_long, self.dropped_no_target, self.dropped_template_missing
            ),
            self.dropped(),
            "max_dropped_fraction",
            limits.max_dropped_fraction,
        )?;
        over(
            "truncated",
            self.truncated,
            "max_truncated_fraction",
            limits.max_truncated_fraction,
        )?;
        over(
            "without the response or instruction template",
            self.response_template_missing
                .max(self.instruction_template_missing),
            "max_template_missing_fraction",
            limits.max_template_missing_fraction,
        )?;
        if let Some(min) = limits.min_supervised_ratio {
            if self.supervised_ratio() < min {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg: format!(
                        "supervised-token ratio {:.4} ({} targets of {} tokens) is below data.min_supervised_ratio = {min}",
                        self.supervised_ratio(),
                        self.target_tokens,
                        self.tokens
                    ),
                });
            }
        }
        Ok(())
    }

    /// Logs the report, with a warning for each thing that was lost.
    pub fn log(&self, path: &Path) {
        tracing::info!(
            path = %path.display(),
            format = %self.format,
            template = %self.template.as_deref().unwrap_or("none"),
            method = %self.method,
            loss_on = %self.loss_on,
            rows = self.rows,
            examples = self.examples,
            truncated = self.truncated,
            dropped = self.dropped(),
            tokens = self.tokens,
            target_tokens = self.target_tokens,
            supervised_ratio = format!("{:.3}", self.supervised_ratio()),
            "dataset"
        );
        if self.dropped() > 0 {
            tracing::warn!(
                path = %path.display(),
                "{} of {} rows dropped: {} longer than max_length (data.truncation: drop), {} without any target token, {} without the response/instruction template; first: {}",
                self.dropped(),
                self.rows,
                self.dropped_too_long,
                self.dropped_no_target,
                self.dropped_template_missing,
                self.dropped_rows.join(", ")
            );
        }
        if self.truncated > 0 {
            tracing::warn!(path = %path.display(), "{} of {} examples truncated to max_length", self.truncated, self.rows);
        }
        if self.eos_not_target > 0 {
            tracing::warn!(
                path = %path.display(),
                "{} examples do not end with an EOS target: {} lost it to keep_start truncation, {} had it masked because pad == EOS under collator.response_template (as TRL does), {} for lack of an EOS token",
                self.eos_not_target,
                self.eos_truncated,
                self.eos_masked_as_pad,
                self.eos_not_target - self.eos_truncated - self.eos_masked_as_pad
            );
        }
    }
}

/// Token examples and where each came from.
pub struct Dataset {
    /// The data path as the recipe gave it (a file, directory or glob).
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// The row each example came from.
    pub origins: Vec<Loc>,
    pub report: DataReport,
}

fn kind_name(v: &Value) -> &'static str {
    match v.kind() {
        ValueKind::Undefined => "nothing",
        ValueKind::None => "null",
        ValueKind::Bool => "a boolean",
        ValueKind::Number => "a number",
        ValueKind::String => "a string",
        ValueKind::Bytes => "bytes",
        ValueKind::Seq => "an array",
        ValueKind::Map => "an object",
        _ => "a value",
    }
}

/// Assistant turns end at the first of these after their content (besides EOS).
const END_OF_TURN: &[&str] = &[
    "<|eot_id|>",
    "<|eom_id|>",
    "<|im_end|>",
    "<end_of_turn>",
    "<|end|>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
    "<|END_OF_TURN_TOKEN|>",
    "<|end_of_turn|>",
    "<｜end▁of▁sentence｜>",
];

const ROLES: &[&str] = &["system", "user", "assistant", "tool"];

fn sharegpt_role(from: &str) -> Option<&'static str> {
    Some(match from {
        "system" => "system",
        "human" | "user" => "user",
        "gpt" | "assistant" | "model" | "chatgpt" | "bard" | "bing" | "function_call" => {
            "assistant"
        }
        "tool" | "function_response" | "observation" | "ipython" => "tool",
        _ => return None,
    })
}

fn one_span(start: usize, end: usize) -> Vec<Range<usize>> {
    let r = start..end;
    vec![r]
}

/// Text with the byte ranges that carry loss.
struct Rendered {
    text: String,
    spans: Vec<Range<usize>>,
    /// The text ends with a trained part, so the example must end with an EOS target.
    ends_with_target: bool,
    /// Prepend BOS (when the tokenizer adds one): not for chat templates, which print it.
    add_bos: bool,
}

/// What one row became.
#[derive(Default)]
struct RowOut {
    example: Option<Example>,
    truncated: bool,
    too_long: bool,
    no_target: bool,
    template_missing: bool,
    search: TemplateSearch,
    eos_not_target: bool,
    eos_truncated: bool,
    eos_masked: bool,
    /// The rendered text of a row whose response template was not found (for the hint).
    miss_text: Option<String>,
}

/// The format, template and loss mode a dataset is read with, once detected.
struct Resolved {
    format: Format,
    template: Option<Arc<Template>>,
    loss_on: LossOn,
}

/// Rows to examples, as a `DataSpec` says.
pub struct Pipeline<'a> {
    tok: Option<&'a TextTokenizer>,
    spec: DataSpec,
    opts: LoadOptions,
    template: Option<Arc<Template>>,
    response_ids: Option<Vec<u32>>,
    instruction_ids: Option<Vec<u32>>,
    markers: Vec<String>,
    threads: usize,
}

fn cfg_err(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

impl<'a> Pipeline<'a> {
    pub fn new(tok: Option<&'a TextTokenizer>, spec: DataSpec, opts: LoadOptions) -> Result<Self> {
        let template = match &spec.template {
            Some(t) => Some(Arc::new(Template::load(t, tok)?)),
            None => None,
        };
        let ids = |t: &Option<TokenTemplate>, key: &str| -> Result<Option<Vec<u32>>> {
            match t {
                None => Ok(None),
                Some(TokenTemplate::Ids(ids)) if ids.is_empty() => {
                    Err(cfg_err(format!("{key} is an empty list of token ids")))
                }
                Some(TokenTemplate::Ids(ids)) => Ok(Some(ids.clone())),
                Some(TokenTemplate::Text(s)) => {
                    let tok = tok.ok_or_else(|| {
                        cfg_err(format!(
                            "{key} given as text needs a tokenizer (model.tokenizer)"
                        ))
                    })?;
                    let ids = tok.encode(s)?;
                    if ids.is_empty() {
                        return Err(cfg_err(format!("{key} {s:?} encodes to no token")));
                    }
                    Ok(Some(ids))
                }
            }
        };
        let response_ids = ids(&spec.response_template, "collator.response_template")?;
        let instruction_ids = ids(&spec.instruction_template, "collator.instruction_template")?;
        if instruction_ids.is_some() && response_ids.is_none() {
            return Err(cfg_err(
                "collator.instruction_template needs collator.response_template",
            ));
        }
        if response_ids.is_some() {
            match (spec.loss_on, instruction_ids.is_some()) {
                (Some(LossOn::All), _) => {
                    return Err(cfg_err(
                        "data.loss_on: all contradicts collator.response_template (which masks everything up to each response)",
                    ))
                }
                (Some(LossOn::Assistant), false) => {
                    return Err(cfg_err(
                        "data.loss_on: assistant with collator.response_template needs collator.instruction_template (TRL's multi-turn mode)",
                    ))
                }
                (Some(LossOn::Completion | LossOn::LastAssistant), true) => {
                    return Err(cfg_err(
                        "collator.instruction_template trains every assistant turn: use data.loss_on: assistant (or leave it unset)",
                    ))
                }
                _ => {}
            }
        }
        let mut markers: Vec<String> = Vec::new();
        if let Some(t) = tok {
            if let Some((_, v)) = crate::template::special_tokens(t)
                .into_iter()
                .find(|(k, _)| k == "eos_token")
            {
                if let Some(s) = v.as_str() {
                    markers.push(s.to_string());
                }
            }
        }
        markers.extend(spec.end_of_turn.iter().cloned());
        markers.extend(END_OF_TURN.iter().map(|s| s.to_string()));
        markers.retain(|m| !m.is_empty());
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(16);
        Ok(Self {
            tok,
            spec,
            opts,
            template,
            response_ids,
            instruction_ids,
            markers,
            threads,
        })
    }

    /// Use at most `n` threads (1: sequential).
    pub fn with_threads(mut self, n: usize) -> Self {
        self.threads = n.max(1);
        self
    }

    fn field<'f>(&'f self, name: &'f str) -> &'f str {
        self.spec
            .fields
            .get(name)
            .map(String::as_str)
            .unwrap_or(name)
    }

    fn has(&self, row: &Value, name: &str) -> bool {
        row.get_attr(self.field(name))
            .map(|v| !v.is_undefined())
            .unwrap_or(false)
    }

    fn tok(&self, loc: &Loc, what: &str) -> Result<&'a TextTokenizer> {
        self.tok.ok_or_else(|| {
            loc.err(format!(
                "{what} rows need a tokenizer (set `model.tokenizer` or use a model directory with tokenizer.json)"
            ))
        })
    }

    /// The format of a dataset from its first row.
    fn detect(&self, row: &Value, loc: &Loc) -> Result<Format> {
        if self.spec.format != Format::Auto {
            return Ok(self.spec.format);
        }
        if row.kind() != ValueKind::Map {
            return Err(loc.err(format!("expected a JSON object, got {}", kind_name(row))));
        }
        let prompt_tmpl = self
            .template
            .as_ref()
            .map(|t| t.kind == TemplateKind::Prompt)
            .unwrap_or(false);
        let f = if self.has(row, "input_ids") {
            Format::Tokens
        } else if self.has(row, "messages") {
            Format::Messages
        } else if self.has(row, "conversations") {
            Format::Sharegpt
        } else if self.has(row, "prompt") || self.has(row, "completion") {
            Format::PromptCompletion
        } else if self.has(row, "instruction") || self.has(row, "output") {
            Format::Alpaca
        } else if self.has(row, "text") {
            Format::Text
        } else if prompt_tmpl {
            Format::Columns
        } else {
            let keys: Vec<String> = row
                .try_iter()
                .map(|it| it.map(|k| k.to_string()).collect())
                .unwrap_or_default();
            return Err(loc.err(format!(
                "cannot tell the format of the row from its fields ({}): expected `text`, `prompt`/`completion`, `messages`, `conversations`, `instruction`/`output` or `input_ids`, or `input_ids` (set data.format, data.fields or a prompt template in data.template)",
                if keys.is_empty() { "none".to_string() } else { keys.join(", ") }
            )));
        };
        Ok(f)
    }

    fn resolve(&self, format: Format, loc: &Loc) -> Result<Resolved> {
        let kind = self.template.as_ref().map(|t| t.kind);
        let name =
            |t: &Option<Arc<Template>>| t.as_ref().map(|t| t.name.clone()).unwrap_or_default();
        let template = match format {
            Format::Auto => unreachable!("detected before"),
            Format::Text | Format::Tokens => {
                if self.template.is_some() {
                    return Err(cfg_err(format!(
                        "data.template {} does not apply to {} rows (first row {loc})",
                        name(&self.template),
                        format.name()
                    )));
                }
                None
            }
            Format::PromptCompletion => self.template.clone(),
            Format::Alpaca | Format::Columns => match kind {
                Some(TemplateKind::Prompt) => self.template.clone(),
                Some(TemplateKind::Chat) => {
                    return Err(cfg_err(format!(
                        "{} rows need a prompt template (with `prompt` and `completion` blocks); {} is a chat template",
                        format.name(),
                        name(&self.template)
                    )))
                }
                None if format == Format::Alpaca => Some(Arc::new(Template::load("alpaca", self.tok)?)),
                None => {
                    return Err(cfg_err(
                        "data.format: columns needs a prompt template in data.template",
                    ))
                }
            },
            Format::Messages | Format::Sharegpt => match kind {
                Some(TemplateKind::Chat) => self.template.clone(),
                Some(TemplateKind::Prompt) => {
                    return Err(cfg_err(format!(
                        "{} rows need a chat template; {} is a prompt template (for prompt/completion or column rows)",
                        format.name(),
                        name(&self.template)
                    )))
                }
                None => {
                    let from_tok = self.tok.filter(|t| {
                        crate::template::tokenizer_chat_template(t).is_ok()
                    });
                    match from_tok {
                        Some(_) => Some(Arc::new(Template::load("tokenizer", self.tok)?)),
                        None => {
                            return Err(cfg_err(format!(
                                "{} rows need a chat template: the tokenizer has none, so set data.template to a shipped one ({}), a .jinja file, or `tokenizer`",
                                format.name(),
                                crate::template::SHIPPED
                                    .iter()
                                    .filter(|(_, f, _)| f.starts_with("chat/"))
                                    .map(|(n, _, _)| *n)
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )))
                        }
                    }
                }
            },
        };
        let trl = self.response_ids.is_some();
        let default = match format {
            Format::Text => LossOn::All,
            Format::Messages | Format::Sharegpt => LossOn::Assistant,
            _ => LossOn::Completion,
        };
        let loss_on = match (self.spec.loss_on, trl) {
            (None, false) => default,
            (None, true) => {
                if self.instruction_ids.is_some() {
                    LossOn::Assistant
                } else {
                    LossOn::LastAssistant
                }
            }
            (Some(l), _) => l,
        };
        if !trl {
            let bad = match (format, loss_on) {
                (_, LossOn::All) => None,
                (Format::Text, _) => Some("text rows have no completion: use data.loss_on: all, or collator.response_template to mask by template"),
                (Format::Messages | Format::Sharegpt, LossOn::Completion) => Some("conversations have no completion: use data.loss_on: assistant or last_assistant"),
                (Format::Tokens, LossOn::Assistant | LossOn::LastAssistant) => Some("pre-tokenized rows carry their own mask: use data.loss_on: completion (the mask) or all"),
                _ => None,
            };
            if let Some(msg) = bad {
                return Err(cfg_err(format!("data.loss_on: {}: {msg}", loss_on.name())));
            }
        }
        Ok(Resolved {
            format,
            template,
            loss_on,
        })
    }

    fn str_field(&self, row: &Value, name: &str, loc: &Loc) -> Result<String> {
        let col = self.field(name);
        let mapped = if col != name {
            format!(" (data.fields.{name})")
        } else {
            String::new()
        };
        match row.get_attr(col) {
            Ok(v) if v.kind() == ValueKind::String => {
                Ok(v.as_str().unwrap_or_default().to_string())
            }
            Ok(v) if v.is_undefined() => Err(loc.err(format!("missing field `{col}`{mapped}"))),
            Ok(v) => Err(loc.err(format!(
                "field `{col}`{mapped} must be a string, got {}",
                kind_name(&v)
            ))),
            Err(e) => Err(loc.err(format!("field `{col}`: {e}"))),
        }
    }

    /// The row's columns, plus each canonical name of `data.fields` bound to its column.
    fn vars(&self, row: &Value) -> Value {
        let mut items: Vec<(Value, Value)> = Vec::new();
        if let Ok(keys) = row.try_iter() {
            for k in keys {
                let v = row.get_item(&k).unwrap_or_default();
                items.push((k, v));
            }
        }
        for (canon, col) in &self.spec.fields {
            if let Ok(v) = row.get_attr(col) {
                if !v.is_undefined() {
                    items.push((Value::from(canon.as_str()), v));
                }
            }
        }
        Value::from_iter(items)
    }

    fn role(&self, raw: &str) -> Option<String> {
        if let Some(r) = self.spec.roles.get(raw) {
            return Some(r.clone());
        }
        ROLES.contains(&raw).then(|| raw.to_string())
    }

    /// A `messages` or ShareGPT list as chat-template messages (role names normalised).
    fn messages(&self, row: &Value, format: Format, loc: &Loc) -> Result<Vec<Value>> {
        let (list_key, role_key, content_key) = match format {
            Format::Sharegpt => ("conversations", self.field("from"), self.field("value")),
            _ => ("messages", self.field("role"), self.field("content")),
        };
        let col = self.field(list_key);
        let list = row.get_attr(col).unwrap_or_default();
        if list.is_undefined() {
            return Err(loc.err(format!("missing field `{col}`")));
        }
        if list.kind() != ValueKind::Seq {
            return Err(loc.err(format!(
                "field `{col}` must be an array of messages, got {}",
                kind_name(&list)
            )));
        }
        let mut out = Vec::new();
        for (i, m) in list
            .try_iter()
            .map_err(|e| loc.err(e.to_string()))?
            .enumerate()
        {
            let at = format!("{col}[{i}]");
            if m.kind() != ValueKind::Map {
                return Err(loc.err(format!("`{at}` must be an object, got {}", kind_name(&m))));
            }
            let raw_role = m.get_attr(role_key).unwrap_or_default();
            let Some(raw_role) = raw_role.as_str().map(str::to_owned) else {
                return Err(loc.err(if raw_role.is_undefined() {
                    format!("`{at}` has no `{role_key}`")
                } else {
                    format!(
                        "`{at}.{role_key}` must be a string, got {}",
                        kind_name(&raw_role)
                    )
                }));
            };
            let role = match format {
                Format::Sharegpt => self
                    .spec
                    .roles
                    .get(&raw_role)
                    .cloned()
                    .or_else(|| sharegpt_role(&raw_role).map(str::to_owned)),
                _ => self.role(&raw_role),
            };
            let Some(role) = role else {
                return Err(loc.err(format!(
                    "`{at}.{role_key}`: unknown role `{raw_role}` (known: {}{}; map others with data.roles)",
                    if format == Format::Sharegpt {
                        "system, human, user, gpt, assistant, model, tool, function_call, function_response, observation"
                    } else {
                        "system, user, assistant, tool"
                    },
                    if self.spec.roles.is_empty() {
                        String::new()
                    } else {
                        format!(", {}", self.spec.roles.keys().cloned().collect::<Vec<_>>().join(", "))
                    }
                )));
            };
            let content = m.get_attr(content_key).unwrap_or_default();
            let has_tool_calls = m
                .get_attr("tool_calls")
                .map(|v| !v.is_undefined() && !v.is_none())
                .unwrap_or(false);
            match content.kind() {
                ValueKind::String => {}
                ValueKind::Seq | ValueKind::Map => {}
                ValueKind::Undefined | ValueKind::None if has_tool_calls => {}
                ValueKind::Undefined => {
                    return Err(loc.err(format!("`{at}` has no `{content_key}`")));
                }
                _ => {
                    return Err(loc.err(format!(
                        "`{at}.{content_key}` must be a string, got {}",
                        kind_name(&content)
                    )))
                }
            }
            // Keep every other key (tool_calls, name, ...) for templates that read them.
            let mut items: Vec<(Value, Value)> = vec![
                (Value::from("role"), Value::from(role)),
                (Value::from("content"), content),
            ];
            if let Ok(keys) = m.try_iter() {
                for k in keys {
                    let ks = k.as_str().unwrap_or_default();
                    if ks != role_key && ks != content_key && ks != "role" && ks != "content" {
                        items.push((k.clone(), m.get_item(&k).unwrap_or_default()));
                    }
                }
            }
            out.push(Value::from_iter(items));
        }
        if out.is_empty() {
            return Err(loc.err(format!("`{col}` is empty")));
        }
        Ok(out)
    }

    fn render_err(&self, loc: &Loc, e: crate::template::RenderError) -> Error {
        loc.err(e.to_string())
    }

    /// Byte range of message `i`'s content in `text` (the rendered conversation): where the
    /// text differs from the same conversation with that message's content replaced.
    fn turn_span(
        &self,
        t: &Template,
        msgs: &[Value],
        i: usize,
        text: &str,
        loc: &Loc,
    ) -> Result<Option<Range<usize>>> {
        let content = msgs[i].get_attr("content").unwrap_or_default();
        let c = content.as_str().unwrap_or_default();
        let dummy = if c.starts_with('\u{e000}') || c.ends_with('\u{e000}') {
            "\u{e001}"
        } else {
            "\u{e000}"
        };
        let mut dm = msgs.to_vec();
        dm[i] = Value::from_iter([
            ("role", msgs[i].get_attr("role").unwrap_or_default()),
            ("content", Value::from(dummy)),
        ]);
        let d = t
            .render_chat(&dm, false)
            .map_err(|e| self.render_err(loc, e))?;
        if d == text {
            return Ok(None);
        }
        let (a, b) = (text.as_bytes(), d.as_bytes());
        let mut p = a.iter().zip(b).take_while(|(x, y)| x == y).count();
        while !text.is_char_boundary(p) {
            p -= 1;
        }
        let max_s = (a.len() - p).min(b.len() - p);
        let mut s = a[p..]
            .iter()
            .rev()
            .zip(b[p..].iter().rev())
            .take(max_s)
            .take_while(|(x, y)| x == y)
            .count();
        while !text.is_char_boundary(a.len() - s) {
            s -= 1;
        }
        Ok(Some(p..a.len() - s))
    }

    fn render_chat(&self, r: &Resolved, msgs: &[Value], loc: &Loc) -> Result<Rendered> {
        let t = r.template.as_ref().expect("chat rows have a template");
        let text = t
            .render_chat(msgs, false)
            .map_err(|e| self.render_err(loc, e))?;
        let last_is_assistant = msgs
            .last()
            .and_then(|m| m.get_attr("role").ok())
            .map(|r| r.as_str() == Some("assistant"))
            .unwrap_or(false);
        if r.loss_on == LossOn::All {
            let n = text.len();
            return Ok(Rendered {
                text,
                spans: one_span(0, n),
                ends_with_target: true,
                add_bos: false,
            });
        }
        if self.response_ids.is_some() {
            return Ok(Rendered {
                text,
                spans: Vec::new(),
                ends_with_target: last_is_assistant,
                add_bos: false,
            });
        }
        let mut turns: Vec<usize> = msgs
            .iter()
            .enumerate()
            .filter(|(_, m)| {
                m.get_attr("role")
                    .map(|r| r.as_str() == Some("assistant"))
                    .unwrap_or(false)
            })
            .map(|(i, _)| i)
            .collect();
        if r.loss_on == LossOn::LastAssistant {
            turns = turns.last().copied().into_iter().collect();
        }
        let mut spans = Vec::new();
        for &i in &turns {
            let Some(span) = self.turn_span(t, msgs, i, &text, loc)? else {
                return Err(loc.err(format!(
                    "template {} renders the conversation the same whatever assistant message {i} says: the turn is not in the text, so it cannot be trained",
                    t.name
                )));
            };
            let bound = if i + 1 < msgs.len() {
                self.turn_span(t, msgs, i + 1, &text, loc)?
                    .map(|s| s.start)
                    .unwrap_or(text.len())
                    .max(span.end)
            } else {
                text.len()
            };
            // The turn's closing marker (`<|eot_id|>`, `<|im_end|>`, EOS, ...) is trained too.
            let region = &text[span.end..bound];
            let close = self
                .markers
                .iter()
                .filter_map(|m| region.find(m.as_str()).map(|p| (p, p + m.len())))
                .min_by_key(|&(p, end)| (p, std::cmp::Reverse(end)))
                .map(|(_, end)| end)
                .unwrap_or(0);
            spans.push(span.start..span.end + close);
        }
        let ends_with_target = last_is_assistant && turns.last() == Some(&(msgs.len() - 1));
        Ok(Rendered {
            text,
            spans,
            ends_with_target,
            add_bos: false,
        })
    }

    /// Renders a row into text and trained byte ranges.
    fn render(&self, r: &Resolved, row: &Value, loc: &Loc) -> Result<Rendered> {
        let all = r.loss_on == LossOn::All;
        let whole = |text: String, add_bos: bool| {
            let n = text.len();
            Rendered {
                text,
                spans: one_span(0, n),
                ends_with_target: true,
                add_bos,
            }
        };
        let pair = |p: String, c: String| {
            let text = format!("{p}{c}");
            let n = text.len();
            if all {
                return whole(text, true);
            }
            Rendered {
                spans: one_span(p.len(), n),
                text,
                ends_with_target: true,
                add_bos: true,
            }
        };
        match r.format {
            Format::Text => Ok(whole(self.str_field(row, "text", loc)?, true)),
            Format::PromptCompletion => {
                let p = self.str_field(row, "prompt", loc)?;
                let c = self.str_field(row, "completion", loc)?;
                match &r.template {
                    None => Ok(pair(p, c)),
                    Some(t) if t.kind == TemplateKind::Prompt => {
                        let mut vars = self.vars(row);
                        vars = Value::from_iter(
                            vars.try_iter()
                                .map(|it| it.collect::<Vec<_>>())
                                .unwrap_or_default()
                                .into_iter()
                                .map(|k| (k.clone(), vars.get_item(&k).unwrap_or_default()))
                                .chain([
                                    (Value::from("prompt"), Value::from(p)),
                                    (Value::from("completion"), Value::from(c)),
                                ]),
                        );
                        self.render_blocks(t, &vars, loc, all)
                    }
                    Some(_) => {
                        let mut msgs = Vec::new();
                        if let Ok(s) = row.get_attr(self.field("system")) {
                            if let Some(s) = s.as_str() {
                                msgs.push(Value::from_iter([("role", "system"), ("content", s)]));
                            }
                        }
                        msgs.push(Value::from_iter([
                            ("role", "user"),
                            ("content", p.as_str()),
                        ]));
                        msgs.push(Value::from_iter([
                            ("role", "assistant"),
                            ("content", c.as_str()),
                        ]));
                        self.render_chat(r, &msgs, loc)
                    }
                }
            }
            Format::Alpaca | Format::Columns => {
                let t = r
                    .template
                    .as_ref()
                    .expect("resolved with a prompt template");
                if r.format == Format::Alpaca {
                    self.str_field(row, "instruction", loc)?;
                    self.str_field(row, "output", loc)?;
                    let col = self.field("input");
                    if let Ok(v) = row.get_attr(col) {
                        if !matches!(
                            v.kind(),
                            ValueKind::String | ValueKind::None | ValueKind::Undefined
                        ) {
                            return Err(loc.err(format!(
                                "field `{col}` must be a string, got {}",
                                kind_name(&v)
                            )));
                        }
                    }
                }
                self.render_blocks(t, &self.vars(row), loc, all)
            }
            Format::Messages | Format::Sharegpt => {
                let msgs = self.messages(row, r.format, loc)?;
                self.render_chat(r, &msgs, loc)
            }
            Format::Tokens | Format::Auto => unreachable!("handled by the caller"),
        }
    }

    fn render_blocks(&self, t: &Template, vars: &Value, loc: &Loc, all: bool) -> Result<Rendered> {
        let p = t
            .render_prompt_block(vars)
            .map_err(|e| self.render_err(loc, e))?;
        let c = t
            .render_completion_block(vars)
            .map_err(|e| self.render_err(loc, e))?;
        let text = format!("{p}{c}");
        let n = text.len();
        Ok(Rendered {
            spans: one_span(if all { 0 } else { p.len() }, n),
            text,
            ends_with_target: true,
            add_bos: true,
        })
    }

    fn tokens_row(&self, row: &Value, r: &Resolved, loc: &Loc) -> Result<(Vec<u32>, Vec<bool>)> {
        let ints = |name: &str| -> Result<Option<Vec<i64>>> {
            let col = self.field(name);
            let v = row.get_attr(col).unwrap_or_default();
            if v.is_undefined() || v.is_none() {
                return Ok(None);
            }
            if v.kind() != ValueKind::Seq {
                return Err(loc.err(format!(
                    "field `{col}` must be an array of integers, got {}",
                    kind_name(&v)
                )));
            }
            let mut out = Vec::with_capacity(v.len().unwrap_or(0));
            for (i, x) in v
                .try_iter()
                .map_err(|e| loc.err(e.to_string()))?
                .enumerate()
            {
                match x.as_i64() {
                    Some(n) if x.is_integer() => out.push(n),
                    _ => {
                        return Err(loc.err(format!(
                            "field `{col}`[{i}] must be an integer, got {}",
                            if x.kind() == ValueKind::String {
                                format!("{:?}", x.as_str().unwrap_or_default())
                            } else {
                                x.to_string()
                            }
                        )))
                    }
                }
            }
            Ok(Some(out))
        };
        let col = self.field("input_ids");
        let ids = ints("input_ids")?.ok_or_else(|| loc.err(format!("missing field `{col}`")))?;
        if ids.is_empty() {
            return Err(loc.err(format!("field `{col}` is empty")));
        }
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id < 0 || id >= self.opts.vocab_size as i64)
        {
            return Err(loc.err(format!(
                "{col}[{i}] = {id} is outside the model's vocabulary (size {})",
                self.opts.vocab_size
            )));
        }
        let ids: Vec<u32> = ids.into_iter().map(|i| i as u32).collect();
        let masks = ["completion_mask", "assistant_masks", "labels"];
        let present: Vec<&str> = masks.iter().copied().filter(|m| self.has(row, m)).collect();
        if present.len() > 1 {
            return Err(loc.err(format!(
                "row has {}: give one mask",
                present
                    .iter()
                    .map(|m| format!("`{}`", self.field(m)))
                    .collect::<Vec<_>>()
                    .join(" and ")
            )));
        }
        if self.response_ids.is_some() {
            if let Some(m) = present.first() {
                return Err(loc.err(format!(
                    "row carries `{}` but collator.response_template masks by searching the ids: remove one",
                    self.field(m)
                )));
            }
            return Ok((ids, Vec::new()));
        }
        let mask = match present.first() {
            None => vec![true; ids.len()],
            Some(&name) => {
                let col = self.field(name);
                let m = ints(name)?.expect("present");
                if m.len() != ids.len() {
                    return Err(loc.err(format!(
                        "field `{col}` has {} entries but `{}` has {}",
                        m.len(),
                        self.field("input_ids"),
                        ids.len()
                    )));
                }
                if name == "labels" {
                    let mut mask = Vec::with_capacity(m.len());
                    for (i, (&l, &id)) in m.iter().zip(&ids).enumerate() {
                        if l == -100 {
                            mask.push(false);
                        } else if l == id as i64 {
                            mask.push(true);
                        } else {
                            return Err(loc.err(format!(
                                "{col}[{i}] = {l} is neither -100 nor input_ids[{i}] = {id} (labels are the ids, unshifted, with -100 where no loss)"
                            )));
                        }
                    }
                    mask
                } else {
                    if let Some((i, v)) = m.iter().enumerate().find(|(_, &v)| v != 0 && v != 1) {
                        return Err(loc.err(format!("{col}[{i}] = {v}: entries must be 0 or 1")));
                    }
                    m.into_iter().map(|v| v == 1).collect()
                }
            }
        };
        let mask = if r.loss_on == LossOn::All {
            vec![true; ids.len()]
        } else {
            mask
        };
        Ok((ids, mask))
    }

    /// One row to an example (or the reason it was dropped).
    fn encode_row(&self, r: &Resolved, raw: &RawRow) -> Result<RowOut> {
        let loc = &raw.loc;
        let row = raw.value()?;
        if row.kind() != ValueKind::Map {
            return Err(loc.err(format!("expected a JSON object, got {}", kind_name(&row))));
        }
        let mut out = RowOut::default();
        let (ids, mut mask, ends_with_target, text) = if r.format == Format::Tokens {
            let (ids, mask) = self.tokens_row(&row, r, loc)?;
            (ids, mask, false, None)
        } else {
            let rd = self.render(r, &row, loc)?;
            let tok = self.tok(loc, r.format.name())?;
            let (mut ids, mut mask) = if self.response_ids.is_some() {
                (tok.encode_fast(&rd.text)?, Vec::new())
            } else {
                let (ids, offsets) = tok.encode_with_offsets(&rd.text)?;
                let mask = mask_from_spans(&offsets, &rd.spans);
                (ids, mask)
            };
            if rd.add_bos && tok.add_bos {
                let bos = tok.bos_id.expect("add_bos implies a BOS id");
                if ids.first() != Some(&bos) {
                    ids.insert(0, bos);
                    if !mask.is_empty() {
                        mask.insert(0, false);
                    }
                }
            }
            if rd.ends_with_target {
                match tok.eos_id {
                    None => out.eos_not_target = true,
                    Some(eos) if self.response_ids.is_some() => {
                        if ids.last() != Some(&eos) {
                            ids.push(eos);
                        }
                    }
                    Some(eos) => match mask.iter().rposition(|&m| m) {
                        // Nothing trained: the example is dropped below anyway.
                        None => {}
                        Some(last) if ids[last] == eos => {}
                        Some(last) => match ids[last + 1..].iter().position(|&t| t == eos) {
                            // The template writes EOS after the turn: train up to it.
                            Some(j) => mask[last + 1..=last + 1 + j]
                                .iter_mut()
                                .for_each(|m| *m = true),
                            None => {
                                ids.push(eos);
                                mask.push(true);
                            }
                        },
                    },
                }
            }
            (ids, mask, rd.ends_with_target, Some(rd.text))
        };
        if ids.is_empty() {
            return Err(loc.err("the row renders to no token"));
        }
        if let Some(resp) = &self.response_ids {
            let pad = self.tok.map(|t| t.pad_or_eos());
            let (m, found) =
                response_template_mask(&ids, pad, resp, self.instruction_ids.as_deref());
            mask = m;
            out.search = found;
            if found.response_missing || found.instruction_missing {
                out.template_missing = true;
                out.miss_text = text;
            }
            let eos = self.tok.and_then(|t| t.eos_id);
            if ends_with_target
                && !out.template_missing
                && eos.is_some()
                && ids.last() == eos.as_ref()
                && !mask.last().copied().unwrap_or(false)
                && pad == eos
            {
                out.eos_masked = true;
                out.eos_not_target = true;
            }
        }
        let mut ex = Example::new(ids, mask);
        if ex.len() > self.opts.max_length {
            match self.opts.truncation {
                Truncation::KeepStart => {
                    let had_eos = ends_with_target && ex.loss_mask.last() == Some(&true);
                    ex.input_ids.truncate(self.opts.max_length);
                    ex.loss_mask.truncate(self.opts.max_length);
                    out.truncated = true;
                    if had_eos {
                        out.eos_truncated = true;
                        out.eos_not_target = true;
                    }
                }
                Truncation::KeepEnd => {
                    let cut = ex.len() - self.opts.max_length;
                    ex.input_ids.drain(..cut);
                    ex.loss_mask.drain(..cut);
                    out.truncated = true;
                }
                Truncation::Drop => {
                    out.too_long = true;
                    return Ok(out);
                }
                Truncation::Error => {
                    return Err(loc.err(format!(
                        "example has {} tokens, more than data.max_length = {} (data.truncation: error)",
                        ex.len(),
                        self.opts.max_length
                    )))
                }
            }
        }
        if ex.n_targets() == 0 {
            if !out.template_missing {
                out.no_target = true;
            }
            return Ok(out);
        }
        out.example = Some(ex);
        Ok(out)
    }

    /// Encodes rows on `self.threads` threads; the error of the earliest bad row wins.
    fn encode_all(&self, r: &Resolved, rows: &[RawRow]) -> Result<Vec<RowOut>> {
        let threads = self.threads.min(rows.len().div_ceil(64)).max(1);
        if threads == 1 {
            return rows.iter().map(|row| self.encode_row(r, row)).collect();
        }
        let chunk = rows.len().div_ceil(threads);
        let parts: Vec<Result<Vec<RowOut>>> = std::thread::scope(|s| {
            let handles: Vec<_> = rows
                .chunks(chunk)
                .map(|c| {
                    s.spawn(move || {
                        c.iter()
                            .map(|row| self.encode_row(r, row))
                            .collect::<Result<Vec<_>>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("a data thread panicked"))
                .collect()
        });
        let mut out = Vec::with_capacity(rows.len());
        for p in parts {
            out.extend(p?);
        }
        Ok(out)
    }

    fn template_hint(&self, text: &str, loc: &Loc) -> String {
        let Some(TokenTemplate::Text(t)) = &self.spec.response_template else {
            return String::new();
        };
        let Some(tok) = self.tok else {
            return String::new();
        };
        let Some(at) = text.find(t.as_str()) else {
            return format!(
                "; the text {t:?} does not occur in the rendered rows either (first row: {loc})"
            );
        };
        match tok.encode_with_offsets(text) {
            Ok((ids, offs)) => {
                let ctx: Vec<u32> = ids
                    .iter()
                    .zip(&offs)
                    .filter(|(_, &(s, e))| s < at + t.len() && at < e)
                    .map(|(&id, _)| id)
                    .collect();
                format!(
                    "; the text occurs ({loc}) but tokenizes differently in context, as {ctx:?}: set collator.response_template: {ctx:?}"
                )
            }
            Err(_) => String::new(),
        }
    }

    /// Reads and encodes one dataset; `eval_ratio` > 0 also splits off an evaluation set.
    fn load_parts(
        &self,
        path: &Path,
        eval_ratio: f64,
        seed: u64,
    ) -> Result<(Dataset, Option<Dataset>)> {
        let files = SourceFiles::read(path)?;
        let rows = files.rows();
        if rows.is_empty() {
            return Err(Error::Dataset {
                path: path.to_path_buf(),
                msg: "dataset is empty (no rows)".into(),
            });
        }
        let first = rows[0].value()?;
        let format = self.detect(&first, &rows[0].loc)?;
        let r = self.resolve(format, &rows[0].loc)?;
        // A prompt template must render as prompt + completion and nothing else.
        if let (Some(t), Format::Alpaca | Format::Columns) = (&r.template, format) {
            let vars = self.vars(&first);
            if let (Ok(p), Ok(c), Ok(w)) = (
                t.render_prompt_block(&vars),
                t.render_completion_block(&vars),
                t.render_whole(&vars),
            ) {
                if w != format!("{p}{c}") {
                    return Err(cfg_err(format!(
                        "template {} renders text outside its `prompt` and `completion` blocks (row {}): the whole template must be exactly prompt + completion",
                        t.name, rows[0].loc
                    )));
                }
            }
        }
        let outs = self.encode_all(&r, &rows)?;
        let is_eval: Vec<bool> = if eval_ratio > 0.0 {
            split_mask(rows.len(), eval_ratio, seed)
        } else {
            vec![false; rows.len()]
        };
        let base = DataReport {
            format: format.name().to_string(),
            template: r.template.as_ref().map(|t| t.name.clone()),
            method: if self.response_ids.is_some() {
                "response_template"
            } else {
                "spans"
            }
            .to_string(),
            loss_on: r.loss_on.name().to_string(),
            ..Default::default()
        };
        if let Some(ids) = &self.response_ids {
            let missing_r = outs.iter().filter(|o| o.search.response_missing).count();
            let missing_i = outs
                .iter()
                .filter(|o| o.search.instruction_missing && !o.search.response_missing)
                .count();
            if missing_r == outs.len() {
                let (o, loc) = outs
                    .iter()
                    .zip(&rows)
                    .map(|(o, r)| (o, &r.loc))
                    .next()
                    .expect("non-empty");
                let hint = o
                    .miss_text
                    .as_deref()
                    .map(|t| self.template_hint(t, loc))
                    .unwrap_or_default();
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg: format!(
                        "collator.response_template {} (token ids {ids:?}) is found in none of the {} rows{hint}",
                        match &self.spec.response_template { Some(TokenTemplate::Text(t)) => format!("{t:?}"), _ => "given as ids".into() },
                        outs.len()
                    ),
                });
            }
            if let (Some(instr), true) =
                (&self.instruction_ids, missing_i + missing_r == outs.len())
            {
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg: format!(
                        "collator.instruction_template (token ids {:?}) is found in none of the {} rows",
                        instr,
                        outs.len()
                    ),
                });
            }
        }
        let mut parts = [
            (base.clone(), Vec::new(), Vec::new()),
            (base, Vec::new(), Vec::new()),
        ];
        for ((o, raw), &ev) in outs.into_iter().zip(&rows).zip(&is_eval) {
            let (rep, exs, origins) = &mut parts[usize::from(ev)];
            rep.rows += 1;
            rep.truncated += usize::from(o.truncated);
            rep.dropped_too_long += usize::from(o.too_long);
            rep.dropped_no_target += usize::from(o.no_target);
            rep.response_template_missing += usize::from(o.search.response_missing);
            rep.instruction_template_missing += usize::from(o.search.instruction_missing);
            rep.eos_not_target += usize::from(o.eos_not_target);
            rep.eos_truncated += usize::from(o.eos_truncated);
            rep.eos_masked_as_pad += usize::from(o.eos_masked);
            match o.example {
                Some(ex) => {
                    rep.tokens += ex.len();
                    rep.target_tokens += ex.n_targets();
                    exs.push(ex);
                    origins.push(raw.loc.clone());
                }
                None => {
                    let reason = if o.too_long {
                        "longer than max_length"
                    } else if o.template_missing {
                        rep.dropped_template_missing += 1;
                        "response/instruction template missing"
                    } else {
                        "no target token"
                    };
                    if rep.dropped_rows.len() < 5 {
                        rep.dropped_rows.push(format!("{} ({reason})", raw.loc));
                    }
                }
            }
        }
        let [(mut tr, tex, tor), (mut er, eex, eor)] = parts;
        tr.examples = tex.len();
        er.examples = eex.len();
        let finish = |report: DataReport,
                      examples: Vec<Example>,
                      origins: Vec<Loc>,
                      what: &str|
         -> Result<Dataset> {
            if examples.is_empty() {
                let msg = if report.rows == 0 {
                    format!("the {what} split is empty")
                } else {
                    format!(
                        "no usable example among {} rows ({} longer than max_length dropped, {} without any target token, {} without the response/instruction template)",
                        report.rows, report.dropped_too_long, report.dropped_no_target, report.dropped_template_missing
                    )
                };
                return Err(Error::Dataset {
                    path: path.to_path_buf(),
                    msg,
                });
            }
            Ok(Dataset {
                path: path.to_path_buf(),
                examples,
                origins,
                report,
            })
        };
        let train = finish(tr, tex, tor, "training")?;
        let eval = if eval_ratio > 0.0 {
            Some(finish(er, eex, eor, "evaluation")?)
        } else {
            None
        };
        Ok((train, eval))
    }

    /// Reads one dataset (a file, a directory of files, or a glob).
    pub fn load(&self, path: &Path) -> Result<Dataset> {
        Ok(self.load_parts(path, 0.0, 0)?.0)
    }

    /// Reads one dataset and holds out `eval_ratio` of its rows (a seeded draw) for evaluation.
    pub fn load_split(
        &self,
        path: &Path,
        eval_ratio: f64,
        seed: u64,
    ) -> Result<(Dataset, Dataset)> {
        if !(eval_ratio > 0.0 && eval_ratio < 1.0) {
            return Err(cfg_err(format!(
                "data.eval_ratio = {eval_ratio} must be in (0, 1)"
            )));
        }
        let (t, e) = self.load_parts(path, eval_ratio, seed)?;
        Ok((t, e.expect("a ratio was given")))
    }
}

/// `true` for the rows held out for evaluation: `round(n * ratio)` of them (at least one, and
/// at least one row left for training), drawn with `seed`.
pub fn split_mask(n: usize, ratio: f64, seed: u64) -> Vec<bool> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let k = ((n as f64 * ratio).round() as usize).clamp(1, n.saturating_sub(1).max(1));
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut out = vec![false; n];
    for &i in &idx[..k.min(n)] {
        out[i] = true;
    }
    out
}

/// Reads a dataset of `prompt`/`completion`, `text`, `messages` (with the tokenizer's chat
/// template) or pre-tokenized rows with the default settings (format detected, span masking).
pub fn load_jsonl(path: &Path, tok: Option<&TextTokenizer>, opts: &LoadOptions) -> Result<Dataset> {
    Pipeline::new(tok, DataSpec::default(), opts.clone())?.load(path)
}
