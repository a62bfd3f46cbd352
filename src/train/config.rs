//! The trainer's configuration and the one set of training defaults.

use std::path::PathBuf;

use super::optimizer::AdamWConfig;
use super::schedule::{LrSchedule, Schedule};

/// How [`Trainer`](super::Trainer) trains: batching, the optimizer and its schedule, when to log,
/// evaluate and save. `Default` holds the one set of training defaults; a recipe's `train:`
/// section starts from it (TRL's `SFTConfig` defaults where TRL has one).
#[derive(Debug, Clone)]
pub struct TrainerConfig {
    /// Examples per micro-batch (ignored when `max_tokens_per_batch` is set).
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Token budget per micro-batch: examples are added in order while the batch's computed
    /// positions (pads included) stay within it; at least one example per micro-batch.
    pub max_tokens_per_batch: Option<usize>,
    /// Optimizer steps; 0 means `epochs` passes.
    pub max_steps: usize,
    /// Passes over the data when `max_steps` is 0.
    pub epochs: usize,
    /// AdamW's learning rate (the schedule's peak), betas, epsilon and weight decay.
    pub adamw: AdamWConfig,
    /// The learning-rate schedule after warmup.
    pub schedule: Schedule,
    /// Linear warmup steps (0: `warmup_ratio` decides).
    pub warmup_steps: usize,
    /// Warmup as a fraction of the total steps (rounded up), used when `warmup_steps` is 0.
    pub warmup_ratio: f64,
    /// Floor of `cosine_with_min_lr` and `warmup_stable_decay`, as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Warmup-stable-decay: fraction of the total steps spent decaying.
    pub decay_ratio: f64,
    /// Global gradient-norm clip (`clip_grad_norm_`); 0 disables clipping.
    pub max_grad_norm: f64,
    /// Seed of the data order (and of nothing else the trainer draws).
    pub seed: u64,
    /// Shuffle the examples every epoch (seed + epoch).
    pub shuffle: bool,
    /// Shuffle, then sort each window of 50 steps' examples by length (transformers'
    /// `group_by_length`): less padding in padded mode, similar lengths per micro-batch.
    pub group_by_length: bool,
    /// Log a line every this many steps when no progress bar is shown.
    pub logging_steps: usize,
    /// Evaluate every this many steps (0: only at the end); needs an eval set.
    pub eval_steps: usize,
    /// Save a checkpoint every this many steps (0: never, except on stop requests).
    pub save_steps: usize,
    /// Keep only the newest N checkpoints.
    pub save_total_limit: Option<usize>,
    /// Where metrics.jsonl, checkpoints and loss.png go; None keeps everything in memory.
    pub output_dir: Option<PathBuf>,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
    /// Enqueue each step before the previous one is reported, so the device never waits for
    /// the host (None: on a GPU). A callback's `Save` or `Stop` from `on_step_end` then takes
    /// effect after the step already enqueued; eval, save and last steps are never overlapped.
    pub overlap_steps: Option<bool>,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            grad_accum: 1,
            max_tokens_per_batch: None,
            max_steps: 0,
            epochs: 1,
            adamw: AdamWConfig::default(),
            schedule: Schedule::Linear,
            warmup_steps: 0,
            warmup_ratio: 0.0,
            min_lr_ratio: 0.0,
            decay_ratio: 0.1,
            max_grad_norm: 1.0,
            seed: 42,
            shuffle: true,
            group_by_length: false,
            logging_steps: 10,
            eval_steps: 0,
            save_steps: 0,
            save_total_limit: None,
            output_dir: None,
            progress: true,
            overlap_steps: None,
        }
    }
}

impl TrainerConfig {
    /// The learning-rate schedule of a run of `total` optimizer steps.
    pub fn schedule(&self, total: usize) -> LrSchedule {
        let warmup = if self.warmup_steps > 0 {
            self.warmup_steps
        } else {
            (self.warmup_ratio * total as f64).ceil() as usize
        };
        LrSchedule {
            kind: self.schedule,
            peak: self.adamw.lr,
            warmup_steps: warmup,
            total_steps: total,
            min_lr_ratio: self.min_lr_ratio,
            decay_steps: (self.decay_ratio * total as f64).round() as usize,
        }
    }
}
