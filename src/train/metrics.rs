//! What a run reports: each step's and each evaluation's metrics (the lines of
//! `metrics.jsonl`), the summary `train` returns, the metrics file itself, and the progress bar
//! or log lines.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepMetrics {
    /// Optimizer steps done, this one included (1-based).
    pub step: usize,
    /// Epochs done, fractional: where the data position stands after this step.
    pub epoch: f64,
    /// Mean loss over the step's loss units (target tokens by default).
    pub loss: f64,
    /// The learning rate this step used.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// MoE router load-balancing loss (coefficient included), added to the objective.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// Real (non-pad) tokens of the step.
    pub tokens: usize,
    /// Target (supervised) tokens of the step.
    pub target_tokens: usize,
    /// Positions computed, pads included.
    pub positions: usize,
    /// Examples of the step.
    pub examples: usize,
    /// Real tokens per second of this step.
    pub tokens_per_s: f64,
    /// Seconds since training started (this process).
    pub elapsed_s: f64,
    /// The step's examples had no target token: nothing to learn from, so no update was made
    /// (loss and gradient norm are 0). Written only when true.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub skipped: bool,
    /// Data parallel: each rank's device time for its forward and backward passes in this
    /// step, by rank (the gradient sums and the update left out; on the CPU with ranks as
    /// threads, ZeRO 2's bucket sums during the backward are inside it). The same on every rank.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank_compute_s: Option<Vec<f64>>,
    /// Data parallel: (slowest - fastest) / slowest of `rank_compute_s`, the share of the
    /// slowest rank's compute time the fastest one waits for it at the gradient sums.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rank_spread: Option<f64>,
}

/// One evaluation's line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalMetrics {
    /// The optimizer step after which the evaluation ran.
    pub step: usize,
    /// Mean loss per target token of the eval set.
    pub eval_loss: f64,
    /// Arg-max token accuracy, where the model reports it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    /// Target tokens of the eval set.
    pub eval_tokens: usize,
    /// Greedy continuations of the first eval prompts (`Trainer::set_eval_sampler`); written
    /// only when there are some.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub samples: Vec<EvalSample>,
}

/// One eval prompt continued greedily by the model being trained, beside the eval set's answer.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalSample {
    /// The example's tokens before its first target, decoded.
    pub prompt: String,
    /// What the model writes after it (greedy, up to the sampler's token budget or EOS).
    pub completion: String,
    /// The example's own target tokens, decoded.
    pub reference: String,
}

/// What [`Trainer::train`](super::Trainer::train) did.
#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    /// Every step's metrics, in order.
    pub steps: Vec<StepMetrics>,
    /// Every evaluation's metrics, in order.
    pub evals: Vec<EvalMetrics>,
    /// A stop was requested (the stop flag or a callback's `Control::Stop`); the last
    /// checkpoint holds the state.
    pub stopped: bool,
    /// The stop flag ([`Trainer::stop_flag`](super::Trainer::stop_flag); the `packsft` command
    /// sets it on SIGINT/SIGTERM) ended the run, as opposed to a callback.
    pub interrupted: bool,
    /// Steps whose examples had no target token: skipped without an update (see
    /// [`StepMetrics::skipped`]).
    pub skipped_steps: usize,
    /// The newest checkpoint this run wrote.
    pub last_checkpoint: Option<PathBuf>,
}

/// metrics.jsonl: created fresh, or on resume cut back to the rows up to the resumed step
/// (rows a crashed run wrote after its last checkpoint are replayed, not duplicated).
pub(crate) struct MetricsFile {
    file: Option<(std::fs::File, PathBuf)>,
    rows: Vec<serde_json::Value>,
}

impl MetricsFile {
    pub fn open(dir: Option<&Path>, keep_up_to: usize) -> Result<Self> {
        let Some(dir) = dir else {
            return Ok(Self {
                file: None,
                rows: Vec::new(),
            });
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let p = dir.join("metrics.jsonl");
        // Opening follows links: a link planted here would have its target overwritten.
        if std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(Error::Training(format!(
                "{} is a symbolic link: refusing to write metrics through it",
                p.display()
            )));
        }
        let mut rows = Vec::new();
        if keep_up_to > 0 && p.exists() {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            // The kept lines go back as they were written (re-serialising the parsed floats
            // would rewrite some of them a digit off).
            let mut kept = String::new();
            for line in text.lines() {
                let Ok(r) = serde_json::from_str::<serde_json::Value>(line) else {
                    continue;
                };
                if r["step"].as_u64().is_some_and(|s| s as usize <= keep_up_to) {
                    kept.push_str(line);
                    kept.push('\n');
                    rows.push(r);
                }
            }
            crate::io::write_atomic(&p, kept.as_bytes())?;
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(keep_up_to > 0)
            .write(true)
            .truncate(keep_up_to == 0)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        Ok(Self {
            file: Some((file, p)),
            rows,
        })
    }

    pub fn write(&mut self, row: &serde_json::Value) -> Result<()> {
        if let Some((f, p)) = self.file.as_mut() {
            // One write of the whole line: a reader following the file (a test, `tail -f`)
            // never sees a row cut in two by the formatter's piecewise writes.
            f.write_all(format!("{row}\n").as_bytes())
                .and_then(|_| f.flush())
                .map_err(|e| Error::io(p.clone(), e))?;
        }
        self.rows.push(row.clone());
        Ok(())
    }

    pub fn rows_of(&self, key: &str) -> Vec<(usize, f64)> {
        self.rows
            .iter()
            .filter(|r| r.get("skipped").is_none())
            .filter_map(|r| Some((r["step"].as_u64()? as usize, r.get(key)?.as_f64()?)))
            .collect()
    }
}

/// The progress bar (when asked for and stderr is a terminal), else a log line every
/// `logging_steps` steps and at the last.
pub(crate) struct Progress {
    bar: Option<indicatif::ProgressBar>,
    logging_steps: usize,
    total: usize,
}

impl Progress {
    /// Progress of a run of `total` steps, `done` of them already (a resumed run).
    pub fn new(show_bar: bool, logging_steps: usize, total: usize, done: usize) -> Self {
        let bar = (show_bar && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            b.set_position(done as u64);
            b
        });
        Self {
            bar,
            logging_steps,
            total,
        }
    }

    /// Shows a finished step.
    pub fn step(&self, m: &StepMetrics) {
        match &self.bar {
            Some(b) => {
                b.set_message(format!("loss {:.4} | {:.0} tok/s", m.loss, m.tokens_per_s));
                b.inc(1);
            }
            None if m.step % self.logging_steps.max(1) == 0 || m.step == self.total => {
                tracing::info!(
                    step = m.step,
                    loss = format!("{:.4}", m.loss),
                    lr = format!("{:.3e}", m.lr),
                    grad_norm = format!("{:.3}", m.grad_norm),
                    tokens_per_s = format!("{:.0}", m.tokens_per_s),
                    "step"
                );
            }
            None => {}
        }
    }

    /// Shows an evaluation.
    pub fn eval(&self, e: &EvalMetrics) {
        tracing::info!(step = e.step, eval_loss = format!("{:.4}", e.eval_loss), eval_accuracy = ?e.eval_accuracy, "eval");
    }

    /// Ends the bar.
    pub fn finish(self) {
        if let Some(b) = self.bar {
            b.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_file_keeps_its_lines_byte_for_byte_and_drops_later_steps() {
        let dir = tempfile::tempdir().unwrap();
        let mut m = MetricsFile::open(Some(dir.path()), 0).unwrap();
        // Floats whose shortest form a parse and re-print can change.
        let mut x = 0.1f64;
        for step in 1..=200usize {
            x = (x * 1.618_033_988_749_895 + 0.3).fract() * 7.0 / 3.0;
            let row = serde_json::json!({"step": step, "loss": x, "lr": x / 3.0});
            m.write(&row).unwrap();
        }
        drop(m);
        let p = dir.path().join("metrics.jsonl");
        let before = std::fs::read_to_string(&p).unwrap();
        let m = MetricsFile::open(Some(dir.path()), 120).unwrap();
        assert_eq!(m.rows.len(), 120);
        let after = std::fs::read_to_string(&p).unwrap();
        let want: String = before.lines().take(120).map(|l| format!("{l}\n")).collect();
        assert_eq!(after, want);
    }

    #[cfg(unix)]
    #[test]
    fn a_planted_symbolic_link_is_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("precious.txt");
        std::fs::write(&target, "keep me").unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(&out).unwrap();
        std::os::unix::fs::symlink(&target, out.join("metrics.jsonl")).unwrap();
        for keep in [0, 5] {
            let e = MetricsFile::open(Some(&out), keep)
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains("is a symbolic link"), "{e}");
        }
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep me");
    }
}
