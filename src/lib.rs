//! # packsft
//!
//! Supervised fine-tuning of causal language models on candle, with padding-free packing:
//! the examples of a mini-batch are concatenated into one row, `position_ids` restart at 0 for
//! every example, the first token of each example is never a target, and attention runs per
//! sequence (`cu_seqlens`) so no example sees another.
//!
//! The plug points are the [`Collator`] and [`Model`] traits and the [`Trainer`] generic over
//! both: a library user can bring their own collator (building [`Batch`]es with
//! [`Batch::packed`] / [`Batch::padded`]), their own model, their own [`Callback`]s, or take
//! [`CompletionOnlyCollator`] and [`DecoderModel`] as the `packsft` command does.
//!
//! Logs go through [`tracing`]: install a subscriber (e.g. `tracing_subscriber::fmt().init()`)
//! to see them. `docs/ARCHITECTURE.md` walks from a dataset row to a gradient step, and each
//! folder of `src/` has a map (its `README.md`, the module documentation).
//!
//! Floors, top to bottom (a module imports only from floors below it, checked by
//! `tests/architecture.rs`): `cli` → `recipe` → `train` → `model` → `nn` → `collate` → `data` →
//! `dist` → `cuda` → `error`, `io`, `device`, `pullback`, `hub`.
#![warn(missing_docs)]

pub mod cli;
mod collate;
#[cfg(feature = "cuda")]
mod cuda;
mod data;
mod device;
mod dist;
mod error;
mod hub;
mod io;
mod model;
mod nn;
mod pullback;
mod recipe;
mod train;

pub use collate::{
    Batch, Collator, CompletionOnlyCollator, HostBatch, LossNormalization, SeqLayout, TrainBatch,
};
pub use data::tokenizer::TextTokenizer;
pub use data::{
    load_jsonl, DataLimits, DataReport, DataSpec, Dataset, Example, Format, LoadOptions, LossOn,
    Pipeline, TokenCache, TokenTemplate, Truncation,
};
pub use device::open as open_device;
pub use dist::{Collective, ReduceDtype, World, ZeroStage};
pub use error::{Error, Result};
pub use model::generate::{
    generate, generate_batch, generate_batch_ids, generate_ids, generation_config_eos,
    GenerateOptions, Sampling,
};
pub use model::lora::{merge as merge_lora, LoraConfig, LoraInit, MergeReport, Targets};
pub use model::{
    ArchSpec, BatchKvCache, ComputeOptions, DecoderModel, EvalSums, KvCache, LoraSetup, LossScale,
    LossSum, Model, Param,
};
pub use nn::attention::AttentionImpl;
pub use recipe::{MixSource, Recipe, TrainData};
pub use train::{
    evaluate, AdamWConfig, Callback, Control, DataParallel, EarlyStopping, EvalMetrics, EvalResult,
    EvalSample, EvalSampler, LrSchedule, PendingStep, Schedule, StepGrads, StepMetrics,
    TensorBoard, TrainSummary, Trainer, TrainerConfig, TrainerState,
};

/// Not part of the API: internals that the project's own integration tests, benches and GPU
/// checks reach (kernels against their references, checkpoint files, the optimizer alone). No
/// stability promise; a library user needs none of it.
#[doc(hidden)]
#[allow(missing_docs)]
pub mod internals {
    /// The fused CUDA kernels.
    #[cfg(feature = "cuda")]
    pub mod fused {
        pub use crate::cuda::*;
    }
    pub use crate::data::{masking, split_mask, template};
    /// Transports of multi-process runs.
    pub mod dist {
        pub use crate::dist::*;
    }
    /// Device names and CUDA set-up.
    pub mod device {
        pub use crate::device::*;
    }
    /// Hugging Face cache resolution.
    pub mod hub {
        pub use crate::hub::*;
    }
    pub use crate::model::{families, lora, weights};
    pub use crate::nn::{attention, graph, kernels, ops};
    pub use crate::train::{checkpoint, optimizer, parallel};
}
