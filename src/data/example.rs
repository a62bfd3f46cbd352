//! What the data room produces: an [`Example`] (token ids and which are targets), a [`Dataset`] of
//! them with the row each came from, and the length options they are read with.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::report::DataReport;
use super::source::Loc;

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

/// Token examples and where each came from.
pub struct Dataset {
    /// The data path as the recipe gave it (a file, directory or glob).
    pub path: PathBuf,
    pub examples: Vec<Example>,
    /// The row each example came from.
    pub origins: Vec<Loc>,
    pub report: DataReport,
}
