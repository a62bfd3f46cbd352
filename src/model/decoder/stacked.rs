//! The LoRA adapters of a stacked projection (a frozen base's q, k and v as one product): what
//! `backward.rs`'s `stacked_lin_vjp` adds for them, forward and pullback.

use candle_core::Tensor;

use super::parts::{Adapter, Lin};
use crate::error::{Error, Result};
use crate::nn::graph::{hand_weight_grads, side_grad};
use crate::nn::kernels;

/// The LoRA adapters of linear layers whose weights are stacked by rows (a layer's q, k and v),
/// computed as one: A stacked by rows (n·r, in), B block-diagonal (rows, n·r), so the adapters
/// take two products forward and three backward instead of that many per layer. Only without
/// dropout (each adapter would need its own mask of x) and with one scale for all.
pub(super) struct StackedAdapters {
    masters: Vec<(Tensor, Tensor)>,
    /// (rows of the stacked output, first row) per layer.
    rows: Vec<(usize, usize)>,
    r: usize,
    a: Tensor,
    b: Tensor,
    scale: f64,
    /// x A^T, kept for B's gradient.
    u: std::cell::OnceCell<Tensor>,
}

impl StackedAdapters {
    pub(super) fn new(lins: &[&Lin], x: &Tensor) -> Result<Option<Self>> {
        let ads: Vec<&Adapter> = lins.iter().filter_map(|l| l.lora.as_ref()).collect();
        if ads.is_empty() {
            return Ok(None);
        }
        if ads.len() != lins.len()
            || ads
                .iter()
                .any(|a| a.dropout != 0.0 || a.scale != ads[0].scale)
        {
            return Err(Error::Config(
                "internal: stacked projections with adapters of different kinds".into(),
            ));
        }
        let r = ads[0].a.dim(0)?;
        let n = ads.len();
        let mut a_parts = Vec::with_capacity(n);
        let mut b_rows = Vec::with_capacity(n);
        let mut rows = Vec::with_capacity(n);
        let mut row = 0;
        for (i, ad) in ads.iter().enumerate() {
            let (a, b) = ad.weights(x.dtype())?;
            let out = b.dim(0)?;
            a_parts.push(a.detach());
            // Row block i of the block-diagonal B: zeros, B_i, zeros.
            let mut cols = Vec::with_capacity(3);
            if i > 0 {
                cols.push(Tensor::zeros((out, r * i), x.dtype(), x.device())?);
            }
            cols.push(b.detach());
            if i + 1 < n {
                cols.push(Tensor::zeros(
                    (out, r * (n - 1 - i)),
                    x.dtype(),
                    x.device(),
                )?);
            }
            b_rows.push(Tensor::cat(&cols, 1)?);
            rows.push((out, row));
            row += out;
        }
        Ok(Some(Self {
            masters: ads.iter().map(|a| (a.a.clone(), a.b.clone())).collect(),
            rows,
            r,
            a: Tensor::cat(&a_parts, 0)?,
            b: Tensor::cat(&b_rows, 0)?,
            scale: ads[0].scale,
            u: std::cell::OnceCell::new(),
        }))
    }

    /// y + s · (x A^T) B^T, y (N, rows) the stacked base product (held by the caller alone:
    /// on CUDA the adapters' product is added in its buffer, the factor in the product's pass).
    pub(super) fn forward_into(&self, x: &Tensor, y: Tensor) -> Result<Tensor> {
        let u = x.matmul(&self.a.t()?)?;
        let y = kernels::scaled_matmul(&u, &self.b, true, self.scale, Some(y))?;
        let _ = self.u.set(u);
        Ok(y)
    }

    /// Hands over every A's and B's gradient; returns `dx` (held by the caller alone) plus x's
    /// gradient through the adapters.
    pub(super) fn backward_into(&self, dy: &Tensor, x: &Tensor, dx: Tensor) -> Result<Tensor> {
        let u = self.u.get().expect("forward ran");
        let db = match kernels::weight_grad_scaled(dy, u, self.scale)? {
            Some(g) => g,
            None => (dy.t()?.matmul(u)? * self.scale)?,
        };
        let du = kernels::scaled_matmul(dy, &self.b, false, self.scale, None)?;
        // The A's rows of one product, each handed over as its row view (bf16 on CUDA, read
        // as it is by the fused optimizer); B's blocks of the block-diagonal gradient.
        let a_rows: Vec<(Tensor, usize, usize)> = (self.masters.iter().enumerate())
            .map(|(i, (ma, _))| (ma.clone(), self.r * i, self.r))
            .collect();
        hand_weight_grads(&a_rows, &du, x)?;
        for (i, ((_, mb), (out, row))) in self.masters.iter().zip(&self.rows).enumerate() {
            side_grad(mb, db.narrow(0, *row, *out)?.narrow(1, self.r * i, self.r)?)?;
        }
        kernels::scaled_matmul(&du, &self.a, false, 1.0, Some(dx))
    }
}
