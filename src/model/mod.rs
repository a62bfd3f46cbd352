#![doc = include_str!("README.md")]

pub mod arch;
pub mod decoder;
pub mod families;
pub mod generate;
pub mod lora;
pub mod spec;
pub mod weights;

use std::path::Path;

use candle_core::{backprop::GradStore, DType, Tensor};

use crate::collate::TrainBatch;
use crate::error::{Error, Result};

pub use crate::nn::param::Param;
pub use decoder::{BatchKvCache, ComputeOptions, DecoderModel, KvCache, LoraSetup};
pub use spec::ArchSpec;

/// The summed loss of a batch and the number of target tokens it sums over. Summing (not
/// averaging) lets the trainer normalise by the targets of the whole optimizer step, so padded,
/// padding-free and accumulated runs agree exactly.
#[derive(Debug, Clone)]
pub struct LossSum {
    /// Scalar tensor: the negative log-likelihood summed over the batch's target tokens (each
    /// weighted by its target weight under sequence normalisation).
    pub sum: Tensor,
    /// Number of target tokens in the batch.
    pub n_targets: usize,
    /// An auxiliary loss of the batch, coefficient included (MoE router load balancing).
    pub aux: Option<Tensor>,
}

/// What `forward_backward` differentiates: `sum * per_unit + aux * aux`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScale {
    /// 1 / the loss units (target tokens or sequences) of the whole optimizer step.
    pub per_unit: f64,
    /// This micro-batch's share of the step's tokens: the auxiliary loss of the step is the
    /// token-weighted mean of its micro-batches'.
    pub aux: f64,
}

/// Summed evaluation statistics of a batch.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EvalSums {
    /// Negative log-likelihood summed over the batch's target tokens, unweighted.
    pub loss_sum: f64,
    /// Number of target tokens in the batch.
    pub n_targets: usize,
    /// Targets whose arg-max prediction is right; `None` when the model does not report it.
    pub n_correct: Option<usize>,
}

/// Back-propagates `l.sum * scale.per_unit + l.aux * scale.aux` through the graph `l` holds.
pub fn backward_of(l: LossSum, scale: LossScale) -> Result<(LossSum, GradStore)> {
    let mut objective = (&l.sum * scale.per_unit)?;
    if let Some(a) = &l.aux {
        objective = (objective + (a * scale.aux)?)?;
    }
    let grads = objective.backward()?;
    Ok((l, grads))
}

/// What the trainer needs of a model. `Batch` is the collated type the model reads: a collator
/// producing another type does not fit this model, and `Trainer` rejects the pair at compile time.
///
/// Only `loss`, `params` and `save` are required. The provided methods are fast paths a model may
/// override (`DecoderModel` overrides all of them): a model that wraps another must forward
/// `forward_backward`, `eval_sums`, `compute_copies` and `set_compute_copies_fresh` to the inner
/// model, or training falls back to the defaults (autograd through `loss`, no token accuracy, no
/// kept bf16 weight copies) and runs slower, with the same numbers.
pub trait Model {
    /// The collated batch type this model reads (`Batch` for `DecoderModel`).
    type Batch: TrainBatch;
    /// Summed negative log-likelihood over the batch's target tokens.
    fn loss(&self, batch: &Self::Batch) -> Result<LossSum>;
    /// Every trainable parameter, in a stable order.
    fn params(&self) -> &[Param];
    /// Writes the model in Hugging Face layout (config.json + safetensors) into `dir`.
    fn save(&self, dir: &Path) -> Result<()>;

    /// The loss and the gradients of `loss.sum * scale.per_unit (+ aux * scale.aux)`. Models that recompute activations in
    /// the backward pass (gradient checkpointing) override this; the default back-propagates
    /// through the graph `loss` built.
    fn forward_backward(
        &self,
        batch: &Self::Batch,
        scale: LossScale,
    ) -> Result<(LossSum, GradStore)> {
        backward_of(self.loss(batch)?, scale)
    }

    /// Low-precision copies of parameters that the forward/backward computes with, as
    /// (index into `params()`, copy), for an optimizer that can write them in the pass that
    /// updates the weights (the fused CUDA AdamW); empty where the model keeps none. A sharded
    /// data-parallel optimizer sends these copies from each parameter's owner instead of the
    /// float32 weights: the forward must read a copied parameter only through its copy, except
    /// those [`Model::masters_read`] names.
    fn compute_copies(&self) -> Result<Vec<(usize, Tensor)>> {
        Ok(Vec::new())
    }

    /// Parameters with a compute copy whose float32 weight the forward reads as well (an
    /// embedding table looked up in float32 so that its gradient stays float32), as indices
    /// into `params()`: a sharded optimizer sends these whole too.
    fn masters_read(&self) -> Vec<usize> {
        Vec::new()
    }

    /// Tells the model whether its `compute_copies` hold the current weights (the optimizer
    /// just wrote them with the update), so that the next forward/backward need not cast the
    /// weights again. The trainer sets it only inside its own loop, where nothing else writes
    /// the weights, and clears it before anything else can.
    fn set_compute_copies_fresh(&self, _fresh: bool) {}

    /// Loss (and, where the model reports it, token accuracy) without gradient updates.
    fn eval_sums(&self, batch: &Self::Batch) -> Result<EvalSums> {
        // `loss` sums weighted targets under sequence normalisation; a per-token mean needs the
        // unweighted sum, which only the model can give.
        if batch.loss_units() != batch.n_targets() as f64 {
            return Err(Error::Training(
                "evaluation with loss_normalization: sequences needs a Model that implements eval_sums".into(),
            ));
        }
        let l = self.loss(batch)?;
        Ok(EvalSums {
            loss_sum: l.sum.to_dtype(DType::F64)?.to_scalar::<f64>()?,
            n_targets: l.n_targets,
            n_correct: None,
        })
    }

    /// The greedy continuation of `prompt` (at most `max_new_tokens`, ending before `eos`), for
    /// the trainer's eval samples; `None` where the model cannot generate (the default).
    fn greedy_continuation(
        &self,
        _prompt: &[u32],
        _max_new_tokens: usize,
        _eos: Option<u32>,
    ) -> Result<Option<Vec<u32>>> {
        Ok(None)
    }

    /// [`Model::greedy_continuation`] of several prompts (a model that decodes a batch
    /// together overrides it); `None` where the model cannot generate.
    fn greedy_continuations(
        &self,
        prompts: &[&[u32]],
        max_new_tokens: usize,
        eos: Option<u32>,
    ) -> Result<Option<Vec<Vec<u32>>>> {
        let mut out = Vec::with_capacity(prompts.len());
        for p in prompts {
            match self.greedy_continuation(p, max_new_tokens, eos)? {
                Some(c) => out.push(c),
                None => return Ok(None),
            }
        }
        Ok(Some(out))
    }

    /// Replaces every parameter with the tensor of the same name in `dir` (a directory this
    /// model's `save` wrote), checking names and shapes first so a mismatch changes nothing.
    fn load_params(&self, dir: &Path) -> Result<()> {
        load_params_from(self, dir)
    }
}

/// `Model::load_params`' default: every parameter from `dir`'s safetensors by name.
pub(crate) fn load_params_from<M: Model + ?Sized>(model: &M, dir: &Path) -> Result<()> {
    let mut w = weights::CheckpointWeights::open(dir)?;
    let loaded = read_params(model.params(), &mut w, dir)?;
    for (p, t) in model.params().iter().zip(loaded) {
        p.var.set(&t)?;
    }
    model.set_compute_copies_fresh(false);
    Ok(())
}

/// Every parameter's tensor from `w` (named `path` in errors), checked before anything changes:
/// each present with its shape, nothing left over, every value finite.
pub(crate) fn read_params(
    params: &[Param],
    w: &mut weights::CheckpointWeights,
    path: &Path,
) -> Result<Vec<Tensor>> {
    let mut loaded = Vec::with_capacity(params.len());
    for p in params {
        let t = p.var.as_tensor();
        loaded.push(w.get(&p.name, t.dims(), t.dtype(), t.device())?);
    }
    if let Some(extra) = w.unused().first() {
        return Err(Error::model(
            path,
            format!("checkpoint has a weight the model does not: {extra}"),
        ));
    }
    if let Some(bad) = loaded
        .iter()
        .zip(params)
        .find(|(t, _)| !all_finite(t).unwrap_or(false))
    {
        return Err(Error::model(
            path,
            format!("weight `{}` holds NaN or infinity", bad.1.name),
        ));
    }
    Ok(loaded)
}

/// Whether every value of `t` is finite (`sum(t * 0)` is NaN exactly when one is not).
pub(crate) fn all_finite(t: &Tensor) -> Result<bool> {
    let z = (t * 0.0)?
        .sum_all()?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    Ok(z.is_finite())
}
