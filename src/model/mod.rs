//! Models: the `Model` trait the trainer drives, and the decoder implementations.

pub mod llama;
pub mod weights;

use std::path::Path;

use candle_core::{Tensor, Var};

use crate::collator::TrainBatch;
use crate::error::Result;

pub use llama::{LlamaConfig, LlamaModel};

/// A trainable parameter under its Hugging Face name.
#[derive(Debug, Clone)]
pub struct Param {
    pub name: String,
    pub var: Var,
    /// Whether AdamW's weight decay applies (not to biases and norm weights, as in transformers).
    pub decay: bool,
}

/// The summed loss of a batch and the number of target tokens it sums over. Summing (not
/// averaging) lets the trainer normalise by the targets of the whole optimizer step, so padded,
/// padding-free and accumulated runs agree exactly.
#[derive(Debug, Clone)]
pub struct LossSum {
    pub sum: Tensor,
    pub n_tokens: usize,
}

/// What the trainer needs of a model. `Batch` is the collated type the model reads: a collator
/// producing another type does not fit this model, and `Trainer` rejects the pair at compile time.
pub trait Model {
    type Batch: TrainBatch;
    /// Summed negative log-likelihood over the batch's target tokens.
    fn loss(&self, batch: &Self::Batch) -> Result<LossSum>;
    /// Every trainable parameter, in a stable order.
    fn params(&self) -> &[Param];
    /// Writes the model in Hugging Face layout (config.json + safetensors) into `dir`.
    fn save(&self, dir: &Path) -> Result<()>;
}
