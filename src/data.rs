//! Dataset rows to token-level examples.
//!
//! Two row forms are read from JSONL files (one JSON object a line, blank lines skipped):
//! - `{"prompt": "...", "completion": "..."}`: tokenized as `[BOS] prompt completion EOS`, with
//!   loss on the completion and the EOS that ends it;
//! - `{"input_ids": [...], "completion_mask": [...]}`: TRL's pre-tokenized form (mask 1 = the
//!   token carries loss; without `completion_mask` every token does).

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
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

/// What loading a dataset did, for the log and for thresholds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DataReport {
    pub rows: usize,
    pub examples: usize,
    pub truncated: usize,
    pub dropped_too_long: usize,
    pub dropped_no_target: usize,
    pub tokens: usize,
    pub target_tokens: usize,
}

pub struct Dataset {
    pub path: PathBuf,
    pub examples: Vec<Example>,
    pub report: DataReport,
}

fn data_err(path: &Path, line: usize, msg: impl Into<String>) -> Error {
    Error::Data {
        path: path.to_path_buf(),
        line,
        msg: msg.into(),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn str_field<'a>(
    row: &'a serde_json::Map<String, serde_json::Value>,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<&'a str> {
    match row.get(key) {
        Some(serde_json::Value::String(s)) => Ok(s),
        Some(other) => Err(data_err(
            path,
            line,
            format!("field `{key}` must be a string, got {}", json_kind(other)),
        )),
        None => Err(data_err(path, line, format!("missing field `{key}`"))),
    }
}

fn int_list(
    row: &serde_json::Map<String, serde_json::Value>,
    key: &str,
    path: &Path,
    line: usize,
) -> Result<Option<Vec<u64>>> {
    let Some(v) = row.get(key) else {
        return Ok(None);
    };
    let arr = v.as_array().ok_or_else(|| {
        data_err(
            path,
            line,
            format!(
                "field `{key}` must be an array of integers, got {}",
                json_kind(v)
            ),
        )
    })?;
    arr.iter()
        .enumerate()
        .map(|(i, x)| {
            x.as_u64().ok_or_else(|| {
                data_err(
                    path,
                    line,
                    format!("field `{key}`[{i}] must be a non-negative integer, got {x}"),
                )
            })
        })
        .collect::<Result<Vec<_>>>()
        .map(Some)
}

/// Turns one parsed row into an example (before length handling).
fn row_to_example(
    row: &serde_json::Map<String, serde_json::Value>,
    tok: Option<&TextTokenizer>,
    opts: &LoadOptions,
    path: &Path,
    line: usize,
) -> Result<Example> {
    if let Some(ids) = int_list(row, "input_ids", path, line)? {
        if ids.is_empty() {
            return Err(data_err(path, line, "field `input_ids` is empty"));
        }
        if let Some((i, &id)) = ids
            .iter()
            .enumerate()
            .find(|(_, &id)| id >= opts.vocab_size as u64)
        {
            return Err(data_err(
                path,
                line,
                format!(
                    "input_ids[{i}] = {id} is outside the model's vocabulary (size {})",
                    opts.vocab_size
                ),
            ));
        }
        let mask = match int_list(row, "completion_mask", path, line)? {
            Some(m) => {
                if m.len() != ids.len() {
                    return Err(data_err(
                        path,
                        line,
                        format!(
                            "field `completion_mask` has {} entries but `input_ids` has {}",
                            m.len(),
                            ids.len()
                        ),
                    ));
                }
                if let Some((i, v)) = m.iter().enumerate().find(|(_, &v)| v > 1) {
                    return Err(data_err(
                        path,
                        line,
                        format!("completion_mask[{i}] = {v}: entries must be 0 or 1"),
                    ));
                }
                m.into_iter().map(|v| v == 1).collect()
            }
            None => vec![true; ids.len()],
        };
        return Ok(Example::new(
            ids.into_iter().map(|i| i as u32).collect(),
            mask,
        ));
    }
    if row.contains_key("prompt") || row.contains_key("completion") {
        let prompt = str_field(row, "prompt", path, line)?;
        let completion = str_field(row, "completion", path, line)?;
        let tok = tok.ok_or_else(|| {
            data_err(
                path,
                line,
                "text rows need a tokenizer (set `model.tokenizer` or use a model directory with tokenizer.json)",
            )
        })?;
        let mut ids = Vec::new();
        let mut mask = Vec::new();
        if tok.add_bos {
            ids.push(tok.bos_id.expect("add_bos implies a BOS id"));
            mask.push(false);
        }
        let p = tok.encode(prompt)?;
        mask.extend(std::iter::repeat_n(false, p.len()));
        ids.extend(p);
        let c = tok.encode(completion)?;
        mask.extend(std::iter::repeat_n(true, c.len()));
        ids.extend(c);
        if let Some(eos) = tok.eos_id {
            // The EOS that ends a completion is always a target, even when pad == EOS.
            ids.push(eos);
            mask.push(true);
        }
        if ids.is_empty() {
            return Err(data_err(path, line, "prompt and completion are both empty"));
        }
        return Ok(Example::new(ids, mask));
    }
    let keys: Vec<&str> = row.keys().map(String::as_str).collect();
    Err(data_err(
        path,
        line,
        format!(
            "row has neither `prompt`/`completion` nor `input_ids` (its fields: {})",
            if keys.is_empty() {
                "none".to_string()
            } else {
                keys.join(", ")
            }
        ),
    ))
}

/// Reads a JSONL dataset. Fails on the first bad row, naming file and line; fails if no
/// usable example is left.
pub fn load_jsonl(path: &Path, tok: Option<&TextTokenizer>, opts: &LoadOptions) -> Result<Dataset> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let mut report = DataReport::default();
    let mut examples = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        if raw.trim().is_empty() {
            continue;
        }
        report.rows += 1;
        let value: serde_json::Value = serde_json::from_str(raw).map_err(|e| {
            data_err(
                path,
                line,
                format!("invalid JSON at column {}: {e}", e.column()),
            )
        })?;
        let row = value.as_object().ok_or_else(|| {
            data_err(
                path,
                line,
                format!("expected a JSON object, got {}", json_kind(&value)),
            )
        })?;
        let mut ex = row_to_example(row, tok, opts, path, line)?;
        if ex.len() > opts.max_length {
            match opts.truncation {
                Truncation::KeepStart => {
                    ex.input_ids.truncate(opts.max_length);
                    ex.loss_mask.truncate(opts.max_length);
                    report.truncated += 1;
                }
                Truncation::KeepEnd => {
                    let cut = ex.len() - opts.max_length;
                    ex.input_ids.drain(..cut);
                    ex.loss_mask.drain(..cut);
                    report.truncated += 1;
                }
                Truncation::Drop => {
                    report.dropped_too_long += 1;
                    continue;
                }
                Truncation::Error => {
                    return Err(data_err(
                        path,
                        line,
                        format!(
                            "example has {} tokens, more than data.max_length = {} (data.truncation: error)",
                            ex.len(),
                            opts.max_length
                        ),
                    ))
                }
            }
        }
        if ex.n_targets() == 0 {
            report.dropped_no_target += 1;
            continue;
        }
        report.tokens += ex.len();
        report.target_tokens += ex.n_targets();
        examples.push(ex);
    }
    report.examples = examples.len();
    if examples.is_empty() {
        let msg = if report.rows == 0 {
            "dataset is empty (no rows)".to_string()
        } else {
            format!(
                "no usable example among {} rows ({} longer than max_length dropped, {} without any target token)",
                report.rows, report.dropped_too_long, report.dropped_no_target
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
        report,
    })
}
