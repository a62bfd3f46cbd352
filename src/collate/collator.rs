//! Examples to batches: the padding-free layout and the padded one.
//!
//! Padding-free (transformers' `DataCollatorWithFlattening`, TRL's `padding_free=True`):
//! ```text
//! examples   A = [a0 a1 a2 a3] (loss on a2 a3)      B = [b0 b1 b2] (loss on b1 b2)
//! input_ids    = [a0 a1 a2 a3 b0 b1 b2]
//! position_ids = [ 0  1  2  3  0  1  2]
//! labels (HF)  = [-100 -100 a2 a3 -100 b1 b2]      the first token of an example is never a target
//! cu_seqlens   = [0, 4, 7], max_seqlen = 4
//! ```
//! Internally targets are already shifted: row `t` predicts token `t+1` of the same sequence, so
//! no target can cross a sequence boundary by construction. `target_rows` lists the rows that
//! carry loss and `target_ids` the token each one must predict.

use candle_core::{Device, Tensor};

use crate::data::Example;
use crate::error::{Error, Result};

/// How the tokens of a batch are laid out, as the attention needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SeqLayout {
    /// One row of sequences back to back; sequence `i` is `cu_seqlens[i]..cu_seqlens[i+1]`.
    Packed {
        cu_seqlens: Vec<usize>,
        max_seqlen: usize,
    },
    /// One sequence a row, right-padded to the row length; `lengths[b]` real tokens in row `b`.
    Padded { lengths: Vec<usize> },
}

/// What the loss of an optimizer step is the mean of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LossNormalization {
    /// Mean over all target tokens of the step (transformers' and TRL's default).
    #[default]
    Tokens,
    /// Mean over the sequences of the step of each sequence's mean over its target tokens.
    Sequences,
}

/// What the trainer needs to know of any batch, whatever the model.
pub trait TrainBatch {
    /// What the summed loss is divided by, summed over a step: target tokens, or sequences with
    /// at least one target, as the collator's `LossNormalization` says.
    fn loss_units(&self) -> f64;
    /// Tokens that carry loss.
    fn n_targets(&self) -> usize;
    /// Real (non-pad) tokens.
    fn n_tokens(&self) -> usize;
    /// Positions computed, pads included.
    fn n_positions(&self) -> usize;
}

/// A collated batch for the decoder models of this crate.
#[derive(Debug, Clone)]
pub struct Batch {
    /// (rows, row_len) u32
    pub input_ids: Tensor,
    /// (rows, row_len) u32, restarting at 0 for every sequence
    pub position_ids: Tensor,
    pub layout: SeqLayout,
    /// Padding-free only: `cu_seqlens` as a u32 tensor on the batch's device, for kernels.
    pub cu_seqlens: Option<Tensor>,
    /// (n_targets,) u32: flattened row*row_len+col index of every position that carries loss
    pub target_rows: Tensor,
    /// (n_targets,) u32: the token each of those positions must predict
    pub target_ids: Tensor,
    /// (n_targets,) f32 weight of each target in the summed loss; None means all 1.
    pub target_weights: Option<Tensor>,
    pub loss_units: f64,
    pub n_targets: usize,
    pub n_tokens: usize,
    pub rows: usize,
    pub row_len: usize,
    /// Host copies in Hugging Face's field layout, for dumps and comparisons.
    pub host: HostBatch,
}

/// A batch as transformers and TRL lay it out (labels unshifted, -100 where no loss).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostBatch {
    pub input_ids: Vec<Vec<u32>>,
    pub position_ids: Vec<Vec<u32>>,
    pub labels: Vec<Vec<i64>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_mask: Option<Vec<Vec<u8>>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cu_seq_lens: Option<Vec<usize>>,
}

impl TrainBatch for Batch {
    fn loss_units(&self) -> f64 {
        self.loss_units
    }
    fn n_targets(&self) -> usize {
        self.n_targets
    }
    fn n_tokens(&self) -> usize {
        self.n_tokens
    }
    fn n_positions(&self) -> usize {
        self.rows * self.row_len
    }
}

/// Turns the examples of one micro-batch into a batch. The associated type ties a collator to
/// the models that can read its batches: `Trainer` does not compile with a mismatched pair.
pub trait Collator {
    type Batch: TrainBatch;
    fn collate(&self, examples: &[Example], device: &Device) -> Result<Self::Batch>;
}

/// Loss on the tokens marked in each example's `loss_mask` (completion, assistant turns, ...),
/// padded or padding-free.
#[derive(Debug, Clone)]
pub struct CompletionOnlyCollator {
    pub padding_free: bool,
    pub pad_token_id: u32,
    /// Padded mode: round the row length up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    pub normalization: LossNormalization,
}

impl CompletionOnlyCollator {
    pub fn new(padding_free: bool, pad_token_id: u32) -> Self {
        Self {
            padding_free,
            pad_token_id,
            pad_to_multiple_of: None,
            normalization: LossNormalization::Tokens,
        }
    }
}

/// Appends the shifted targets of one example starting at flattened offset `base`.
fn push_targets(ex: &Example, base: usize, rows: &mut Vec<u32>, ids: &mut Vec<u32>) {
    for t in 0..ex.len().saturating_sub(1) {
        if ex.loss_mask[t + 1] {
            rows.push((base + t) as u32);
            ids.push(ex.input_ids[t + 1]);
        }
    }
}

/// Labels in HF layout: the token itself where it carries loss, -100 elsewhere and always at
/// an example's first token.
fn hf_labels(ex: &Example) -> impl Iterator<Item = i64> + '_ {
    ex.input_ids
        .iter()
        .zip(&ex.loss_mask)
        .enumerate()
        .map(|(t, (&id, &m))| if t > 0 && m { id as i64 } else { -100 })
}

impl Collator for CompletionOnlyCollator {
    type Batch = Batch;

    fn collate(&self, examples: &[Example], device: &Device) -> Result<Batch> {
        if examples.is_empty() {
            return Err(Error::Config(
                "cannot collate an empty list of examples".into(),
            ));
        }
        if let Some(i) = examples.iter().position(|e| e.is_empty()) {
            return Err(Error::Config(format!(
                "example {i} of the batch has no tokens"
            )));
        }
        let n_tokens: usize = examples.iter().map(Example::len).sum();
        let mut target_rows = Vec::new();
        let mut target_ids = Vec::new();
        let (host, layout, rows, row_len) = if self.padding_free {
            let mut ids = Vec::with_capacity(n_tokens);
            let mut pos = Vec::with_capacity(n_tokens);
            let mut labels = Vec::with_capacity(n_tokens);
            let mut cu = vec![0usize];
            for ex in examples {
                let base = ids.len();
                push_targets(ex, base, &mut target_rows, &mut target_ids);
                ids.extend_from_slice(&ex.input_ids);
                pos.extend(0..ex.len() as u32);
                labels.extend(hf_labels(ex));
                cu.push(ids.len());
            }
            let max_seqlen = examples.iter().map(Example::len).max().unwrap_or(0);
            let host = HostBatch {
                input_ids: vec![ids],
                position_ids: vec![pos],
                labels: vec![labels],
                attention_mask: None,
                cu_seq_lens: Some(cu.clone()),
            };
            let layout = SeqLayout::Packed {
                cu_seqlens: cu,
                max_seqlen,
            };
            (host, layout, 1, n_tokens)
        } else {
            let longest = examples.iter().map(Example::len).max().unwrap_or(0);
            let row_len = match self.pad_to_multiple_of {
                Some(m) if m > 1 => longest.div_ceil(m) * m,
                _ => longest,
            };
            let mut host = HostBatch {
                input_ids: Vec::new(),
                position_ids: Vec::new(),
                labels: Vec::new(),
                attention_mask: Some(Vec::new()),
                cu_seq_lens: None,
            };
            for (b, ex) in examples.iter().enumerate() {
                push_targets(ex, b * row_len, &mut target_rows, &mut target_ids);
                let pad = row_len - ex.len();
                let mut ids = ex.input_ids.clone();
                ids.extend(std::iter::repeat_n(self.pad_token_id, pad));
                let mut labels: Vec<i64> = hf_labels(ex).collect();
                labels.extend(std::iter::repeat_n(-100, pad));
                let mut mask = vec![1u8; ex.len()];
                mask.extend(std::iter::repeat_n(0, pad));
                host.input_ids.push(ids);
                // Pads continue counting like transformers' default arange positions; they
                // are masked as keys and never targets, so their value does not matter.
                host.position_ids.push((0..row_len as u32).collect());
                host.labels.push(labels);
                host.attention_mask.as_mut().unwrap().push(mask);
            }
            let layout = SeqLayout::Padded {
                lengths: examples.iter().map(Example::len).collect(),
            };
            (host, layout, examples.len(), row_len)
        };
        let flat = |v: &Vec<Vec<u32>>| -> Vec<u32> { v.iter().flatten().copied().collect() };
        let input_ids = Tensor::from_vec(flat(&host.input_ids), (rows, row_len), device)?;
        let position_ids = Tensor::from_vec(flat(&host.position_ids), (rows, row_len), device)?;
        let cu_seqlens = match &layout {
            SeqLayout::Packed { cu_seqlens, .. } => Some(Tensor::from_vec(
                cu_seqlens.iter().map(|&c| c as u32).collect::<Vec<_>>(),
                cu_seqlens.len(),
                device,
            )?),
            SeqLayout::Padded { .. } => None,
        };
        let n_targets = target_rows.len();
        let (target_weights, loss_units) = match self.normalization {
            LossNormalization::Tokens => (None, n_targets as f64),
            LossNormalization::Sequences => {
                let mut w = Vec::with_capacity(n_targets);
                let mut units = 0.0;
                for ex in examples {
                    let n = ex.n_targets();
                    if n > 0 {
                        w.extend(std::iter::repeat_n(1.0f32 / n as f32, n));
                        units += 1.0;
                    }
                }
                (Some(Tensor::from_vec(w, n_targets, device)?), units)
            }
        };
        Ok(Batch {
            input_ids,
            position_ids,
            layout,
            cu_seqlens,
            target_rows: Tensor::from_vec(target_rows, n_targets, device)?,
            target_ids: Tensor::from_vec(target_ids, n_targets, device)?,
            target_weights,
            loss_units,
            n_targets,
            n_tokens,
            rows,
            row_len,
            host,
        })
    }
}
