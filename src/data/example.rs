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
    /// Token ids of the whole example, special tokens included.
    pub input_ids: Vec<u32>,
    /// `true` where the token at that position is a target of the loss; as long as `input_ids`.
    pub loss_mask: Vec<bool>,
}

impl Example {
    /// An example from its ids and mask; panics unless they have the same length.
    pub fn new(input_ids: Vec<u32>, loss_mask: Vec<bool>) -> Self {
        assert_eq!(input_ids.len(), loss_mask.len(), "one mask entry per token");
        Self {
            input_ids,
            loss_mask,
        }
    }
    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.input_ids.len()
    }
    /// Whether the example has no token.
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

/// The length policy and vocabulary bound a dataset is read with.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// Most tokens per example (`data.max_length`, lowered to the model's
    /// `max_position_embeddings` when that is smaller).
    pub max_length: usize,
    /// What happens to an example longer than `max_length`.
    pub truncation: Truncation,
    /// Token ids must be below this (the model's vocabulary size).
    pub vocab_size: usize,
}

/// Token examples and where each came from.
pub struct Dataset {
    /// The data path as the recipe gave it (a file, directory or glob).
    pub path: PathBuf,
    /// The examples kept, in the order of the rows they came from.
    pub examples: Vec<Example>,
    /// The row each example came from.
    pub origins: Vec<Loc>,
    /// What reading the dataset did: rows kept, dropped and truncated, token counts.
    pub report: DataReport,
}
