//! Hooks for applications that embed the trainer: they observe and decide, the trainer acts.

use std::path::Path;

use super::checkpoint::TrainerState;
use super::metrics::{EvalMetrics, StepMetrics};
use crate::error::Result;

/// What a callback asks of the trainer after an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Control {
    /// Nothing to do: training goes on.
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

/// Hooks the trainer calls at its events; a callback observes and decides (through [`Control`]),
/// the trainer acts. `Send`, so a trainer with its callbacks can move to another thread.
pub trait Callback: Send {
    /// Called when a run resumes from `dir` (a checkpoint this trainer wrote), before
    /// `on_train_begin`: a callback reads back here what its `on_save` wrote.
    fn on_resume(&mut self, _dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Called once before the first step, with the state a resumed run continues from.
    fn on_train_begin(&mut self, _state: &TrainerState) -> Result<()> {
        Ok(())
    }
    /// Called after each step. On a GPU the trainer has usually enqueued the next step by then
    /// (`TrainerConfig::overlap_steps`): a `Save` or `Stop` returned here takes effect after
    /// that step, whose update is already done. Steps that evaluate or save are never overlapped.
    fn on_step_end(&mut self, _metrics: &StepMetrics) -> Result<Control> {
        Ok(Control::Continue)
    }
    /// Called after each evaluation of the eval set during training, with its metrics.
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
/// evaluations in a row. Its best loss and count travel with checkpoints
/// (`early_stopping.json`), as transformers keeps its callback's state, so a resumed run stops
/// where the uninterrupted one would.
#[derive(Debug, Clone)]
pub struct EarlyStopping {
    /// Evaluations in a row without improvement after which training stops.
    pub patience: usize,
    /// An eval loss must be more than this below the best to count as an improvement.
    pub min_delta: f64,
    best: Option<f64>,
    bad: usize,
    restored: bool,
}

/// What `EarlyStopping` keeps in a checkpoint.
#[derive(serde::Serialize, serde::Deserialize)]
struct EarlyStoppingState {
    best: Option<f64>,
    evals_without_improvement: usize,
}

pub const EARLY_STOPPING_FILE: &str = "early_stopping.json";

impl EarlyStopping {
    /// A callback with no best loss yet (a resumed run restores it from the checkpoint).
    pub fn new(patience: usize, min_delta: f64) -> Self {
        Self {
            patience,
            min_delta,
            best: None,
            bad: 0,
            restored: false,
        }
    }
}

impl Callback for EarlyStopping {
    fn on_resume(&mut self, dir: &Path) -> Result<()> {
        let path = dir.join(EARLY_STOPPING_FILE);
        // Checkpoints written without this callback have no file: on_train_begin falls back
        // to the trainer's best loss.
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Ok(());
        };
        let s: EarlyStoppingState = serde_json::from_str(&text)
            .map_err(|e| crate::error::Error::Training(format!("{}: {e}", path.display())))?;
        self.best = s.best;
        self.bad = s.evals_without_improvement;
        self.restored = true;
        Ok(())
    }
    /// A resumed run without saved early-stopping state keeps the best eval loss it had reached.
    fn on_train_begin(&mut self, state: &crate::train::checkpoint::TrainerState) -> Result<()> {
        if !self.restored {
            self.best = state.best_eval_loss;
        }
        Ok(())
    }
    fn on_save(&mut self, dir: &Path, _step: usize) -> Result<()> {
        let s = EarlyStoppingState {
            best: self.best,
            evals_without_improvement: self.bad,
        };
        crate::io::write_atomic(
            &dir.join(EARLY_STOPPING_FILE),
            serde_json::to_string(&s)
                .expect("state serialises")
                .as_bytes(),
        )
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
