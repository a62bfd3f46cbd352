//! Evaluation: mean loss per target token (and token accuracy) of a model over examples, without
//! a `Trainer` and without gradients.

use candle_core::Device;

use crate::collate::{Collator, TrainBatch};
use crate::data::Example;
use crate::error::{Error, Result};
use crate::model::Model;

/// Mean loss per target token, token accuracy (arg-max), target tokens.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EvalResult {
    /// Mean negative log-likelihood per target token.
    pub loss: f64,
    /// Arg-max token accuracy, where the model reports it (`Model::eval_sums`).
    pub accuracy: Option<f64>,
    /// Target tokens evaluated.
    pub tokens: usize,
}

/// Evaluates `model` on `examples` in batches of `batch_size` built by `collator` on `device`:
/// the mean loss per target token over all of them (not a mean of batch means), and token
/// accuracy where the model reports it. Batches without a target token are skipped; an eval set
/// without any is an error.
pub fn evaluate<M, C>(
    model: &M,
    collator: &C,
    examples: &[Example],
    batch_size: usize,
    device: &Device,
) -> Result<EvalResult>
where
    M: Model,
    C: Collator<Batch = M::Batch>,
{
    let (mut sum, mut n, mut correct) = (0f64, 0usize, Some(0usize));
    for chunk in examples.chunks(batch_size.max(1)) {
        let b = collator.collate(chunk, device)?;
        if b.n_targets() == 0 {
            continue;
        }
        let e = model.eval_sums(&b)?;
        sum += e.loss_sum;
        n += e.n_targets;
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
