//! The trainer: drives a [`Model`] with batches from a [`Collator`], step after step (`step.rs`),
//! in the order the sampler plans (`sampler.rs`), evaluating and saving when the cadence says
//! (`cadence.rs`), reporting (`metrics.rs`), and letting callbacks decide.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{backprop::GradStore, Device};

use super::cadence::{Cadence, Due};
use super::callback::{Callback, Control};
use super::checkpoint::{self, TrainerState};
use super::config::TrainerConfig;
use super::eval::{evaluate, EvalResult};
use super::lock::OutputLock;
use super::metrics::{EvalMetrics, EvalSample, MetricsFile, Progress, StepMetrics, TrainSummary};
use super::optimizer::AdamW;
use super::parallel::DataParallel;
use super::sampler::{data_hash, total_steps, StepPlan};
use super::schedule::LrSchedule;
use super::step::{no_targets, step_grads, PendingStep, Stepper};
use crate::collate::Collator;
use crate::data::Example;
use crate::error::{Error, Result};
use crate::model::Model;
use crate::nn::param::first_non_finite;

/// The result of one forward/backward over the examples of an optimizer step.
pub struct StepGrads {
    /// Gradients of the step's mean loss, each in its parameter's dtype.
    pub grads: GradStore,
    /// Summed loss over the step, in loss units.
    pub loss_sum: f64,
    /// The step's auxiliary loss (coefficient included), where the model has one.
    pub aux_loss: Option<f64>,
    /// Target tokens (or sequences, under sequence normalisation) the loss is a mean over.
    pub loss_units: f64,
    /// Target tokens of the step.
    pub target_tokens: usize,
    /// Real (non-pad) tokens of the step.
    pub tokens: usize,
    /// Positions computed, pads included.
    pub positions: usize,
}

/// Drives `M` with batches from `C`; the two must agree on the batch type. `Send` when the model
/// and collator are: a trainer can be built on one thread and trained on another.
pub struct Trainer<M: Model, C: Collator<Batch = M::Batch>> {
    /// The model being trained.
    pub model: M,
    /// What turns examples into the model's batches.
    pub collator: C,
    /// How to train.
    pub config: TrainerConfig,
    /// Where batches are built and the model computes.
    pub device: Device,
    stepper: Stepper,
    callbacks: Vec<Box<dyn Callback>>,
    stop: Arc<AtomicBool>,
    resume: Option<(PathBuf, TrainerState)>,
    /// The other ranks of a data-parallel run; `None` for one process.
    dp: Option<DataParallel>,
    sampler: Option<EvalSampler>,
}

/// What [`Trainer::set_eval_sampler`] samples at each evaluation during training.
pub struct EvalSampler {
    /// How many eval examples, from the first: each one's prompt (its tokens before the first
    /// target) is continued greedily.
    pub prompts: usize,
    /// New tokens at most per prompt.
    pub max_new_tokens: usize,
    /// Generation ends before this token.
    pub eos: Option<u32>,
    /// Token ids to text (the tokenizer's decoding).
    pub decode: Decode,
}

/// Token ids to text, for [`EvalSampler`].
pub type Decode = Box<dyn Fn(&[u32]) -> Result<String> + Send>;

/// What one `train` call reports to and keeps.
struct Run {
    metrics: MetricsFile,
    progress: Progress,
    summary: TrainSummary,
    start: Instant,
    cadence: Cadence,
}

/// A step on the device, with where the epoch stands once it is done.
struct InFlight {
    pending: PendingStep,
    epoch: usize,
    cursor: usize,
    /// The host must see this step's result before the next one runs (eval, save, last).
    barrier: bool,
}

impl<M: Model, C: Collator<Batch = M::Batch>> Trainer<M, C> {
    /// A trainer of `model` with batches from `collator` on `device`; the optimizer state
    /// (AdamW's moments) starts empty.
    pub fn new(model: M, collator: C, config: TrainerConfig, device: Device) -> Result<Self> {
        let optimizer = AdamW::new(model.params(), config.adamw)?;
        Ok(Self {
            model,
            collator,
            config,
            device,
            stepper: Stepper::new(optimizer),
            callbacks: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            resume: None,
            dp: None,
            sampler: None,
        })
    }

    /// Trains as one rank of a data-parallel run: `batch_size` (and `max_tokens_per_batch`) are
    /// per rank, so a step takes `batch_size x ranks x grad_accum` examples, the same plan on
    /// every rank, each rank its share of every micro-batch. Under ZeRO 1 the optimizer keeps
    /// state only for the parameters this rank owns. Call before `resume_from`.
    pub fn set_data_parallel(&mut self, dp: DataParallel) -> Result<()> {
        self.stepper = Stepper::new(AdamW::new(
            &dp.owned(self.model.params()),
            self.config.adamw,
        )?);
        self.dp = Some(dp);
        Ok(())
    }

    /// This process's rank in a data-parallel run (0 for a run of one).
    pub fn rank(&self) -> usize {
        self.dp.as_ref().map_or(0, DataParallel::rank)
    }

    /// The configuration the step plan is made with: under data parallelism every rank's
    /// micro-batches together.
    fn plan_config(&self) -> TrainerConfig {
        let mut c = self.config.clone();
        if let Some(dp) = &self.dp {
            c.batch_size *= dp.world_size();
            c.max_tokens_per_batch = c.max_tokens_per_batch.map(|t| t * dp.world_size());
        }
        c
    }

    /// Adds a callback; callbacks run in the order they were added.
    pub fn add_callback(&mut self, cb: Box<dyn Callback>) {
        self.callbacks.push(cb);
    }

    /// Takes the callbacks back out (e.g. to read what they collected after `train`).
    pub fn take_callbacks(&mut self) -> Vec<Box<dyn Callback>> {
        std::mem::take(&mut self.callbacks)
    }

    /// Setting this flag (e.g. from a signal handler) makes the trainer save a checkpoint
    /// after the current step and return. `train` clears it when it returns, so the request
    /// stops one run.
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// Use `flag` (e.g. one a signal handler sets) as the stop request.
    pub fn set_stop_flag(&mut self, flag: Arc<AtomicBool>) {
        self.stop = flag;
    }

    /// Optimizer steps a run over `examples` takes.
    pub fn total_steps(&self, examples: &[Example]) -> usize {
        let lengths: Vec<usize> = examples.iter().map(Example::len).collect();
        total_steps(&lengths, &self.plan_config())
    }

    /// The learning-rate schedule of a run of `total` steps.
    pub fn schedule(&self, total: usize) -> LrSchedule {
        self.config.schedule(total)
    }

    /// Gradients of the mean loss over all `micro_batches` of one optimizer step: each
    /// micro-batch's summed loss is divided by the step's total loss units, so any split of the
    /// same examples, padded or not, gives the same gradients. An error when no example has a
    /// target token.
    pub fn step_grads_split(&self, micro_batches: &[&[Example]]) -> Result<StepGrads> {
        let (sizes, grads) = step_grads(
            &self.model,
            &self.collator,
            &self.device,
            micro_batches,
            self.dp.as_ref(),
        )?;
        let mut p = grads.ok_or_else(no_targets)?;
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
        let read = |t: &candle_core::Tensor| -> Result<f64> {
            Ok(t.to_dtype(candle_core::DType::F64)?.to_scalar::<f64>()?)
        };
        Ok(StepGrads {
            grads: p.grads,
            loss_sum: read(&p.loss_sum)?,
            aux_loss: p.aux_loss.as_ref().map(read).transpose()?,
            loss_units: sizes.loss_units,
            target_tokens: sizes.target_tokens,
            tokens: sizes.tokens,
            positions: sizes.positions,
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

    /// Enqueues one optimizer step (0-based `step`): forward, backward, clip and update, on a
    /// GPU without waiting for any of it, so that the host can prepare (and enqueue) the next
    /// step while the device runs this one. [`Trainer::finish_step`] reads its loss and
    /// gradient norm. The update is applied only if both are finite, which the device checks
    /// by itself; a step enqueued before this one is finished sees its update. A step whose
    /// examples have no target token is skipped (no update; its metrics say so).
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
        self.stepper.enqueue(
            &self.model,
            &self.collator,
            &self.device,
            step,
            micro_batches,
            schedule.lr(step),
            self.config.max_grad_norm,
            keep_copies,
            self.dp.as_ref(),
        )
    }

    /// Waits for an enqueued step and reports it; a non-finite loss or gradient norm is an
    /// error (the device left the weights as they were).
    pub fn finish_step(&mut self, p: PendingStep) -> Result<StepMetrics> {
        self.stepper.finish(p, self.dp.as_ref())
    }

    /// Mean loss per target token (and token accuracy, where the model reports it) over
    /// `examples`, without gradient updates ([`evaluate`] with this trainer's parts).
    pub fn evaluate(&self, examples: &[Example]) -> Result<EvalResult> {
        evaluate(
            &self.model,
            &self.collator,
            examples,
            self.config.batch_size,
            &self.device,
        )
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
        if let Some(dp) = &self.dp {
            dp.masters_loaded();
        }
        self.stepper
            .optimizer
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
        // Every rank joins the gathering of the weights and of the sharded optimizer state;
        // rank 0 writes.
        let opt_state = match &self.dp {
            Some(dp) => {
                dp.sync_masters(self.model.params())?;
                dp.gather_state(self.stepper.optimizer.state_tensors()?, self.model.params())?
            }
            None => self.stepper.optimizer.state_tensors()?,
        };
        let Some(out) = self.config.output_dir.clone() else {
            return Ok(None);
        };
        if let Some(name) = first_non_finite(self.model.params())? {
            return Err(Error::Training(format!(
                "step {}: parameter {name} holds NaN or infinity; no checkpoint written, the last \
                 good one is kept",
                state.global_step
            )));
        }
        let model = &self.model;
        let callbacks = &mut self.callbacks;
        let dir = checkpoint::save(
            &out,
            state.global_step,
            self.config.save_total_limit,
            |tmp| {
                model.save(tmp)?;
                crate::model::weights::save_safetensors(
                    &opt_state,
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
    /// where `resume_from` says if it was called. A later call trains another run from the
    /// current weights and optimizer state (its schedule starts again).
    pub fn train(&mut self, train: &[Example], eval: Option<&[Example]>) -> Result<TrainSummary> {
        let r = self.train_loop(train, eval);
        // The compute copies are the loop's to keep fresh; from here anything may write the
        // weights. A stop request ends the run it stopped, not the next one.
        self.model.set_compute_copies_fresh(false);
        self.stop.store(false, Ordering::SeqCst);
        r
    }

    /// The loop: enqueue the next step (before finishing the previous one where steps
    /// overlap), finish a step and report it, evaluate if due, save if due or asked, stop if
    /// asked or done.
    fn train_loop(&mut self, train: &[Example], eval: Option<&[Example]>) -> Result<TrainSummary> {
        let _lock = self.lock_output_dir(train, eval)?;
        let mut state = self.begin_run(train)?;
        let total = state.total_steps;
        let (lengths, schedule) = (lengths_of(train), self.config.schedule(total));
        let plan_config = self.plan_config();
        let cadence = Cadence::new(&self.config, total, eval.is_some());
        let mut run = Run {
            metrics: MetricsFile::open(self.config.output_dir.as_deref(), state.global_step)?,
            progress: Progress::new(
                self.config.progress,
                self.config.logging_steps,
                total,
                state.global_step,
            ),
            summary: TrainSummary::default(),
            start: Instant::now(),
            cadence,
        };
        let overlap = self
            .config
            .overlap_steps
            .unwrap_or_else(|| self.device.is_cuda());
        tracing::info!(
            examples = train.len(),
            steps = total,
            start_step = state.global_step,
            "training"
        );
        // Where the next step to enqueue starts; `state` only moves when a step finishes, so a
        // checkpoint always describes the weights it holds.
        let mut plan = StepPlan::at(&lengths, state.epoch, state.cursor, &plan_config);
        let mut next_step = state.global_step;
        let mut in_flight: Option<InFlight> = None;
        let mut stopping = false;
        // A save or stop asked for while the next step was already enqueued.
        let mut pending_control = Control::Continue;
        loop {
            let stop_asked = self.agreed_stop()?;
            // A barrier step (eval, save, the end) is finished before the next one is enqueued;
            // otherwise the next one is enqueued first, so the device never waits for the host.
            let may_enqueue = next_step < total
                && !stopping
                && pending_control == Control::Continue
                && in_flight
                    .as_ref()
                    .is_none_or(|f| overlap && !f.barrier && !stop_asked);
            let enqueued = if may_enqueue {
                let micro_batches = plan.next_step(&lengths, &plan_config);
                let pending = self.enqueue_planned(next_step, train, &micro_batches, &schedule)?;
                next_step += 1;
                let barrier = run.cadence.after(next_step).is_barrier();
                Some(InFlight {
                    pending,
                    epoch: plan.epoch,
                    cursor: plan.cursor,
                    barrier,
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
            let (mut control, due) = self.report_step(done, &mut state, &mut run, train, eval)?;
            if self.agreed_stop()? {
                run.summary.interrupted = true;
                control = Control::Stop;
            }
            // A request made while the next step is already on the device applies after it:
            // its update is done, so the checkpoint must include it.
            stopping |= control == Control::Stop;
            if in_flight.is_some() && control != Control::Continue {
                pending_control = pending_control.max(control);
                continue;
            }
            let control = control.max(std::mem::take(&mut pending_control));
            if due.save || control != Control::Continue {
                run.summary.last_checkpoint = self
                    .save_checkpoint(&state)?
                    .or(run.summary.last_checkpoint);
            }
            if control == Control::Stop {
                run.summary.stopped = true;
                tracing::warn!(step = state.global_step, "training stopped on request");
                break;
            }
        }
        run.progress.finish();
        if let Some(dp) = &self.dp {
            // Whatever reads the model next (saving it, the caller) reads current weights.
            dp.sync_masters(self.model.params())?;
        }
        if let Some(dir) = &self.config.output_dir {
            let rows = |key| run.metrics.rows_of(key);
            // The run's name: its output directory's.
            let name = dir.file_name().map(|n| n.to_string_lossy().into_owned());
            crate::train::plot::loss_curve(
                &dir.join("loss.png"),
                name.as_deref().unwrap_or("run"),
                &rows("loss"),
                &rows("eval_loss"),
            )?;
        }
        Ok(run.summary)
    }

    /// Whether a stop was asked for. A signal reaches the ranks of a data-parallel run at
    /// different moments, so they agree (any rank's request counts) at the same points of the
    /// loop, and every rank enqueues and stops at the same step.
    fn agreed_stop(&self) -> Result<bool> {
        let asked = self.stop.load(Ordering::SeqCst);
        let Some(dp) = &self.dp else {
            return Ok(asked);
        };
        let agreed = dp.any(asked)?;
        if agreed {
            self.stop.store(true, Ordering::SeqCst);
        }
        Ok(agreed)
    }

    /// A step is done: its metrics written and shown, the callbacks asked, and the evaluation
    /// run if it is due. Returns what the callbacks asked for and what is due.
    fn report_step(
        &mut self,
        done: InFlight,
        state: &mut TrainerState,
        run: &mut Run,
        train: &[Example],
        eval: Option<&[Example]>,
    ) -> Result<(Control, Due)> {
        let mut m = self.finish_step(done.pending)?;
        (state.global_step, state.epoch, state.cursor) =
            (state.global_step + 1, done.epoch, done.cursor);
        m.epoch = state.epoch as f64 + state.cursor as f64 / train.len() as f64;
        m.elapsed_s = run.start.elapsed().as_secs_f64();
        run.metrics
            .write(&serde_json::to_value(&m).expect("metrics serialise"))?;
        run.progress.step(&m);
        run.summary.skipped_steps += m.skipped as usize;
        let mut control = Control::Continue;
        for cb in self.callbacks.iter_mut() {
            control = control.max(cb.on_step_end(&m)?);
        }
        run.summary.steps.push(m);
        let due = run.cadence.after(state.global_step);
        if let (true, Some(ev)) = (due.eval, eval) {
            let e = self.evaluate_at(state, ev)?;
            run.progress.eval(&e);
            run.metrics
                .write(&serde_json::to_value(&e).expect("metrics serialise"))?;
            for cb in self.callbacks.iter_mut() {
                control = control.max(cb.on_eval_end(&e)?);
            }
            run.summary.evals.push(e);
        }
        Ok((control, due))
    }

    /// Checks the run's inputs, then takes the output directory's lock (one run per directory)
    /// and sweeps what killed runs left there; `None` without an output directory.
    fn lock_output_dir(
        &self,
        train: &[Example],
        eval: Option<&[Example]>,
    ) -> Result<Option<OutputLock>> {
        if train.is_empty() {
            return Err(Error::Training("no training examples".into()));
        }
        if self.config.eval_steps > 0 && eval.is_none() {
            return Err(Error::Training(
                "eval_steps is set but there is no eval set".into(),
            ));
        }
        let Some(dir) = &self.config.output_dir else {
            return Ok(None);
        };
        let lock = OutputLock::acquire(dir)?;
        checkpoint::sweep(dir)?;
        Ok(Some(lock))
    }

    /// The state a run starts from: fresh, or the resumed checkpoint's after checking that it
    /// continues this very run (same data, order and batching); callbacks are told.
    fn begin_run(&mut self, train: &[Example]) -> Result<TrainerState> {
        let mut state = TrainerState {
            format_version: checkpoint::FORMAT_VERSION,
            global_step: 0,
            total_steps: self.total_steps(train),
            epoch: 0,
            cursor: 0,
            seed: self.config.seed,
            shuffle: self.config.shuffle,
            n_train_examples: train.len(),
            examples_per_step: self.plan_config().batch_size * self.config.grad_accum,
            max_tokens_per_batch: self.config.max_tokens_per_batch,
            group_by_length: self.config.group_by_length,
            data_hash: data_hash(train),
            param_shapes: self.param_shapes(),
            best_eval_loss: None,
        };
        let resumed = self.resume.take();
        match (&resumed, &self.config.output_dir) {
            (Some((dir, saved)), _) => {
                state
                    .check_compatible(saved)
                    .map_err(|m| Error::model(dir, m))?;
                tracing::info!(checkpoint = %dir.display(), step = saved.global_step, "resuming");
                state.global_step = saved.global_step;
                state.epoch = saved.epoch;
                state.cursor = saved.cursor;
                state.best_eval_loss = saved.best_eval_loss;
            }
            (None, Some(dir)) => {
                if let Some((step, _)) = checkpoint::list(dir).pop() {
                    return Err(Error::Training(format!(
                        "{} already holds checkpoints (the newest: checkpoint-{step}) of an earlier run: \
                         resume it (Trainer::resume_from; in a recipe, resume_from: latest) or use another output_dir",
                        dir.display()
                    )));
                }
            }
            (None, None) => {}
        }
        for cb in self.callbacks.iter_mut() {
            if let Some((dir, _)) = &resumed {
                cb.on_resume(dir)?;
            }
            cb.on_train_begin(&state)?;
        }
        Ok(state)
    }

    /// Enqueues step `step` over the examples the plan chose (indices into `train`, one list
    /// per micro-batch).
    fn enqueue_planned(
        &mut self,
        step: usize,
        train: &[Example],
        micro_batches: &[Vec<usize>],
        schedule: &LrSchedule,
    ) -> Result<PendingStep> {
        let examples: Vec<Vec<Example>> = micro_batches
            .iter()
            .map(|mb| mb.iter().map(|&i| train[i].clone()).collect())
            .collect();
        let mbs: Vec<&[Example]> = examples.iter().map(Vec::as_slice).collect();
        self.enqueue_step_with(step, &mbs, schedule, true)
    }

    /// Evaluates on `eval` after the step `state` describes, and keeps the best loss.
    fn evaluate_at(&mut self, state: &mut TrainerState, eval: &[Example]) -> Result<EvalMetrics> {
        if let Some(dp) = &self.dp {
            // Evaluation reads the float32 weights.
            dp.sync_masters(self.model.params())?;
        }
        let r = self.evaluate(eval)?;
        state.best_eval_loss = Some(state.best_eval_loss.map_or(r.loss, |b| b.min(r.loss)));
        Ok(EvalMetrics {
            step: state.global_step,
            eval_loss: r.loss,
            eval_accuracy: r.accuracy,
            eval_tokens: r.tokens,
            samples: self.eval_samples(eval)?,
        })
    }

    /// At each evaluation during training, greedy continuations of the first `prompts` eval
    /// examples' prompts, logged with the eval metrics (metrics.jsonl, TensorBoard text), as a
    /// look at what the model writes beside what the loss says. Only rank 0 of a data-parallel
    /// run samples (it is the one that writes); a model that cannot generate logs none.
    pub fn set_eval_sampler(&mut self, sampler: EvalSampler) {
        self.sampler = Some(sampler);
    }

    fn eval_samples(&self, eval: &[Example]) -> Result<Vec<EvalSample>> {
        let Some(s) = self.sampler.as_ref().filter(|_| self.rank() == 0) else {
            return Ok(Vec::new());
        };
        // An example whose first token is already a target has no prompt to continue.
        let chosen: Vec<(&Example, usize)> = (eval.iter().take(s.prompts))
            .filter_map(|ex| {
                let first = ex.loss_mask.iter().position(|&t| t).filter(|&f| f > 0)?;
                Some((ex, first))
            })
            .collect();
        let prompts: Vec<&[u32]> = chosen.iter().map(|(ex, f)| &ex.input_ids[..*f]).collect();
        // All prompts in one batch where the model decodes batches.
        let Some(news) = (self.model).greedy_continuations(&prompts, s.max_new_tokens, s.eos)?
        else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for (((ex, _), prompt), new) in chosen.iter().zip(&prompts).zip(news) {
            let reference: Vec<u32> = (ex.input_ids.iter().zip(&ex.loss_mask))
                .filter(|(_, &t)| t)
                .map(|(&id, _)| id)
                .collect();
            out.push(EvalSample {
                prompt: (s.decode)(prompt)?,
                completion: (s.decode)(&new)?,
                reference: (s.decode)(&reference)?,
            });
        }
        Ok(out)
    }
}

fn lengths_of(examples: &[Example]) -> Vec<usize> {
    examples.iter().map(Example::len).collect()
}
