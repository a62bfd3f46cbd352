//! # packsft
//!
//! Supervised fine-tuning of causal language models on candle, with padding-free packing:
//! the examples of a mini-batch are concatenated into one row, `position_ids` restart at 0 for
//! every example, the first token of each example is never a target, and attention runs per
//! sequence (`cu_seqlens`) so no example sees another.
//!
//! The plug points are the [`Collator`] and [`Model`] traits and the [`Trainer`] generic over
//! both; see `docs/ARCHITECTURE.md` for the data flow from a dataset row to a gradient step.

pub mod app;
pub mod attention;
pub mod bench;
pub mod callback;
pub mod checkpoint;
pub mod collator;
pub mod data;
pub mod device;
pub mod error;
#[cfg(feature = "flash-attn")]
pub mod flash;
#[cfg(feature = "cuda")]
pub mod fused;
pub mod generate;
pub mod inspect;
pub mod io;
pub mod masking;
pub mod model;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod pretok;
pub mod recipe;
pub mod source;
pub mod streams;
pub mod template;
pub mod tokenizer;
pub mod trainer;
pub mod vjp;

pub use collator::{
    Batch, Collator, CompletionOnlyCollator, HostBatch, LossNormalization, SeqLayout, TrainBatch,
};
pub use data::{Dataset, Example, Truncation};
pub use error::{Error, Result};
pub use model::{ArchSpec, DecoderModel, LossScale, LossSum, Model, Param};
pub use recipe::Recipe;
pub use tokenizer::TextTokenizer;
pub use trainer::{Trainer, TrainerConfig};
