//! One optimizer step: collate its micro-batches, forward and backward each with the loss
//! divided by the loss units (target tokens or sequences) of the whole step, accumulate, then
//! clip and update, all enqueued on the device; [`Stepper::finish`] later reads the loss and
//! the gradient norm. On a GPU the trainer enqueues step N+1 before it finishes step N, so the
//! device never waits for the host.

use std::time::Instant;

use candle_core::{backprop::GradStore, DType, Device, Tensor};

use super::metrics::StepMetrics;
use super::optimizer::{AdamW, PendingUpdate};
use super::parallel::DataParallel;
use super::readback::Readback;
use crate::collate::{Collator, TrainBatch};
use crate::data::Example;
use crate::device::Mark;
use crate::dist::ZeroStage;
use crate::error::{Error, Result};
use crate::model::{LossScale, Model};
use crate::nn::graph::with_grad_sink;
use crate::nn::kernels;
use crate::nn::param::accumulate;

/// Sizes of one optimizer step's micro-batches, summed.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepSizes {
    pub loss_units: f64,
    pub target_tokens: usize,
    pub tokens: usize,
    pub positions: usize,
    pub examples: usize,
}

/// Gradients of a step whose losses are still on the device.
pub(crate) struct PendingGrads {
    pub grads: GradStore,
    /// Float64 scalars.
    pub loss_sum: Tensor,
    pub aux_loss: Option<Tensor>,
    /// Data parallel: where this rank's forward and backward passes began and ended on its
    /// device (the gradient sums and the update left out), for the step-time spread.
    pub compute: Option<(Mark, Mark)>,
}

/// Collates `micro_batches` and runs each forward/backward with the loss scaled by the step's
/// loss units, accumulating the gradients; the losses stay on the device (reading them would
/// make the host wait for the whole backward before it can enqueue the optimizer). `None` for
/// the gradients when no micro-batch has a target token.
/// With `dp`, the micro-batches are the whole step's (every rank's): this rank trains on its
/// share, scales by the step's global loss units, and returns the gradients and losses summed
/// over ranks with the global sizes.
pub(crate) fn step_grads<M, C>(
    model: &M,
    collator: &C,
    device: &Device,
    micro_batches: &[&[Example]],
    dp: Option<&DataParallel>,
) -> Result<(StepSizes, Option<PendingGrads>)>
where
    M: Model,
    C: Collator<Batch = M::Batch>,
{
    let (batches, sizes) = collate_step(collator, device, micro_batches, dp)?;
    let mut acc = None;
    let mut loss_sum: Option<Tensor> = None;
    let mut aux_loss: Option<Tensor> = None;
    let f64_sum = |total: Option<Tensor>, x: Tensor| -> Result<_> {
        let x = x.to_dtype(DType::F64)?;
        Ok(Some(match total {
            Some(t) => (t + x)?,
            None => x,
        }))
    };
    // ZeRO 2 reduces each micro-batch's gradients while its backward runs.
    let mut zero2 = dp
        .filter(|d| d.zero() == ZeroStage::Zero2)
        .map(|d| d.zero2_step(model.params()));
    let started = dp.map(|_| Mark::now(device)).transpose()?;
    for b in &batches {
        let Some(b) = b.as_ref().filter(|b| b.n_targets() > 0) else {
            if let Some(z) = &mut zero2 {
                z.end_micro_batch(None)?;
            }
            continue;
        };
        let share = b.n_tokens() as f64 / sizes.tokens as f64;
        let scale = LossScale {
            per_unit: 1.0 / sizes.loss_units,
            aux: share,
        };
        let l = match &mut zero2 {
            Some(z) => {
                let (l, rest) = with_grad_sink(&mut |p, g| z.push(p, g), || {
                    model.forward_backward(b, scale)
                })?;
                z.end_micro_batch(Some(rest))?;
                l
            }
            None => {
                let (l, grads) = model.forward_backward(b, scale)?;
                accumulate(&mut acc, grads, model.params())?;
                l
            }
        };
        // Detached: a loss kept for later reading must not keep the graph (every activation of
        // the step) alive past its backward.
        loss_sum = f64_sum(loss_sum, l.sum.detach())?;
        if let Some(a) = l.aux {
            let a = a.detach().to_dtype(DType::F64)?;
            aux_loss = f64_sum(aux_loss, (a * share)?)?;
        }
    }
    let compute = match started {
        Some(start) => Some((start, Mark::now(device)?)),
        None => None,
    };
    if let Some(d) = dp {
        // Every rank joins every sum, with zeros where it had nothing to add.
        acc = match zero2 {
            Some(z) => z.finish()?,
            None => d.reduce_grads(acc, model.params())?,
        };
        let zero = || Tensor::zeros((), DType::F64, device);
        let has_aux = d.any(aux_loss.is_some())?;
        loss_sum = match (&acc, loss_sum) {
            (None, _) => None,
            (Some(_), l) => Some(d.sum(&l.map_or_else(zero, Ok)?)?),
        };
        aux_loss = match (has_aux && acc.is_some(), aux_loss) {
            (false, _) => None,
            (true, a) => Some(d.sum(&a.map_or_else(zero, Ok)?)?),
        };
    }
    let grads = match (acc, loss_sum) {
        (Some(grads), Some(loss_sum)) => Some(PendingGrads {
            grads,
            loss_sum,
            aux_loss,
            compute,
        }),
        _ => None,
    };
    Ok((sizes, grads))
}

/// This rank's collated micro-batches of a step (one entry per micro-batch of the step: `None`
/// where this rank has no examples in it; it still joins that micro-batch's collectives) and the
/// step's sizes over every rank.
#[allow(clippy::type_complexity)]
fn collate_step<C: Collator>(
    collator: &C,
    device: &Device,
    micro_batches: &[&[Example]],
    dp: Option<&DataParallel>,
) -> Result<(Vec<Option<C::Batch>>, StepSizes)> {
    let shares = dp.map(|d| d.share(micro_batches));
    let mine: Vec<&[Example]> = match &shares {
        Some(s) => s.iter().map(Vec::as_slice).collect(),
        None => micro_batches.to_vec(),
    };
    let batches: Vec<Option<C::Batch>> = mine
        .iter()
        .map(|s| {
            (!s.is_empty())
                .then(|| collator.collate(s, device))
                .transpose()
        })
        .collect::<Result<_>>()?;
    let n_examples: usize = mine.iter().map(|s| s.len()).sum();
    let mine = || batches.iter().flatten();
    let local = [
        mine().map(|b| b.loss_units()).sum::<f64>(),
        mine().map(|b| b.n_targets()).sum::<usize>() as f64,
        mine().map(|b| b.n_tokens()).sum::<usize>() as f64,
        mine().map(|b| b.n_positions()).sum::<usize>() as f64,
        n_examples as f64,
    ];
    // The step's sizes over every rank: host numbers, exchanged without touching the device.
    let all = match dp {
        Some(d) => d.sum_host(&local)?,
        None => local.to_vec(),
    };
    let sizes = StepSizes {
        loss_units: all[0],
        target_tokens: all[1] as usize,
        tokens: all[2] as usize,
        positions: all[3] as usize,
        examples: all[4] as usize,
    };
    Ok((batches, sizes))
}

/// A sharded optimizer's update: each rank holds the summed gradients of the parameters it
/// owns and updates those, clipped by the norm over every rank's (one scalar sum). With compute
/// copies kept (`keep_copies`, bf16), the owner's copies are written in the update's pass as one
/// process writes them (or cast here where the update does not), and every rank takes the bf16
/// copies of other ranks' matrices from their owners (`DataParallel::sync_copies`), so the next
/// forward recasts nothing; their float32 masters catch up at `DataParallel::sync_masters`.
/// Without kept copies every parameter's float32 master comes from its owner.
fn sharded_update<M: Model>(
    optimizer: &mut AdamW,
    model: &M,
    d: &DataParallel,
    grads: &mut GradStore,
    guard: &Tensor,
    (max_grad_norm, lr): (f64, f64),
    keep_copies: bool,
) -> Result<PendingUpdate> {
    let params = model.params();
    let copies = if keep_copies {
        model.compute_copies()?
    } else {
        Vec::new()
    };
    // The copies of what this rank updates: indexed as the sharded optimizer's slots (the
    // owned parameters only), and beside their masters for a cast where the update writes none.
    let (mut mine, mut cast) = (Vec::new(), Vec::new());
    for (i, c) in &copies {
        if let Some(slot) = d.slot_of(*i) {
            mine.push((slot, c.clone()));
            cast.push((params[*i].var.as_tensor(), c));
        }
    }
    let sum = |sumsq: &Tensor| d.sum(sumsq);
    let update = optimizer.enqueue_clip_and_step(
        grads,
        &d.owned(params),
        max_grad_norm,
        lr,
        Some(guard),
        &mine,
        Some(&sum),
    )?;
    if copies.is_empty() {
        d.sync_params(params)?;
        model.set_compute_copies_fresh(false);
        return Ok(update);
    }
    if !cast.is_empty() && !update.wrote_copies() {
        kernels::cast_bf16_into(&cast)?;
    }
    d.sync_copies(params, &copies, &model.masters_read())?;
    model.set_compute_copies_fresh(true);
    Ok(update)
}

/// The error of a step that must have targets (a direct gradient computation).
pub(crate) fn no_targets() -> Error {
    Error::Training("an optimizer step has no target token in any of its examples".into())
}

/// An optimizer step enqueued by [`Trainer::enqueue_step`](super::Trainer::enqueue_step), to
/// hand to [`Trainer::finish_step`](super::Trainer::finish_step).
#[must_use = "finish the step to learn its loss and whether its update was applied"]
pub struct PendingStep {
    step: usize,
    /// `None` for a step without a target token, which was skipped.
    update: Option<EnqueuedUpdate>,
    lr: f64,
    sizes: StepSizes,
    t0: Instant,
}

struct EnqueuedUpdate {
    /// The summed loss, and the auxiliary loss where the model has one.
    losses: Readback,
    has_aux: bool,
    update: PendingUpdate,
    compute: Option<(Mark, Mark)>,
}

/// The optimizer and the step clock.
pub(crate) struct Stepper {
    pub optimizer: AdamW,
    /// When the last step finished (steps may overlap on a GPU).
    last_finished: Option<Instant>,
}

impl Stepper {
    pub fn new(optimizer: AdamW) -> Self {
        Self {
            optimizer,
            last_finished: None,
        }
    }

    /// Enqueues step `step` (0-based) at learning rate `lr`: the gradients (see [`step_grads`]),
    /// then clip and update, guarded on the device by the loss; with `keep_copies` the update
    /// also writes the model's compute copies of the new weights (see
    /// `Model::compute_copies`). A step without a target token is skipped: no update.
    #[allow(clippy::too_many_arguments)]
    pub fn enqueue<M, C>(
        &mut self,
        model: &M,
        collator: &C,
        device: &Device,
        step: usize,
        micro_batches: &[&[Example]],
        lr: f64,
        max_grad_norm: f64,
        keep_copies: bool,
        dp: Option<&DataParallel>,
    ) -> Result<PendingStep>
    where
        M: Model,
        C: Collator<Batch = M::Batch>,
    {
        let t0 = Instant::now();
        if !keep_copies {
            // This step casts its copies from the masters: they must be current.
            if let Some(d) = dp {
                d.sync_masters(model.params())?;
            }
            model.set_compute_copies_fresh(false);
        }
        let (sizes, grads) = step_grads(model, collator, device, micro_batches, dp)?;
        let Some(mut g) = grads else {
            tracing::warn!(
                step = step + 1,
                "no target token in this step's examples: step skipped"
            );
            return Ok(PendingStep {
                step,
                update: None,
                lr,
                sizes,
                t0,
            });
        };
        let t_grads = t0.elapsed();
        let update = match dp.filter(|d| d.sharded()) {
            // Each rank holds the summed gradients of the parameters it owns: it updates those,
            // clipped by the norm over every rank's (one scalar sum), then takes every other
            // parameter from its owner.
            Some(d) => sharded_update(
                &mut self.optimizer,
                model,
                d,
                &mut g.grads,
                &g.loss_sum,
                (max_grad_norm, lr),
                keep_copies,
            )?,
            None => {
                let copies = if keep_copies {
                    model.compute_copies()?
                } else {
                    Vec::new()
                };
                let update = self.optimizer.enqueue_clip_and_step(
                    &mut g.grads,
                    model.params(),
                    max_grad_norm,
                    lr,
                    Some(&g.loss_sum),
                    &copies,
                    None,
                )?;
                model.set_compute_copies_fresh(keep_copies && update.wrote_copies());
                update
            }
        };
        let has_aux = g.aux_loss.is_some();
        let losses = Readback::enqueue(std::iter::once(g.loss_sum).chain(g.aux_loss).collect())?;
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
            update: Some(EnqueuedUpdate {
                losses,
                has_aux,
                update,
                compute: g.compute,
            }),
            lr,
            sizes,
            t0,
        })
    }

    /// Waits for an enqueued step and reports it; a non-finite loss or gradient norm is an
    /// error (the device left the weights as they were). With `dp`, every rank's compute time
    /// is exchanged (on the host) for the step-time spread.
    pub fn finish(&mut self, p: PendingStep, dp: Option<&DataParallel>) -> Result<StepMetrics> {
        let skipped = p.update.is_none();
        let (loss, grad_norm, aux_loss, compute) = match p.update {
            None => (0.0, 0.0, None, None),
            Some(u) => {
                let losses = u.losses.read();
                let grad_norm = self.optimizer.settle(u.update)?;
                let losses = losses?;
                let compute = match (dp, &u.compute) {
                    (Some(d), Some((start, end))) => Some(rank_times(d, start.seconds_to(end)?)?),
                    _ => None,
                };
                (
                    losses[0] / p.sizes.loss_units,
                    grad_norm,
                    u.has_aux.then(|| losses[1]),
                    compute,
                )
            }
        };
        for (what, v) in [("loss", loss), ("gradient norm", grad_norm)] {
            if !v.is_finite() {
                return Err(Error::Training(format!(
                    "step {}: {what} is {v}; the last good checkpoint is kept",
                    p.step + 1
                )));
            }
        }
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
            skipped,
            rank_spread: compute.as_deref().map(spread),
            rank_compute_s: compute,
        })
    }
}

/// Every rank's seconds, by rank, from each rank's own (a host sum of one-hot rows).
fn rank_times(d: &DataParallel, mine: f64) -> Result<Vec<f64>> {
    let mut row = vec![0.0; d.world_size()];
    row[d.rank()] = mine;
    d.sum_host(&row)
}

/// (slowest - fastest) / slowest: the share of the slowest rank's compute time the fastest
/// rank spends waiting for it at the step's gradient sums; 0 when no rank computed anything.
pub(crate) fn spread(times: &[f64]) -> f64 {
    let max = times.iter().copied().fold(0.0, f64::max);
    let min = times.iter().copied().fold(f64::INFINITY, f64::min);
    if max > 0.0 {
        (max - min) / max
    } else {
        0.0
    }
}
