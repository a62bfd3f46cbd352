//! The vocabulary projection and the loss as graph nodes of their own on the training path, so
//! that autograd never holds a rows x vocab tensor or its gradient:
//! - [`lm_head_node`]: the logits, the weight gradient handed straight to the master weight;
//! - [`lm_head_nll_node`]: the logits, Granite's scaling, Gemma 2's final soft-cap and the per-row
//!   loss in one node;
//! - [`frozen_head_nll`]: the same for a head that takes no gradient (the frozen base under
//!   LoRA), on any device and also under gradient checkpointing: the loss and its gradient with
//!   respect to the hidden rows are both made in the forward, a chunk of rows at a time
//!   ([`frozen_head_chunks`]), so the logits exist only one chunk at a time.
//!
//! The first two run inside `nn::graph::scope` with hand-written layers, on the GPU's bf16 path.

use candle_core::{DType, Tensor};

use super::super::spec::ArchSpec;
use super::parts::Lin;
use super::pullbacks::lin_vjp;
use crate::error::Result;
use crate::nn::graph::{count_frozen_head, in_scope, Attach};
use crate::nn::kernels;
use crate::pullback::Pullback;

/// Logit elements of one chunk of a frozen head: 64 Mi, 128 MiB in bf16 (523 rows of Llama 3's
/// 128,256-token vocabulary). The whole step's logits and their gradient, held until the head's
/// backward, were 2 x 128256 x 2 bytes a row: 1.2 GB for 2,400 rows, 16 GB for a 32k-token row.
const HEAD_CHUNK_ELEMENTS: usize = 64 << 20;

/// The vocabulary projection as one graph node whose backward hands the weight gradient
/// straight to the master weight (autograd would make a gradient of the weight copy, then
/// cast and add it); `None` outside [`scope`], with autograd layers, and
/// off the GPU's bf16 path, where there is no cast to save and the node's copy of the
/// float32 logits would cost time and memory.
pub(super) fn lm_head_node(lin: &Lin, h: &Tensor, autograd_layers: bool) -> Result<Option<Tensor>> {
    if !hand_written_head(h, autograd_layers) {
        return Ok(None);
    }
    let (y, back) = lin_vjp(lin, &h.detach())?;
    let y = y.contiguous()?;
    Ok(Some(h.apply_op2(&y, Attach::new(back))?))
}

/// Whether the vocabulary projection of `h` joins the graph as a node of its own: inside
/// [`scope`], with hand-written layers, on the GPU's bf16 path.
fn hand_written_head(h: &Tensor, autograd_layers: bool) -> bool {
    in_scope() && !autograd_layers && h.device().is_cuda() && h.dtype() == DType::BF16
}

/// The vocabulary projection and the per-row loss (negative log-likelihood of `targets`) as
/// one graph node, on the same terms as [`lm_head_node`], with Granite's logits scaling and
/// Gemma 2's final soft-cap inside ([`logit_transform_vjp`]): autograd then holds only per-row
/// and hidden-sized gradients. As two nodes, it added the logits' gradient (rows x vocab) into
/// a zero-filled tensor of that size every step; through autograd, a soft-cap kept four
/// rows x vocab tensors and their gradients (Gemma 2's vocabulary is 256k).
/// A head that takes no gradient (a frozen base under LoRA) goes through
/// [`frozen_head_chunks`] instead, on any device: its logits are never held.
pub(super) fn lm_head_nll_node(
    lin: &Lin,
    h: &Tensor,
    targets: &Tensor,
    spec: &ArchSpec,
    autograd_layers: bool,
) -> Result<Option<Tensor>> {
    if in_scope() && !autograd_layers {
        if let Some(nll) = frozen_head_nll(lin, h, targets, spec)? {
            return Ok(Some(nll));
        }
    }
    if !hand_written_head(h, autograd_layers) {
        return Ok(None);
    }
    let (logits, lin_back) = lin_vjp(lin, &h.detach())?;
    let (logits, transform_back) =
        logit_transform_vjp(&logits, spec.logits_scaling, spec.final_softcap)?;
    // ce_back keeps the logits for the backward, as the cross-entropy node did.
    let Some((nll, ce_back)) = kernels::nll_vjp(&logits, targets)? else {
        return Ok(None);
    };
    let back = move |g: &Tensor| -> Result<Tensor> { lin_back(&transform_back(&ce_back(g)?)?) };
    Ok(Some(h.apply_op2(&nll, Attach::new(Box::new(back)))?))
}

/// `DecoderModel::logits`' transform of a head's raw logits x, with its pullback:
/// y = x / scaling (Granite's `logits_scaling`), then y = cap * tanh(y / cap) (Gemma 2's
/// `final_logit_softcapping`). The pullback keeps only y (tanh' = 1 - (y / cap)^2), in the
/// logits' dtype as candle's own tanh backward computes it; the identity costs nothing.
pub(super) fn logit_transform_vjp(
    logits: &Tensor,
    scaling: f64,
    cap: Option<f64>,
) -> Result<(Tensor, Pullback<Tensor>)> {
    // Divided, not multiplied by the inverse: the same roundings as `DecoderModel::logits`.
    let unscale = move |t: &Tensor| -> Result<Tensor> {
        Ok(if scaling != 1.0 {
            (t / scaling)?
        } else {
            t.clone()
        })
    };
    let z = unscale(logits)?;
    let Some(c) = cap else {
        return Ok((z, Box::new(move |g: &Tensor| unscale(g))));
    };
    let y = ((z / c)?.tanh()? * c)?;
    let kept = y.clone();
    let back = move |g: &Tensor| -> Result<Tensor> {
        let t = (&kept / c)?;
        let slope = (t.sqr()?.neg()? + 1.0)?;
        unscale(&(g * slope)?)
    };
    Ok((y, Box::new(back)))
}

/// A training step's per-row loss through a frozen head ([`frozen_head_chunks`], chunks of
/// about [`HEAD_CHUNK_ELEMENTS`] logits); `None` for a head that takes a gradient. Only where a
/// backward follows: the forward makes the hidden rows' gradient.
pub(super) fn frozen_head_nll(
    lin: &Lin,
    h: &Tensor,
    targets: &Tensor,
    spec: &ArchSpec,
) -> Result<Option<Tensor>> {
    if !frozen(lin) || h.dim(0)? == 0 {
        return Ok(None);
    }
    let rows = (HEAD_CHUNK_ELEMENTS / lin.w.dim(0)?.max(1)).max(1);
    count_frozen_head();
    let transform = (spec.logits_scaling, spec.final_softcap);
    frozen_head_chunks(lin, h, targets, transform, rows).map(Some)
}

/// Whether `lin` takes no gradient: a frozen weight (a tensor, not a variable), no adapter and
/// no trainable bias.
fn frozen(lin: &Lin) -> bool {
    !lin.w.is_variable() && lin.lora.is_none() && lin.b.as_ref().is_none_or(|b| !b.is_variable())
}

/// The per-row loss of a frozen head as one graph node whose forward also makes the loss's
/// gradient with respect to each hidden row for an upstream gradient of 1 (`unit`: d nll_r /
/// d h_r, a hidden-sized row). Row r's loss depends on row r alone, so the backward only scales
/// row r of `unit` by its upstream gradient g_r. The forward goes `rows_per_chunk` rows at a
/// time: each chunk's logits, their loss and gradient, and the chunk of `unit` (the same two
/// products as the backward of [`lm_head_nll_node`] makes, now in the forward); nothing of
/// vocabulary size outlives its chunk.
fn frozen_head_chunks(
    lin: &Lin,
    h: &Tensor,
    targets: &Tensor,
    (scaling, cap): (f64, Option<f64>),
    rows_per_chunk: usize,
) -> Result<Tensor> {
    let x = h.detach();
    let rows = x.dim(0)?;
    let w = lin.compute_weight(x.dtype())?.detach();
    let bias = (lin.b.as_ref())
        .map(|b| b.to_dtype(x.dtype()).map(|b| b.detach()))
        .transpose()?;
    let (mut nlls, mut units) = (Vec::new(), Vec::new());
    let mut at = 0;
    while at < rows {
        let n = rows_per_chunk.min(rows - at);
        let logits = x.narrow(0, at, n)?.matmul(&w.t()?)?;
        let logits = match &bias {
            Some(b) => logits.broadcast_add(b)?,
            None => logits,
        };
        let (z, transform_back) = logit_transform_vjp(&logits, scaling, cap)?;
        let (nll, dz) = nll_and_unit_grad(&z, &targets.narrow(0, at, n)?)?;
        let dlogits = transform_back(&dz)?.to_dtype(x.dtype())?;
        units.push(dlogits.matmul(&w)?);
        nlls.push(nll);
        at += n;
    }
    let nll = Tensor::cat(&nlls, 0)?;
    let unit = Tensor::cat(&units, 0)?;
    let back = move |g: &Tensor| -> Result<Tensor> {
        // Scaled in float32: one rounding, as the logits' gradient scaled inside had.
        let g = g.to_dtype(DType::F32)?.unsqueeze(1)?;
        let dx = unit.to_dtype(DType::F32)?.broadcast_mul(&g)?;
        Ok(dx.to_dtype(unit.dtype())?)
    };
    Ok(h.apply_op2(&nll, Attach::new(Box::new(back)))?)
}

/// The per-row negative log-likelihood of logits `z` (rows, vocab) at `targets`, float32, and its
/// gradient with respect to `z` for an upstream gradient of 1 a row (softmax minus one-hot), in
/// `z`'s dtype: the fused kernels on the GPU's bf16 path, candle's ops in float32 elsewhere.
fn nll_and_unit_grad(z: &Tensor, targets: &Tensor) -> Result<(Tensor, Tensor)> {
    if let Some((nll, back)) = kernels::nll_vjp(z, targets)? {
        let dz = back(&nll.ones_like()?)?;
        return Ok((nll, dz));
    }
    let zf = z.to_dtype(DType::F32)?;
    let max = zf.max_keepdim(1)?;
    let lse = (zf.broadcast_sub(&max)?.exp()?.sum_keepdim(1)?.log()? + &max)?;
    let ids = targets.to_dtype(DType::U32)?.unsqueeze(1)?;
    let nll = (&lse - zf.gather(&ids, 1)?)?.squeeze(1)?;
    let p = zf.broadcast_sub(&lse)?.exp()?;
    let one_hot = p.zeros_like()?.scatter_add(&ids, &lse.ones_like()?, 1)?;
    Ok((nll, (p - one_hot)?.to_dtype(z.dtype())?))
}

#[cfg(test)]
mod tests {
    use super::super::testing::{max_diff, values};
    use super::*;
    use candle_core::Device;

    /// Logits scaling and the final soft-cap pull back as candle's autograd through
    /// `DecoderModel::logits`' ops does, in every combination (the identity included).
    #[test]
    fn logit_transform_pulls_back_as_autograd() {
        let x = candle_core::Var::from_tensor(&(values(&[5, 7], 0.37) * 20.0).unwrap()).unwrap();
        let w = values(&[5, 7], 0.91);
        for (s, cap) in [(1.0, None), (4.0, None), (1.0, Some(3.0)), (2.5, Some(1.5))] {
            let (y, back) = logit_transform_vjp(x.as_tensor(), s, cap).unwrap();
            let z = (x.as_tensor() / s).unwrap();
            let want = match cap {
                Some(c) => ((z / c).unwrap().tanh().unwrap() * c).unwrap(),
                None => z,
            };
            let dx = (want.clone() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let dx = dx.get(x.as_tensor()).unwrap();
            let got = back(&w).unwrap();
            let close = |a: &Tensor, b: &Tensor| {
                let d = (a - b).unwrap().abs().unwrap().flatten_all().unwrap();
                d.max(0).unwrap().to_scalar::<f32>().unwrap()
            };
            assert!(close(&y, &want) < 1e-6, "scaling {s} cap {cap:?}: values");
            assert!(close(&got, dx) < 1e-6, "scaling {s} cap {cap:?}: gradient");
            // The soft-cap bends these logits (|x| up to 20 against caps of 1.5 and 3).
            if cap.is_some() {
                assert!(
                    close(&got, &(&w / s).unwrap()) > 0.1,
                    "cap {cap:?} left the slope"
                );
            }
        }
    }

    /// A frozen head's loss and hidden-row gradient, made in the forward a few rows at a time,
    /// equal autograd's through the logits, log-softmax and a weighted sum, with a bias,
    /// Granite's scaling and Gemma 2's soft-cap, for chunks that do and do not divide the rows.
    #[test]
    fn a_frozen_head_in_chunks_gives_autograds_loss_and_gradient() {
        let (rows, hidden, vocab) = (10, 6, 11);
        let w = (values(&[vocab, hidden], 0.53) * 2.0).unwrap();
        let ids: Vec<u32> = (0..rows as u32)
            .map(|r| (r * 7 + 3) % vocab as u32)
            .collect();
        let targets = Tensor::new(ids.as_slice(), &Device::Cpu).unwrap();
        // Upstream gradients that differ by row, as sequence-normalised weights do.
        let g = values(&[rows], 0.71).abs().unwrap();
        for (bias, scaling, cap) in [(false, 1.0, None), (true, 2.5, Some(3.0))] {
            let lin = Lin {
                w: w.clone(),
                b: bias.then(|| values(&[vocab], 0.29)),
                lora: None,
            };
            let h = candle_core::Var::from_tensor(&values(&[rows, hidden], 0.37)).unwrap();
            let mut logits = h.as_tensor().matmul(&w.t().unwrap()).unwrap();
            if let Some(b) = &lin.b {
                logits = logits.broadcast_add(b).unwrap();
            }
            let (z, _) = logit_transform_vjp(&logits, scaling, cap).unwrap();
            let log_p = candle_nn::ops::log_softmax(&z, 1).unwrap();
            let want = log_p
                .gather(&targets.unsqueeze(1).unwrap(), 1)
                .unwrap()
                .squeeze(1)
                .unwrap()
                .neg()
                .unwrap();
            let want_dh = (&want * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let want_dh = want_dh.get(h.as_tensor()).unwrap();
            for chunk in [3, 5, rows] {
                let h2 = candle_core::Var::from_tensor(h.as_tensor()).unwrap();
                let nll = frozen_head_chunks(&lin, h2.as_tensor(), &targets, (scaling, cap), chunk)
                    .unwrap();
                let dh = (&nll * &g).unwrap().sum_all().unwrap().backward().unwrap();
                let dh = dh.get(h2.as_tensor()).expect("h gets a gradient");
                let label = format!("bias {bias}, scaling {scaling}, cap {cap:?}, chunk {chunk}");
                assert!(max_diff(&nll, &want) < 1e-5, "{label}: loss");
                assert!(max_diff(dh, want_dh) < 1e-5, "{label}: gradient");
            }
            // The frozen weight took none.
            assert!(!lin.w.is_variable());
        }
    }
}
