//! Hooks for applications that embed the trainer: they observe and decide, the trainer acts.

use std::path::Path;

use crate::error::Result;
use crate::trainer::{EvalMetrics, StepMetrics};

/// What a callback asks of the trainer after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Control {
    #[default]
    Continue,
    /// Save a checkpoint now (if the trainer has an output directory), then continue.
    Save,
    /// Save a checkpoint and stop training after this step.
    Stop,
}

impl Control {
    /// The stronger of two requests (Stop > Save > Continue).
    pub fn max(self, other: Control) -> Control {
        use Control::*;
        match (self, other) {
            (Stop, _) | (_, Stop) => Stop,
            (Save, _) | (_, Save) => Save,
            _ => Continue,
        }
    }
}

pub trait Callback {
    /// Called once before the first step, with the state a resumed run continues from.
    fn on_train_begin(&mut self, _state: &crate::checkpoint::TrainerState) -> Result<()> {
        Ok(())
    }
    fn on_step_end(&mut self, _metrics: &StepMetrics) -> Result<Control> {
        Ok(Control::Continue)
    }
    fn on_eval_end(&mut self, _metrics: &EvalMetrics) -> Result<Control> {
        Ok(Control::Continue)
    }
    /// Called with a checkpoint's directory while it is still being written (before the rename
    /// that publishes it): files written here are part of the checkpoint.
    fn on_save(&mut self, _dir: &Path, _step: usize) -> Result<()> {
        Ok(())
    }
}

/// Stops training when the eval loss has not improved by more than `min_delta` for `patience`
/// evaluations in a row.
#[derive(Debug, Clone)]
pub struct EarlyStopping {
    pub patience: usize,
    pub min_delta: f64,
    best: Option<f64>,
    bad: usize,
}

impl EarlyStopping {
    pub fn new(patience: usize, min_delta: f64) -> Self {
        Self {
            patience,
            min_delta,
            best: None,
            bad: 0,
        }
    }
}

impl Callback for EarlyStopping {
    /// A resumed run keeps the best eval loss it had reached (the patience count restarts).
    fn on_train_begin(&mut self, state: &crate::checkpoint::TrainerState) -> Result<()> {
        self.best = state.best_eval_loss;
        Ok(())
    }
    fn on_eval_end(&mut self, m: &EvalMetrics) -> Result<Control> {
        match self.best {
            // An improvement must beat the best by more than min_delta (as transformers).
            Some(b) if m.eval_loss >= b - self.min_delta => {
                self.bad += 1;
                if self.bad >= self.patience {
                    tracing::info!(
                        step = m.step,
                        best = b,
                        "early stopping: eval loss stopped improving"
                    );
                    return Ok(Control::Stop);
                }
            }
            _ => {
                self.best = Some(m.eval_loss);
                self.bad = 0;
            }
        }
        Ok(Control::Continue)
    }
}
