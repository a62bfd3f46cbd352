#![doc = include_str!("README.md")]

mod cadence;
pub mod callback;
pub mod checkpoint;
mod config;
mod eval;
pub mod lock;
mod metrics;
pub mod optimizer;
pub mod parallel;
pub mod plot;
pub mod readback;
mod sampler;
mod schedule;
mod step;
pub mod tensorboard;
mod trainer;

pub use callback::{Callback, Control, EarlyStopping};
pub use checkpoint::TrainerState;
pub use config::TrainerConfig;
pub use eval::{evaluate, EvalResult};
pub use metrics::{EvalMetrics, EvalSample, StepMetrics, TrainSummary};
pub use optimizer::AdamWConfig;
pub use parallel::DataParallel;
pub(crate) use sampler::data_hash;
pub(crate) use sampler::{epoch_order, step_sizes};
pub use schedule::{LrSchedule, Schedule};
pub use step::PendingStep;
pub use tensorboard::TensorBoard;
pub use trainer::{EvalSampler, StepGrads, Trainer};
