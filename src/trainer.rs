//! The training loop: sample the examples of each optimizer step, collate micro-batches, sum
//! losses, normalise by the target tokens of the whole step, backward, clip, AdamW, schedule.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{backprop::GradStore, Device};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::collator::{Collator, TrainBatch};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::optim::{accumulate, clip_grad_norm, AdamW, AdamWConfig, LrSchedule, Schedule};

#[derive(Debug, Clone)]
pub struct TrainerConfig {
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Optimizer steps; 0 means `epochs` passes.
    pub max_steps: usize,
    pub epochs: usize,
    pub adamw: AdamWConfig,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub shuffle: bool,
    pub logging_steps: usize,
    pub eval_steps: usize,
    /// Where metrics.jsonl goes; None keeps metrics in memory only.
    pub output_dir: Option<PathBuf>,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

impl Default for TrainerConfig {
    fn default() -> Self {
        Self {
            batch_size: 8,
            grad_accum: 1,
            max_steps: 0,
            epochs: 1,
            adamw: AdamWConfig::default(),
            schedule: Schedule::Linear,
            warmup_steps: 0,
            max_grad_norm: 1.0,
            seed: 42,
            shuffle: true,
            logging_steps: 10,
            eval_steps: 0,
            output_dir: None,
            progress: true,
        }
    }
}

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: f64,
    /// Mean loss per target token over the whole optimizer step.
    pub loss: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Real (non-pad) tokens of the step.
    pub tokens: usize,
    pub target_tokens: usize,
    /// Positions computed, pads included.
    pub positions: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalMetrics {
    pub step: usize,
    pub eval_loss: f64,
    pub eval_tokens: usize,
}

#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    pub steps: Vec<StepMetrics>,
    pub evals: Vec<EvalMetrics>,
}

/// The result of one forward/backward over the examples of an optimizer step.
pub struct StepGrads {
    pub grads: GradStore,
    /// Summed loss over all target tokens of the step.
    pub loss_sum: f64,
    pub target_tokens: usize,
    pub tokens: usize,
    pub positions: usize,
}

/// Drives `M` with batches from `C`; the two must agree on the batch type.
pub struct Trainer<M: Model, C: Collator<Batch = M::Batch>> {
    pub model: M,
    pub collator: C,
    pub config: TrainerConfig,
    pub device: Device,
    optimizer: AdamW,
}

/// The order in which examples are visited: a seeded shuffle per epoch (seed + epoch), so a
/// run is reproducible and each epoch differs.
pub fn epoch_order(n: usize, epoch: usize, seed: u64, shuffle: bool) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed.wrapping_add(epoch as u64));
        idx.shuffle(&mut rng);
    }
    idx
}

impl<M: Model, C: Collator<Batch = M::Batch>> Trainer<M, C> {
    pub fn new(model: M, collator: C, config: TrainerConfig, device: Device) -> Result<Self> {
        let optimizer = AdamW::new(model.params(), config.adamw)?;
        Ok(Self {
            model,
            collator,
            config,
            device,
            optimizer,
        })
    }

    /// Optimizer steps a run over `n` examples takes.
    pub fn total_steps(&self, n: usize) -> usize {
        if self.config.max_steps > 0 {
            self.config.max_steps
        } else {
            self.config.epochs * n.div_ceil(self.examples_per_step())
        }
    }

    pub fn examples_per_step(&self) -> usize {
        self.config.batch_size * self.config.grad_accum
    }

    /// Gradients of the mean loss over the target tokens of *all* `examples` (one optimizer
    /// step), computed micro-batch by micro-batch: each micro-batch's summed loss is divided by
    /// the step's total, so any split of the same examples gives the same gradients.
    pub fn step_grads(&self, examples: &[Example]) -> Result<StepGrads> {
        let batches = examples
            .chunks(self.config.batch_size)
            .map(|mb| self.collator.collate(mb, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let target_tokens: usize = batches.iter().map(|b| b.n_targets()).sum();
        let tokens = batches.iter().map(|b| b.n_tokens()).sum();
        let positions = batches.iter().map(|b| b.n_positions()).sum();
        let mut acc = None;
        let mut loss_sum = 0f64;
        for b in &batches {
            if b.n_targets() == 0 {
                continue;
            }
            let l = self.model.loss(b)?;
            loss_sum += l.sum.to_scalar::<f32>()? as f64;
            let grads = (l.sum / target_tokens as f64)?.backward()?;
            accumulate(&mut acc, grads, self.model.params())?;
        }
        let grads = acc.ok_or_else(|| {
            Error::Training("an optimizer step has no target token in any of its examples".into())
        })?;
        Ok(StepGrads {
            grads,
            loss_sum,
            target_tokens,
            tokens,
            positions,
        })
    }

    /// One optimizer step (0-based `step`) over `examples`.
    pub fn train_step(
        &mut self,
        step: usize,
        examples: &[Example],
        schedule: &LrSchedule,
    ) -> Result<StepMetrics> {
        let t0 = Instant::now();
        let mut sg = self.step_grads(examples)?;
        let loss = sg.loss_sum / sg.target_tokens as f64;
        if !loss.is_finite() {
            return Err(Error::Training(format!(
                "step {}: loss is {loss}",
                step + 1
            )));
        }
        let grad_norm = clip_grad_norm(
            &mut sg.grads,
            self.model.params(),
            self.config.max_grad_norm,
        )?;
        if !grad_norm.is_finite() {
            return Err(Error::Training(format!(
                "step {}: gradient norm is {grad_norm}",
                step + 1
            )));
        }
        let lr = schedule.lr(step);
        self.optimizer.step(&sg.grads, lr)?;
        let dt = t0.elapsed().as_secs_f64();
        Ok(StepMetrics {
            step: step + 1,
            epoch: 0.0,
            loss,
            lr,
            grad_norm,
            tokens: sg.tokens,
            target_tokens: sg.target_tokens,
            positions: sg.positions,
            tokens_per_s: sg.tokens as f64 / dt.max(1e-9),
            elapsed_s: 0.0,
        })
    }

    /// Mean loss per target token over `examples`, without gradient updates.
    pub fn evaluate(&self, examples: &[Example]) -> Result<(f64, usize)> {
        let mut sum = 0f64;
        let mut n = 0usize;
        for chunk in examples.chunks(self.config.batch_size) {
            let b = self.collator.collate(chunk, &self.device)?;
            if b.n_targets() == 0 {
                continue;
            }
            let l = self.model.loss(&b)?;
            sum += l.sum.to_scalar::<f32>()? as f64;
            n += l.n_tokens;
        }
        if n == 0 {
            return Err(Error::Training("the eval set has no target token".into()));
        }
        Ok((sum / n as f64, n))
    }

    /// Trains over `train` (evaluating on `eval` every `eval_steps` and at the end).
    pub fn train(&mut self, train: &[Example], eval: Option<&[Example]>) -> Result<TrainSummary> {
        if train.is_empty() {
            return Err(Error::Training("no training examples".into()));
        }
        let total = self.total_steps(train.len());
        let schedule = LrSchedule {
            kind: self.config.schedule,
            peak: self.config.adamw.lr,
            warmup_steps: self.config.warmup_steps,
            total_steps: total,
        };
        let mut metrics_file = match &self.config.output_dir {
            Some(dir) => {
                std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
                let p = dir.join("metrics.jsonl");
                Some((std::fs::File::create(&p).map_err(|e| Error::io(&p, e))?, p))
            }
            None => None,
        };
        let mut write_row = |row: &serde_json::Value| -> Result<()> {
            if let Some((f, p)) = metrics_file.as_mut() {
                writeln!(f, "{row}")
                    .and_then(|_| f.flush())
                    .map_err(|e| Error::io(p.clone(), e))?;
            }
            Ok(())
        };
        let bar = (self.config.progress && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            b
        });
        let per_step = self.examples_per_step();
        let mut summary = TrainSummary::default();
        let start = Instant::now();
        let mut epoch = 0;
        let mut order = epoch_order(train.len(), epoch, self.config.seed, self.config.shuffle);
        let mut cursor = 0;
        tracing::info!(
            examples = train.len(),
            steps = total,
            examples_per_step = per_step,
            "training"
        );
        for step in 0..total {
            if cursor >= order.len() {
                epoch += 1;
                order = epoch_order(train.len(), epoch, self.config.seed, self.config.shuffle);
                cursor = 0;
            }
            let end = (cursor + per_step).min(order.len());
            let examples: Vec<Example> = order[cursor..end]
                .iter()
                .map(|&i| train[i].clone())
                .collect();
            cursor = end;
            let mut m = self.train_step(step, &examples, &schedule)?;
            m.epoch = epoch as f64 + cursor as f64 / train.len() as f64;
            m.elapsed_s = start.elapsed().as_secs_f64();
            write_row(&serde_json::to_value(&m).expect("metrics serialise"))?;
            match &bar {
                Some(b) => {
                    b.set_message(format!("loss {:.4} | {:.0} tok/s", m.loss, m.tokens_per_s));
                    b.inc(1);
                }
                None => {
                    if m.step % self.config.logging_steps.max(1) == 0 || m.step == total {
                        tracing::info!(
                            step = m.step,
                            loss = format!("{:.4}", m.loss),
                            lr = format!("{:.3e}", m.lr),
                            grad_norm = format!("{:.3}", m.grad_norm),
                            tokens_per_s = format!("{:.0}", m.tokens_per_s),
                            "step"
                        );
                    }
                }
            }
            let is_last = step + 1 == total;
            let due = self.config.eval_steps > 0 && m.step % self.config.eval_steps == 0;
            summary.steps.push(m);
            if let Some(ev) = eval {
                if due || is_last {
                    let (loss, n) = self.evaluate(ev)?;
                    let e = EvalMetrics {
                        step: step + 1,
                        eval_loss: loss,
                        eval_tokens: n,
                    };
                    tracing::info!(step = e.step, eval_loss = format!("{loss:.4}"), "eval");
                    write_row(&serde_json::to_value(&e).expect("metrics serialise"))?;
                    summary.evals.push(e);
                }
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
        Ok(summary)
    }
}
