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
        /// Sequence starts and the total, `[0, len0, len0 + len1, ...]`.
        cu_seqlens: Vec<usize>,
        /// The longest sequence.
        max_seqlen: usize,
    },
    /// One sequence a row, right-padded to the row length; `lengths[b]` real tokens in row `b`.
    Padded {
        /// Real tokens of each row.
        lengths: Vec<usize>,
    },
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

/// A collated batch for the decoder models of this crate. Built only by [`Batch::packed`] and
/// [`Batch::padded`] from examples, so its fields always agree (the sequence boundaries, the
/// shifted targets, the counts and the host copy); models read it through the accessors.
#[derive(Debug, Clone)]
pub struct Batch {
    input_ids: Tensor,
    position_ids: Tensor,
    layout: SeqLayout,
    cu_seqlens: Option<Tensor>,
    target_rows: Tensor,
    target_ids: Tensor,
    target_weights: Option<Tensor>,
    loss_units: f64,
    n_targets: usize,
    n_tokens: usize,
    rows: usize,
    row_len: usize,
    /// The largest input id and its (row, column), for the vocabulary check.
    max_input_id: (u32, usize, usize),
    host: HostBatch,
}

/// A batch as transformers and TRL lay it out (labels unshifted, -100 where no loss).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HostBatch {
    /// Token ids, one vector per row (padded rows with the pad id).
    pub input_ids: Vec<Vec<u32>>,
    /// Position ids, restarting at 0 for every sequence.
    pub position_ids: Vec<Vec<u32>>,
    /// Unshifted labels: the token where it carries loss, -100 elsewhere.
    pub labels: Vec<Vec<i64>>,
    /// Padded batches: 1 for real tokens, 0 for pads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_mask: Option<Vec<Vec<u8>>>,
    /// Padding-free batches: where each sequence starts, and the total.
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

/// The weights of each target and the loss units under `normalization`.
fn target_weights(
    examples: &[Example],
    n_targets: usize,
    normalization: LossNormalization,
    device: &Device,
) -> Result<(Option<Tensor>, f64)> {
    Ok(match normalization {
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
    })
}

fn check_examples(examples: &[Example]) -> Result<()> {
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
    if let Some(i) = examples
        .iter()
        .position(|e| e.loss_mask.len() != e.input_ids.len())
    {
        return Err(Error::Config(format!(
            "example {i} of the batch has {} ids but {} mask entries",
            examples[i].input_ids.len(),
            examples[i].loss_mask.len()
        )));
    }
    Ok(())
}

impl Batch {
    /// The padding-free batch of `examples`: one row, the examples back to back, position ids
    /// restarting at 0 for every example, `cu_seqlens` at their starts; targets shifted inside
    /// each example (row `t` predicts token `t + 1` of the same example), so an example's first
    /// token is never a target and no target crosses into the next example.
    pub fn packed(
        examples: &[Example],
        normalization: LossNormalization,
        device: &Device,
    ) -> Result<Batch> {
        check_examples(examples)?;
        let n_tokens: usize = examples.iter().map(Example::len).sum();
        let (mut target_rows, mut target_ids) = (Vec::new(), Vec::new());
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
        let targets = (target_rows, target_ids);
        Self::assemble(
            examples,
            host,
            layout,
            (1, n_tokens),
            targets,
            normalization,
            device,
        )
    }

    /// The padded batch of `examples`: one example a row, right-padded with `pad_token_id` to
    /// the longest (rounded up to a multiple of `pad_to_multiple_of`); pads are never targets
    /// and never attended to.
    pub fn padded(
        examples: &[Example],
        pad_token_id: u32,
        pad_to_multiple_of: Option<usize>,
        normalization: LossNormalization,
        device: &Device,
    ) -> Result<Batch> {
        check_examples(examples)?;
        let longest = examples.iter().map(Example::len).max().unwrap_or(0);
        let row_len = match pad_to_multiple_of {
            Some(m) if m > 1 => longest.div_ceil(m) * m,
            _ => longest,
        };
        let (mut target_rows, mut target_ids) = (Vec::new(), Vec::new());
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
            ids.extend(std::iter::repeat_n(pad_token_id, pad));
            let mut labels: Vec<i64> = hf_labels(ex).collect();
            labels.extend(std::iter::repeat_n(-100, pad));
            let mut mask = vec![1u8; ex.len()];
            mask.extend(std::iter::repeat_n(0, pad));
            host.input_ids.push(ids);
            // Pads continue counting like transformers' default arange positions; they are
            // masked as keys and never targets, so their value does not matter.
            host.position_ids.push((0..row_len as u32).collect());
            host.labels.push(labels);
            host.attention_mask.as_mut().unwrap().push(mask);
        }
        let layout = SeqLayout::Padded {
            lengths: examples.iter().map(Example::len).collect(),
        };
        let targets = (target_rows, target_ids);
        let shape = (examples.len(), row_len);
        Self::assemble(
            examples,
            host,
            layout,
            shape,
            targets,
            normalization,
            device,
        )
    }

    /// The tensors and counts of a batch from its host layout and shifted targets.
    fn assemble(
        examples: &[Example],
        host: HostBatch,
        layout: SeqLayout,
        (rows, row_len): (usize, usize),
        (target_rows, target_ids): (Vec<u32>, Vec<u32>),
        normalization: LossNormalization,
        device: &Device,
    ) -> Result<Batch> {
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
        let mut max_input_id = (0u32, 0usize, 0usize);
        for (r, row) in host.input_ids.iter().enumerate() {
            for (c, &id) in row.iter().enumerate() {
                if id > max_input_id.0 {
                    max_input_id = (id, r, c);
                }
            }
        }
        let n_targets = target_rows.len();
        let (target_weights, loss_units) =
            target_weights(examples, n_targets, normalization, device)?;
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
            n_tokens: examples.iter().map(Example::len).sum(),
            rows,
            row_len,
            max_input_id,
            host,
        })
    }

    /// (rows, row_len) u32 token ids.
    pub fn input_ids(&self) -> &Tensor {
        &self.input_ids
    }
    /// (rows, row_len) u32 position ids, restarting at 0 for every sequence.
    pub fn position_ids(&self) -> &Tensor {
        &self.position_ids
    }
    /// Where each sequence lives, as the attention honours it.
    pub fn layout(&self) -> &SeqLayout {
        &self.layout
    }
    /// Padding-free only: `cu_seqlens` as a u32 tensor on the batch's device, for kernels.
    pub fn cu_seqlens(&self) -> Option<&Tensor> {
        self.cu_seqlens.as_ref()
    }
    /// (n_targets,) u32: the flattened `row * row_len + column` of every position that carries
    /// loss.
    pub fn target_rows(&self) -> &Tensor {
        &self.target_rows
    }
    /// (n_targets,) u32: the token each of those positions must predict.
    pub fn target_ids(&self) -> &Tensor {
        &self.target_ids
    }
    /// (n_targets,) f32 weight of each target in the summed loss; `None` means all 1.
    pub fn target_weights(&self) -> Option<&Tensor> {
        self.target_weights.as_ref()
    }
    /// Tokens that carry loss.
    pub fn n_targets(&self) -> usize {
        self.n_targets
    }
    /// Real (non-pad) tokens.
    pub fn n_tokens(&self) -> usize {
        self.n_tokens
    }
    /// What the summed loss is divided by (see [`TrainBatch::loss_units`]).
    pub fn loss_units(&self) -> f64 {
        self.loss_units
    }
    /// Rows of the batch (1 when padding-free).
    pub fn rows(&self) -> usize {
        self.rows
    }
    /// Positions per row, pads included.
    pub fn row_len(&self) -> usize {
        self.row_len
    }
    /// Host copies in Hugging Face's field layout, for dumps and comparisons.
    pub fn host(&self) -> &HostBatch {
        &self.host
    }

    /// An error naming the largest input id, its row and position, when it is not a row of a
    /// vocabulary of `vocab` tokens. Every target is an input id of the next position, so this
    /// covers targets too. Kernels that trust their indices need it (the GPU gather and
    /// cross-entropy would read outside the table).
    pub fn check_vocab(&self, vocab: usize) -> Result<()> {
        let (id, r, c) = self.max_input_id;
        if id as usize >= vocab {
            return Err(Error::Config(format!(
                "batch row {r}, position {c}: input id {id} is outside the model's vocabulary (size {vocab})"
            )));
        }
        Ok(())
    }
}
