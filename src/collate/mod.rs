#![doc = include_str!("README.md")]

mod batch;
mod collator;

pub use batch::{Batch, HostBatch, LossNormalization, SeqLayout, TrainBatch};
pub use collator::{Collator, CompletionOnlyCollator};
