//! The collator trait and the collator of this crate: examples to [`Batch`]es, padded or
//! padding-free, loss on the tokens each example's mask marks.

use candle_core::Device;

use super::batch::{Batch, LossNormalization, TrainBatch};
use crate::data::Example;
use crate::error::Result;

/// Turns the examples of one micro-batch into a batch. The associated type ties a collator to
/// the models that can read its batches: `Trainer` does not compile with a mismatched pair.
pub trait Collator {
    /// The batch type this collator makes (and the models it feeds read).
    type Batch: TrainBatch;
    /// The batch of `examples` (one micro-batch) on `device`.
    fn collate(&self, examples: &[Example], device: &Device) -> Result<Self::Batch>;
}

/// Loss on the tokens marked in each example's `loss_mask` (completion, assistant turns, ...),
/// padded or padding-free: [`CompletionOnlyCollator::padding_free`] or
/// [`CompletionOnlyCollator::padded`].
#[derive(Debug, Clone)]
pub struct CompletionOnlyCollator {
    /// One row of examples back to back ([`Batch::packed`]), or one example a row
    /// ([`Batch::padded`]).
    pub padding_free: bool,
    /// The id pads are filled with (padded mode).
    pub pad_token_id: u32,
    /// Padded mode: round the row length up to a multiple of this.
    pub pad_to_multiple_of: Option<usize>,
    /// What the loss of a step is the mean of.
    pub normalization: LossNormalization,
}

impl CompletionOnlyCollator {
    /// Padding-free batches (TRL's `padding_free=True`); `pad_token_id` is kept for a switch to
    /// padded batches.
    pub fn padding_free(pad_token_id: u32) -> Self {
        Self {
            padding_free: true,
            pad_token_id,
            pad_to_multiple_of: None,
            normalization: LossNormalization::Tokens,
        }
    }

    /// Padded batches, right-padded with `pad_token_id`.
    pub fn padded(pad_token_id: u32) -> Self {
        Self {
            padding_free: false,
            ..Self::padding_free(pad_token_id)
        }
    }
}

impl Collator for CompletionOnlyCollator {
    type Batch = Batch;

    fn collate(&self, examples: &[Example], device: &Device) -> Result<Batch> {
        if self.padding_free {
            Batch::packed(examples, self.normalization, device)
        } else {
            Batch::padded(
                examples,
                self.pad_token_id,
                self.pad_to_multiple_of,
                self.normalization,
                device,
            )
        }
    }
}
