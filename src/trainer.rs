//! The training loop: sample the examples of each optimizer step, collate micro-batches, sum
//! losses, normalise by the loss units (target tokens or sequences) of the whole step,
//! backward, clip, AdamW, schedule; evaluate, checkpoint, resume, and let callbacks decide.

use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{backprop::GradStore, Device};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use crate::callback::{Callback, Control};
use crate::checkpoint::{self, TrainerState};
use crate::collator::{Collator, TrainBatch};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::model::{LossScale, Model};
use crate::optim::{accumulate, AdamW, AdamWConfig, LrSchedule, PendingUpdate, Schedule};

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
    pub epochs: usize,
    pub adamw: AdamWConfig,
    pub schedule: Schedule,
    pub warmup_steps: usize,
    /// Warmup as a fraction of the total steps (rounded up), used when `warmup_steps` is 0.
    pub warmup_ratio: f64,
    pub min_lr_ratio: f64,
    /// Warmup-stable-decay: fraction of the total steps spent decaying.
    pub decay_ratio: f64,
    pub max_grad_norm: f64,
    pub seed: u64,
    pub shuffle: bool,
    /// Shuffle, then sort each window of 50 steps' examples by length (transformers'
    /// `group_by_length`): less padding in padded mode, similar lengths per micro-batch.
    pub group_by_length: bool,
    pub logging_steps: usize,
    pub eval_steps: usize,
    /// Save a checkpoint every this many steps (0: never, except on stop requests).
    pub save_steps: usize,
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

/// One line of metrics.jsonl.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StepMetrics {
    pub step: usize,
    pub epoch: f64,
    /// Mean loss over the step's loss units (target tokens by default).
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// MoE router load-balancing loss (coefficient included), added to the objective.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aux_loss: Option<f64>,
    /// Real (non-pad) tokens of the step.
    pub tokens: usize,
    pub target_tokens: usize,
    /// Positions computed, pads included.
    pub positions: usize,
    pub examples: usize,
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EvalMetrics {
    pub step: usize,
    pub eval_loss: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eval_accuracy: Option<f64>,
    pub eval_tokens: usize,
}

/// Mean loss per target token, token accuracy (arg-max), target tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    pub loss: f64,
    pub accuracy: Option<f64>,
    pub tokens: usize,
}

#[derive(Debug, Clone, Default)]
pub struct TrainSummary {
    pub steps: Vec<StepMetrics>,
    pub evals: Vec<EvalMetrics>,
    /// A stop was requested (signal or callback); the last checkpoint holds the state.
    pub stopped: bool,
    /// Set when a SIGINT/SIGTERM stopped the run.
    pub interrupted: bool,
    pub last_checkpoint: Option<PathBuf>,
}

/// The result of one forward/backward over the examples of an optimizer step.
pub struct StepGrads {
    pub grads: GradStore,
    /// Summed loss over the step, in loss units.
    pub loss_sum: f64,
    /// The step's auxiliary loss (coefficient included), where the model has one.
    pub aux_loss: Option<f64>,
    pub loss_units: f64,
    pub target_tokens: usize,
    pub tokens: usize,
    pub positions: usize,
}

/// Sizes of one optimizer step's micro-batches, summed.
#[derive(Debug, Clone, Copy)]
struct StepSizes {
    loss_units: f64,
    target_tokens: usize,
    tokens: usize,
    positions: usize,
    examples: usize,
}

/// A step on the device, with where the epoch stands once it is done.
struct InFlight {
    pending: PendingStep,
    epoch: usize,
    cursor: usize,
    /// The host must see this step's result before the next one runs (eval, save, last).
    barrier: bool,
}

/// Gradients of a step whose losses are still on the device.
struct PendingGrads {
    grads: GradStore,
    /// Float64 scalars.
    loss_sum: candle_core::Tensor,
    aux_loss: Option<candle_core::Tensor>,
    sizes: StepSizes,
}

/// An optimizer step enqueued by [`Trainer::enqueue_step`], to hand to
/// [`Trainer::finish_step`].
#[must_use = "finish the step to learn its loss and whether its update was applied"]
pub struct PendingStep {
    step: usize,
    /// The summed loss, and the auxiliary loss where the model has one.
    losses: crate::streams::Readback,
    has_aux: bool,
    update: PendingUpdate,
    lr: f64,
    sizes: StepSizes,
    t0: Instant,
}

fn read_scalar(t: &candle_core::Tensor) -> Result<f64> {
    Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
}

/// Drives `M` with batches from `C`; the two must agree on the batch type.
pub struct Trainer<M: Model, C: Collator<Batch = M::Batch>> {
    pub model: M,
    pub collator: C,
    pub config: TrainerConfig,
    pub device: Device,
    optimizer: AdamW,
    callbacks: Vec<Box<dyn Callback>>,
    stop: Arc<AtomicBool>,
    resume: Option<(PathBuf, TrainerState)>,
    /// When the last step finished (steps may overlap on a GPU).
    last_finished: Option<Instant>,
}

/// The order in which examples are visited in `epoch`: a seeded shuffle (seed + epoch), so a
/// run is reproducible, each epoch differs, and a resumed run rebuilds the same order.
pub fn epoch_order(lengths: &[usize], epoch: usize, cfg: &TrainerConfig) -> Vec<usize> {
    let mut idx: Vec<usize> = (0..lengths.len()).collect();
    if cfg.shuffle || cfg.group_by_length {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(epoch as u64));
        idx.shuffle(&mut rng);
    }
    if cfg.group_by_length {
        let window = 50 * cfg.batch_size * cfg.grad_accum;
        for chunk in idx.chunks_mut(window.max(1)) {
            chunk.sort_by_key(|&i| std::cmp::Reverse(lengths[i]));
        }
    }
    idx
}

/// FNV-1a over every example's token ids and mask, in order.
fn data_hash(examples: &[Example]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    let mut eat = |x: u64| {
        h ^= x;
        h = h.wrapping_mul(0x100000001b3);
    };
    for e in examples {
        eat(e.input_ids.len() as u64);
        for (&id, &m) in e.input_ids.iter().zip(&e.loss_mask) {
            eat(((id as u64) << 1) | m as u64);
        }
    }
    h
}

/// How many examples of `lens` (the lengths of the rest of an epoch's order) each micro-batch of
/// the next optimizer step takes: `batch_size` each, or with a token budget as many as keep the
/// micro-batch's computed positions (rows x longest, which bounds the padded and the padding-free
/// layout alike) within it, at least one.
pub fn step_sizes(lens: &[usize], cfg: &TrainerConfig) -> Vec<usize> {
    let mut sizes = Vec::new();
    let mut pos = 0;
    for _ in 0..cfg.grad_accum {
        if pos >= lens.len() {
            break;
        }
        let take = match cfg.max_tokens_per_batch {
            None => cfg.batch_size.min(lens.len() - pos),
            Some(budget) => {
                let cost = |k: usize| k * lens[pos..pos + k].iter().max().copied().unwrap_or(0);
                let mut k = 1;
                while pos + k < lens.len() && cost(k + 1) <= budget {
                    k += 1;
                }
                k
            }
        };
        sizes.push(take);
        pos += take;
    }
    sizes
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
            callbacks: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            resume: None,
            last_finished: None,
        })
    }

    pub fn add_callback(&mut self, cb: Box<dyn Callback>) {
        self.callbacks.push(cb);
    }

    /// Setting this flag (e.g. from a signal handler) makes the trainer save a checkpoint
    /// after the current step and return.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Use `flag` (e.g. one a signal handler sets) as the stop request.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = flag;
    }

    fn steps_per_epoch(&self, lengths: &[usize], epoch: usize) -> usize {
        let order = epoch_order(lengths, epoch, &self.config);
        let lens: Vec<usize> = order.iter().map(|&i| lengths[i]).collect();
        let mut pos = 0;
        let mut steps = 0;
        while pos < lens.len() {
            pos += step_sizes(&lens[pos..], &self.config).iter().sum::<usize>();
            steps += 1;
        }
        steps
    }

    /// Optimizer steps a run over `examples` takes.
    pub fn total_steps(&self, examples: &[Example]) -> usize {
        if self.config.max_steps > 0 {
            return self.config.max_steps;
        }
        let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
        match self.config.max_tokens_per_batch {
            None => {
                self.config.epochs
                    * examples
                        .len()
                        .div_ceil(self.config.batch_size * self.config.grad_accum)
            }
            Some(_) => (0..self.config.epochs)
                .map(|e| self.steps_per_epoch(&lengths, e))
                .sum(),
        }
    }

    pub fn schedule(&self, total: usize) -> LrSchedule {
        let c = &self.config;
        let warmup = if c.warmup_steps > 0 {
            c.warmup_steps
        } else {
            (c.warmup_ratio * total as f64).ceil() as usize
        };
        LrSchedule {
            kind: c.schedule,
            peak: c.adamw.lr,
            warmup_steps: warmup,
            total_steps: total,
            min_lr_ratio: c.min_lr_ratio,
            decay_steps: (c.decay_ratio * total as f64).round() as usize,
        }
    }

    /// Gradients of the mean loss over all `micro_batches` of one optimizer step: each
    /// micro-batch's summed loss is divided by the step's total loss units, so any split of the
    /// same examples, padded or not, gives the same gradients.
    pub fn step_grads_split(&self, micro_batches: &[&[Example]]) -> Result<StepGrads> {
        let mut p = self.pending_grads(micro_batches)?;
        // In each parameter's dtype: bf16 compute on CUDA leaves the weight matrices' gradients
        // in bf16 for the optimizer, which widens them itself.
        for param in self.model.params() {
            let t = param.var.as_tensor();
            if let Some(g) = p.grads.get(t) {
                if g.dtype() != t.dtype() {
                    let g = g.to_dtype(t.dtype())?;
                    p.grads.insert(t, g);
                }
            }
        }
        Ok(StepGrads {
            grads: p.grads,
            loss_sum: read_scalar(&p.loss_sum)?,
            aux_loss: p.aux_loss.as_ref().map(read_scalar).transpose()?,
            loss_units: p.sizes.loss_units,
            target_tokens: p.sizes.target_tokens,
            tokens: p.sizes.tokens,
            positions: p.sizes.positions,
        })
    }

    /// [`Trainer::step_grads_split`] with the losses left on the device: reading them would
    /// make the host wait for the whole backward before it can enqueue the optimizer.
    fn pending_grads(&self, micro_batches: &[&[Example]]) -> Result<PendingGrads> {
        let batches = micro_batches
            .iter()
            .map(|mb| self.collator.collate(mb, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let sizes = StepSizes {
            loss_units: batches.iter().map(|b| b.loss_units()).sum(),
            target_tokens: batches.iter().map(|b| b.n_targets()).sum(),
            tokens: batches.iter().map(|b| b.n_tokens()).sum(),
            positions: batches.iter().map(|b| b.n_positions()).sum(),
            examples: micro_batches.iter().map(|m| m.len()).sum(),
        };
        let mut acc = None;
        let mut loss_sum: Option<candle_core::Tensor> = None;
        let mut aux_loss: Option<candle_core::Tensor> = None;
        let f64_sum = |total: Option<candle_core::Tensor>, x: candle_core::Tensor| -> Result<_> {
            let x = x.to_dtype(candle_core::DType::F64)?;
            Ok(Some(match total {
                Some(t) => (t + x)?,
                None => x,
            }))
        };
        for b in &batches {
            if b.n_targets() == 0 {
                continue;
            }
            let share = b.n_tokens() as f64 / sizes.tokens as f64;
            let scale = LossScale {
                per_unit: 1.0 / sizes.loss_units,
                aux: share,
            };
            let (l, grads) = self.model.forward_backward(b, scale)?;
            // Detached: a loss kept for later reading must not keep the graph (every
            // activation of the step) alive past its backward.
            loss_sum = f64_sum(loss_sum, l.sum.detach())?;
            if let Some(a) = l.aux {
                let a = a.detach().to_dtype(candle_core::DType::F64)?;
                aux_loss = f64_sum(aux_loss, (a * share)?)?;
            }
            accumulate(&mut acc, grads, self.model.params())?;
        }
        let (Some(grads), Some(loss_sum)) = (acc, loss_sum) else {
            return Err(Error::Training(
                "an optimizer step has no target token in any of its examples".into(),
            ));
        };
        Ok(PendingGrads {
            grads,
            loss_sum,
            aux_loss,
            sizes,
        })
    }

    /// `step_grads_split` with micro-batches of `batch_size` examples.
    pub fn step_grads(&self, examples: &[Example]) -> Result<StepGrads> {
        let mbs: Vec<&[Example]> = examples.chunks(self.config.batch_size).collect();
        self.step_grads_split(&mbs)
    }

    /// One optimizer step (0-based `step`) over the given micro-batches.
    pub fn train_step_split(
        &mut self,
        step: usize,
        micro_batches: &[&[Example]],
        schedule: &LrSchedule,
    ) -> Result<StepMetrics> {
        let p = self.enqueue_step(step, micro_batches, schedule)?;
        self.finish_step(p)
    }

    /// Enqueues one optimizer step (0-based `step`): forward, backward, clip and update, on a
    /// GPU without waiting for any of it, so that the host can prepare (and enqueue) the next
    /// step while the device runs this one. [`Trainer::finish_step`] reads its loss and
    /// gradient norm. The update is applied only if both are finite, which the device checks
    /// by itself; a step enqueued before this one is finished sees its update.
    pub fn enqueue_step(
        &mut self,
        step: usize,
        micro_batches: &[&[Example]],
        schedule: &LrSchedule,
    ) -> Result<PendingStep> {
        self.enqueue_step_with(step, micro_batches, schedule, false)
    }

    /// [`Trainer::enqueue_step`]; with `keep_copies` the optimizer also writes the model's
    /// compute copies of the new weights, which the next step then uses without casting. Only
    /// for loops where nothing else writes the weights between steps (`train`, `bench`): the
    /// model is told its copies are fresh until the next step that does not keep them.
    pub(crate) fn enqueue_step_with(
        &mut self,
        step: usize,
        micro_batches: &[&[Example]],
        schedule: &LrSchedule,
        keep_copies: bool,
    ) -> Result<PendingStep> {
        let t0 = Instant::now();
        if !keep_copies {
            self.model.set_compute_copies_fresh(false);
        }
        let mut g = self.pending_grads(micro_batches)?;
        let t_grads = t0.elapsed();
        let lr = schedule.lr(step);
        let copies = if keep_copies {
            self.model.compute_copies()?
        } else {
            Vec::new()
        };
        let update = self.optimizer.enqueue_clip_and_step(
            &mut g.grads,
            self.model.params(),
            self.config.max_grad_norm,
            lr,
            Some(&g.loss_sum),
            &copies,
        )?;
        self.model
            .set_compute_copies_fresh(keep_copies && update.wrote_copies());
        let has_aux = g.aux_loss.is_some();
        let losses = crate::streams::Readback::enqueue(
            std::iter::once(g.loss_sum).chain(g.aux_loss).collect(),
        )?;
        if crate::device::profiling() {
            tracing::info!(
                "profile step {} (host enqueue): gradients {:.1} ms, clip + optimizer {:.1} ms",
                step + 1,
                t_grads.as_secs_f64() * 1e3,
                (t0.elapsed() - t_grads).as_secs_f64() * 1e3
            );
        }
        Ok(PendingStep {
            step,
            losses,
            has_aux,
            update,
            lr,
            sizes: g.sizes,
            t0,
        })
    }

    /// Waits for an enqueued step and reports it; a non-finite loss or gradient norm is an
    /// error (the device left the weights as they were).
    pub fn finish_step(&mut self, p: PendingStep) -> Result<StepMetrics> {
        let losses = p.losses.read();
        let grad_norm = self.optimizer.settle(p.update)?;
        let losses = losses?;
        let loss = losses[0] / p.sizes.loss_units;
        if !loss.is_finite() {
            return Err(Error::Training(format!(
                "step {}: loss is {loss}; the last good checkpoint is kept",
                p.step + 1
            )));
        }
        if !grad_norm.is_finite() {
            return Err(Error::Training(format!(
                "step {}: gradient norm is {grad_norm}; the last good checkpoint is kept",
                p.step + 1
            )));
        }
        let aux_loss = p.has_aux.then(|| losses[1]);
        // With steps overlapping, a step's time runs from the end of the one before it.
        let now = Instant::now();
        let since = match self.last_finished {
            Some(t) if t > p.t0 => t,
            _ => p.t0,
        };
        self.last_finished = Some(now);
        let dt = (now - since).as_secs_f64();
        Ok(StepMetrics {
            step: p.step + 1,
            epoch: 0.0,
            loss,
            lr: p.lr,
            grad_norm,
            aux_loss,
            tokens: p.sizes.tokens,
            target_tokens: p.sizes.target_tokens,
            positions: p.sizes.positions,
            examples: p.sizes.examples,
            tokens_per_s: p.sizes.tokens as f64 / dt.max(1e-9),
            elapsed_s: 0.0,
        })
    }

    /// One optimizer step over `examples` in micro-batches of `batch_size`.
    pub fn train_step(
        &mut self,
        step: usize,
        examples: &[Example],
        schedule: &LrSchedule,
    ) -> Result<StepMetrics> {
        let mbs: Vec<&[Example]> = examples.chunks(self.config.batch_size).collect();
        self.train_step_split(step, &mbs, schedule)
    }

    /// Mean loss per target token (and token accuracy, where the model reports it) over
    /// `examples`, without gradient updates.
    pub fn evaluate(&self, examples: &[Example]) -> Result<EvalResult> {
        let (mut sum, mut n, mut correct) = (0f64, 0usize, Some(0usize));
        for chunk in examples.chunks(self.config.batch_size) {
            let b = self.collator.collate(chunk, &self.device)?;
            if b.n_targets() == 0 {
                continue;
            }
            let e = self.model.eval_sums(&b)?;
            sum += e.loss_sum;
            n += e.n_tokens;
            correct = match (correct, e.n_correct) {
                (Some(a), Some(b)) => Some(a + b),
                _ => None,
            };
        }
        if n == 0 {
            return Err(Error::Training("the eval set has no target token".into()));
        }
        Ok(EvalResult {
            loss: sum / n as f64,
            accuracy: correct.map(|c| c as f64 / n as f64),
            tokens: n,
        })
    }

    /// Resume from `dir` (a checkpoint this trainer wrote) at the next `train` call. Checks
    /// that the checkpoint is one and that it belongs to this model, before changing anything.
    pub fn resume_from(&mut self, dir: &Path) -> Result<()> {
        let state = TrainerState::load(dir)?;
        let ours = self.param_shapes();
        if state.param_shapes != ours {
            let diff = ours
                .iter()
                .zip(&state.param_shapes)
                .find(|(a, b)| a != b)
                .map(|(a, b)| {
                    format!(
                        "model has {} {:?}, checkpoint has {} {:?}",
                        a.0, a.1, b.0, b.1
                    )
                })
                .unwrap_or_else(|| {
                    format!(
                        "model has {} parameters, checkpoint {}",
                        ours.len(),
                        state.param_shapes.len()
                    )
                });
            return Err(Error::model(
                dir,
                format!("checkpoint is of a different model: {diff}"),
            ));
        }
        self.model.load_params(dir)?;
        self.optimizer
            .load_state(&dir.join(checkpoint::OPTIMIZER_FILE), state.global_step)?;
        self.resume = Some((dir.to_path_buf(), state));
        Ok(())
    }

    fn param_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.model
            .params()
            .iter()
            .map(|p| (p.name.clone(), p.var.dims().to_vec()))
            .collect()
    }

    fn save_checkpoint(&mut self, state: &TrainerState) -> Result<Option<PathBuf>> {
        let Some(out) = self.config.output_dir.clone() else {
            return Ok(None);
        };
        let model = &self.model;
        let opt = &self.optimizer;
        let callbacks = &mut self.callbacks;
        let dir = checkpoint::save(
            &out,
            state.global_step,
            self.config.save_total_limit,
            |tmp| {
                model.save(tmp)?;
                crate::model::weights::save_safetensors(
                    &opt.state_tensors()?,
                    &tmp.join(checkpoint::OPTIMIZER_FILE),
                )?;
                crate::io::write_atomic(
                    &tmp.join(checkpoint::STATE_FILE),
                    serde_json::to_string_pretty(state)
                        .expect("state serialises")
                        .as_bytes(),
                )?;
                for cb in callbacks.iter_mut() {
                    cb.on_save(tmp, state.global_step)?;
                }
                Ok(())
            },
        )?;
        tracing::info!(checkpoint = %dir.display(), "saved checkpoint");
        Ok(Some(dir))
    }

    /// Trains over `train` (evaluating on `eval` every `eval_steps` and at the end), resuming
    /// where `resume_from` says if it was called.
    pub fn train(&mut self, train: &[Example], eval: Option<&[Example]>) -> Result<TrainSummary> {
        let r = self.train_loop(train, eval);
        // The compute copies are the loop's to keep fresh; from here anything may write the
        // weights.
        self.model.set_compute_copies_fresh(false);
        r
    }

    fn train_loop(&mut self, train: &[Example], eval: Option<&[Example]>) -> Result<TrainSummary> {
        if train.is_empty() {
            return Err(Error::Training("no training examples".into()));
        }
        if self.config.eval_steps > 0 && eval.is_none() {
            return Err(Error::Training(
                "eval_steps is set but there is no eval set".into(),
            ));
        }
        let lengths: Vec<usize> = train.iter().map(Example::len).collect();
        let total = self.total_steps(train);
        let schedule = self.schedule(total);
        let per_step = self.config.batch_size * self.config.grad_accum;
        let mut state = TrainerState {
            format_version: checkpoint::FORMAT_VERSION,
            global_step: 0,
            total_steps: total,
            epoch: 0,
            cursor: 0,
            seed: self.config.seed,
            shuffle: self.config.shuffle,
            n_train_examples: train.len(),
            examples_per_step: per_step,
            max_tokens_per_batch: self.config.max_tokens_per_batch,
            group_by_length: self.config.group_by_length,
            data_hash: data_hash(train),
            param_shapes: self.param_shapes(),
            best_eval_loss: None,
        };
        if self.resume.is_none() {
            if let Some(dir) = &self.config.output_dir {
                if let Some((step, _)) = checkpoint::list(dir).pop() {
                    return Err(Error::Training(format!(
                        "{} already holds checkpoints (the newest: checkpoint-{step}) of an earlier run: \
                         resume it (resume_from: latest) or use another output_dir",
                        dir.display()
                    )));
                }
            }
        }
        let mut resumed_from = None;
        if let Some((dir, saved)) = self.resume.take() {
            let same = |what: &str, a: String, b: String| -> Result<()> {
                if a != b {
                    return Err(Error::model(
                        &dir,
                        format!("cannot resume exactly: checkpoint has {what} = {b}, this run {a}"),
                    ));
                }
                Ok(())
            };
            same("train.seed", state.seed.to_string(), saved.seed.to_string())?;
            same(
                "train.shuffle",
                state.shuffle.to_string(),
                saved.shuffle.to_string(),
            )?;
            same(
                "the number of training examples",
                train.len().to_string(),
                saved.n_train_examples.to_string(),
            )?;
            same(
                "examples per step",
                per_step.to_string(),
                saved.examples_per_step.to_string(),
            )?;
            same(
                "the total steps",
                total.to_string(),
                saved.total_steps.to_string(),
            )?;
            same(
                "train.max_tokens_per_batch",
                format!("{:?}", state.max_tokens_per_batch),
                format!("{:?}", saved.max_tokens_per_batch),
            )?;
            same(
                "train.group_by_length",
                state.group_by_length.to_string(),
                saved.group_by_length.to_string(),
            )?;
            same(
                "the training data (hash of its token ids)",
                format!("{:016x}", state.data_hash),
                format!("{:016x}", saved.data_hash),
            )?;
            tracing::info!(checkpoint = %dir.display(), step = saved.global_step, "resuming");
            state.global_step = saved.global_step;
            state.epoch = saved.epoch;
            state.cursor = saved.cursor;
            state.best_eval_loss = saved.best_eval_loss;
            resumed_from = Some(dir);
        }

        for cb in self.callbacks.iter_mut() {
            if let Some(dir) = &resumed_from {
                cb.on_resume(dir)?;
            }
            cb.on_train_begin(&state)?;
        }
        let mut metrics = MetricsFile::open(self.config.output_dir.as_deref(), state.global_step)?;
        let bar = (self.config.progress && std::io::stderr().is_terminal()).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} steps [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .expect("valid template"),
            );
            b.set_position(state.global_step as u64);
            b
        });
        let mut summary = TrainSummary::default();
        let start = Instant::now();
        tracing::info!(
            examples = train.len(),
            steps = total,
            start_step = state.global_step,
            "training"
        );
        let overlap = self
            .config
            .overlap_steps
            .unwrap_or_else(|| self.device.is_cuda());
        // Where the next step to enqueue starts; `state` only moves when a step finishes, so a
        // checkpoint always describes the weights it holds.
        let mut plan = (state.epoch, state.cursor);
        let mut order = epoch_order(&lengths, plan.0, &self.config);
        let mut next_step = state.global_step;
        let mut in_flight: Option<InFlight> = None;
        let mut stopping = false;
        // A save or stop asked for while the next step was already enqueued.
        let mut pending_control = Control::Continue;
        loop {
            // A step after which the host must look at the weights (eval, save, the end) is
            // finished before the next one is enqueued; otherwise the next one is enqueued
            // first, so the device never waits for the host between steps.
            let may_enqueue = next_step < total
                && !stopping
                && pending_control == Control::Continue
                && in_flight
                    .as_ref()
                    .is_none_or(|f| overlap && !f.barrier && !self.stop.load(Ordering::SeqCst));
            let enqueued = if may_enqueue {
                if plan.1 >= order.len() {
                    plan = (plan.0 + 1, 0);
                    order = epoch_order(&lengths, plan.0, &self.config);
                }
                let rest: Vec<usize> = order[plan.1..].iter().map(|&i| lengths[i]).collect();
                let sizes = step_sizes(&rest, &self.config);
                let consumed: usize = sizes.iter().sum();
                let examples: Vec<Example> = order[plan.1..plan.1 + consumed]
                    .iter()
                    .map(|&i| train[i].clone())
                    .collect();
                let mut mbs: Vec<&[Example]> = Vec::with_capacity(sizes.len());
                let mut at = 0;
                for s in &sizes {
                    mbs.push(&examples[at..at + s]);
                    at += s;
                }
                let pending = self.enqueue_step_with(next_step, &mbs, &schedule, true)?;
                plan.1 += consumed;
                next_step += 1;
                let due = |every: usize| every > 0 && next_step % every == 0;
                Some(InFlight {
                    pending,
                    epoch: plan.0,
                    cursor: plan.1,
                    barrier: next_step == total
                        || (eval.is_some() && due(self.config.eval_steps))
                        || due(self.config.save_steps),
                })
            } else {
                None
            };
            let Some(done) = std::mem::replace(&mut in_flight, enqueued) else {
                if in_flight.is_none() {
                    break;
                }
                continue;
            };
            let mut m = self.finish_step(done.pending)?;
            state.global_step += 1;
            state.epoch = done.epoch;
            state.cursor = done.cursor;
            m.epoch = state.epoch as f64 + state.cursor as f64 / train.len() as f64;
            m.elapsed_s = start.elapsed().as_secs_f64();
            metrics.write(&serde_json::to_value(&m).expect("metrics serialise"))?;
            match &bar {
                Some(b) => {
                    b.set_message(format!("loss {:.4} | {:.0} tok/s", m.loss, m.tokens_per_s));
                    b.inc(1);
                }
                None if m.step % self.config.logging_steps.max(1) == 0 || m.step == total => {
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
            let mut control = Control::Continue;
            for cb in self.callbacks.iter_mut() {
                control = control.max(cb.on_step_end(&m)?);
            }
            let is_last = state.global_step == total;
            summary.steps.push(m);
            let eval_due =
                self.config.eval_steps > 0 && state.global_step % self.config.eval_steps == 0;
            if let Some(ev) = eval {
                if eval_due || is_last {
                    let EvalResult {
                        loss,
                        accuracy: acc,
                        tokens: n,
                    } = self.evaluate(ev)?;
                    let e = EvalMetrics {
                        step: state.global_step,
                        eval_loss: loss,
                        eval_accuracy: acc,
                        eval_tokens: n,
                    };
                    tracing::info!(step = e.step, eval_loss = format!("{loss:.4}"), eval_accuracy = ?acc, "eval");
                    metrics.write(&serde_json::to_value(&e).expect("metrics serialise"))?;
                    state.best_eval_loss =
                        Some(state.best_eval_loss.map_or(loss, |b: f64| b.min(loss)));
                    for cb in self.callbacks.iter_mut() {
                        control = control.max(cb.on_eval_end(&e)?);
                    }
                    summary.evals.push(e);
                }
            }
            if self.stop.load(Ordering::SeqCst) {
                summary.interrupted = true;
                control = Control::Stop;
            }
            // A request made while the next step is already on the device applies after it:
            // its update is done, so the checkpoint must include it.
            stopping |= control == Control::Stop;
            let save_due = self.config.save_steps > 0
                && (state.global_step % self.config.save_steps == 0 || is_last);
            if in_flight.is_some() && control != Control::Continue {
                pending_control = pending_control.max(control);
                continue;
            }
            let control = control.max(std::mem::take(&mut pending_control));
            if save_due || control != Control::Continue {
                summary.last_checkpoint = self.save_checkpoint(&state)?.or(summary.last_checkpoint);
            }
            if control == Control::Stop {
                summary.stopped = true;
                tracing::warn!(step = state.global_step, "training stopped on request");
                break;
            }
        }
        if let Some(b) = bar {
            b.finish();
        }
        if let Some(dir) = &self.config.output_dir {
            let train_pts: Vec<(usize, f64)> = metrics.rows_of("loss");
            let eval_pts: Vec<(usize, f64)> = metrics.rows_of("eval_loss");
            crate::plot::loss_curve(&dir.join("loss.png"), &train_pts, &eval_pts)?;
        }
        Ok(summary)
    }
}

/// metrics.jsonl: created fresh, or on resume cut back to the rows up to the resumed step
/// (rows a crashed run wrote after its last checkpoint are replayed, not duplicated).
struct MetricsFile {
    file: Option<(std::fs::File, PathBuf)>,
    rows: Vec<serde_json::Value>,
}

impl MetricsFile {
    fn open(dir: Option<&Path>, keep_up_to: usize) -> Result<Self> {
        let Some(dir) = dir else {
            return Ok(Self {
                file: None,
                rows: Vec::new(),
            });
        };
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let p = dir.join("metrics.jsonl");
        let mut rows = Vec::new();
        if keep_up_to > 0 && p.exists() {
            let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
            rows = text
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter(|r| r["step"].as_u64().is_some_and(|s| s as usize <= keep_up_to))
                .collect();
            let kept: String = rows.iter().map(|r| format!("{r}\n")).collect();
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

    fn write(&mut self, row: &serde_json::Value) -> Result<()> {
        if let Some((f, p)) = self.file.as_mut() {
            writeln!(f, "{row}")
                .and_then(|_| f.flush())
                .map_err(|e| Error::io(p.clone(), e))?;
        }
        self.rows.push(row.clone());
        Ok(())
    }

    fn rows_of(&self, key: &str) -> Vec<(usize, f64)> {
        self.rows
            .iter()
            .filter_map(|r| Some((r["step"].as_u64()? as usize, r.get(key)?.as_f64()?)))
            .collect()
    }
}
