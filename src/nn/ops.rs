//! Differentiable building blocks.
//!
//! candle's fused `softmax_last_dim`, `rms_norm`, `layer_norm` and `rope*` have no backward pass:
//! a gradient silently stops at them. Everything here is composed of ops that candle can
//! differentiate, and `tests/parity_transformers.rs` and `tests/families.rs` check every parameter's
//! gradient against PyTorch.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;

/// Softmax over the last dimension. The row maximum is detached: subtracting any constant
/// leaves softmax unchanged, so it only serves numerical range and needs no gradient.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    let s = e.sum_keepdim(D::Minus1)?;
    Ok(e.broadcast_div(&s)?)
}

/// log(sum(exp(x))) over the last dimension, keeping it (stable, differentiable).
pub fn logsumexp_last(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let s = x.broadcast_sub(&m)?.exp()?.sum_keepdim(D::Minus1)?;
    Ok(s.log()?.broadcast_add(&m)?)
}

/// RMSNorm as Llama computes it: `w * x / sqrt(mean(x^2) + eps)` over the last dimension,
/// in float32 whatever the input dtype.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let inv = (xf.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let normed = xf.broadcast_mul(&inv)?.to_dtype(dtype)?;
    Ok(normed.broadcast_mul(&weight.to_dtype(dtype)?)?)
}

/// Layer norm over the last dimension, in float32 (biased variance, as `torch.nn.LayerNorm`);
/// without weight and bias it is OLMo's parameter-free norm.
pub fn layer_norm(
    x: &Tensor,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    let dtype = x.dtype();
    let xf = x.to_dtype(DType::F32)?;
    let centred = xf.broadcast_sub(&xf.mean_keepdim(D::Minus1)?)?;
    let inv = (centred.sqr()?.mean_keepdim(D::Minus1)? + eps)?
        .sqrt()?
        .recip()?;
    let mut y = centred.broadcast_mul(&inv)?;
    if let Some(w) = weight {
        y = y.broadcast_mul(&w.to_dtype(DType::F32)?)?;
    }
    if let Some(b) = bias {
        y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
    }
    Ok(y.to_dtype(dtype)?)
}

/// `rotate_half` of the Llama family: `[-x2, x1]` for `x = [x1, x2]` along the last dim.
fn rotate_half(x: &Tensor) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    Ok(Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?)
}

/// Rotary tables: `cos`/`sin` of shape (max_positions, rotary_dim), each half repeated as
/// transformers does (`emb = cat(freqs, freqs)`), computed in float32 like transformers.
#[derive(Debug, Clone)]
pub struct RopeTable {
    /// Cosines, float32, one row per position.
    pub cos: Tensor,
    /// Sines, float32, one row per position.
    pub sin: Tensor,
    /// Columns of each table: twice the number of inverse frequencies.
    pub rotary_dim: usize,
}

impl RopeTable {
    /// The tables of positions `0..max_positions` for the inverse frequencies `inv_freq`.
    pub fn new(inv_freq: &[f32], max_positions: usize, device: &Device) -> Result<Self> {
        let half = inv_freq.len();
        let mut cos = Vec::with_capacity(max_positions * half * 2);
        let mut sin = Vec::with_capacity(max_positions * half * 2);
        for p in 0..max_positions {
            let row: Vec<f32> = inv_freq.iter().map(|&f| p as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        Ok(Self {
            cos: Tensor::from_vec(cos, (max_positions, 2 * half), device)?,
            sin: Tensor::from_vec(sin, (max_positions, 2 * half), device)?,
            rotary_dim: 2 * half,
        })
    }

    /// cos/sin rows for flattened `position_ids` (N,), shaped (N, 1, rotary_dim) to broadcast
    /// over heads.
    pub fn gather(&self, position_ids: &Tensor, dtype: DType) -> Result<(Tensor, Tensor)> {
        let n = position_ids.dim(0)?;
        let cos = self
            .cos
            .index_select(position_ids, 0)?
            .reshape((n, 1, self.rotary_dim))?;
        let sin = self
            .sin
            .index_select(position_ids, 0)?
            .reshape((n, 1, self.rotary_dim))?;
        Ok((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?))
    }
}

/// Applies rotary embeddings to `x` of shape (N, heads, head_dim) with cos/sin (N, 1, rot):
/// the first `rot` channels rotate (partial rotary keeps the rest unchanged).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rot = cos.dim(D::Minus1)?;
    let hd = x.dim(D::Minus1)?;
    let (xr, rest) = if rot == hd {
        (x.clone(), None)
    } else {
        (
            x.narrow(D::Minus1, 0, rot)?,
            Some(x.narrow(D::Minus1, rot, hd - rot)?),
        )
    };
    let out = (xr.broadcast_mul(cos)? + rotate_half(&xr)?.broadcast_mul(sin)?)?;
    Ok(match rest {
        None => out,
        Some(r) => Tensor::cat(&[&out, &r], D::Minus1)?,
    })
}

/// Negative log-likelihood (n,) of `targets` (n,) u32 under `logits` (n, vocab), in float32.
/// Only rows that carry loss are passed in, so no ignore index is needed.
pub fn nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let logits = logits.to_dtype(DType::F32)?;
    let lse = logsumexp_last(&logits)?.squeeze(1)?;
    let picked = logits.gather(&targets.unsqueeze(1)?, 1)?.squeeze(1)?;
    Ok((lse - picked)?)
}

/// `table.index_select(idx, 0)` (an embedding lookup, the rows that carry loss).
pub fn index_rows(table: &Tensor, idx: &Tensor) -> Result<Tensor> {
    Ok(table.index_select(idx, 0)?)
}

/// The table's gradient of [`index_rows`] for `dy` (one row per index), computed outside the
/// graph: a zero table with each row of dy added into its table row (repeated indices sum), as
/// candle's index_select backward makes it.
pub fn index_rows_grad(table: &Tensor, idx: &Tensor, dy: &Tensor) -> Result<Tensor> {
    let dy = dy.to_dtype(table.dtype())?;
    Ok(table.zeros_like()?.index_add(&idx.flatten_all()?, &dy, 0)?)
}

/// The sum of per-token losses, each times its weight where there are weights.
pub fn weighted_sum(per_token: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    Ok(match weights {
        Some(w) => (per_token * w)?.sum_all()?,
        None => per_token.sum_all()?,
    })
}
