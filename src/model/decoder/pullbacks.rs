//! Pullbacks of the decoder's pieces, each a forward with its backward: linear layers (with
//! LoRA adapters, stacked q/k/v), norms, RoPE, activations and the gated product, q/k norms.
//! `backward.rs` builds the layers' hand-written backward from these. A piece without a fused
//! kernel goes through candle's autograd locally (`through_autograd`).

use candle_core::{DType, Tensor};

use super::super::spec::{Act, QkNorm};
use super::parts::{activate, head_norm, Lin, Norm};
use super::stacked::StackedAdapters;
use crate::error::{Error, Result};
use crate::nn::graph::{hand_weight_grad, hand_weight_grad_scaled, hand_weight_grads, side_grad};
use crate::nn::kernels::{self, add};
use crate::nn::ops;
use crate::pullback::{grad_or_zeros, through_autograd, PairGrads, Pullback};

pub(super) type Back = Pullback<Tensor>;

/// x (N, in) → x W^T (+ b) (+ s · (x_d A^T) B^T with a LoRA adapter, x_d = dropout(x)); the
/// pullback returns dx and hands dW = dy^T x (and db) over, or with an adapter
/// dB = dy^T (s · x_d A^T) and dA = (s · dy B)^T x_d. A frozen weight or bias (not a
/// variable: LoRA's base) gets no gradient product at all.
pub(super) fn lin_vjp(lin: &Lin, x: &Tensor) -> Result<(Tensor, Back)> {
    let w = lin.compute_weight(x.dtype())?.detach();
    let y = x.matmul(&w.t()?)?;
    let y = match &lin.b {
        Some(b) => y.broadcast_add(&b.to_dtype(x.dtype())?.detach())?,
        None => y,
    };
    let (y, adapter) = match &lin.lora {
        None => (y, None),
        Some(ad) => {
            let (a, b) = ad.weights(x.dtype())?;
            let (a, b) = (a.detach(), b.detach());
            let mask = ad.mask(x)?;
            let xd = match &mask {
                Some(m) => (x * m)?,
                None => x.clone(),
            };
            // u = dropout(x) A^T unscaled; y += s u B^T in the product's own pass (y is the
            // base product just made, held nowhere else).
            let u = xd.matmul(&a.t()?)?;
            let y = kernels::scaled_matmul(&u, &b, true, ad.scale, Some(y))?;
            let masters = (ad.a.clone(), ad.b.clone());
            (y, Some((masters, a, b, xd, u, mask, ad.scale)))
        }
    };
    let (x, master, bias) = (x.clone(), lin.w.clone(), lin.b.clone());
    let back = move |dy: &Tensor| -> Result<Tensor> {
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        if master.is_variable() {
            hand_weight_grad(&master, &dy, &x)?;
        }
        if let Some(b) = bias.as_ref().filter(|b| b.is_variable()) {
            side_grad(b, dy.to_dtype(DType::F32)?.sum(0)?)?;
        }
        let dx = dy.matmul(&w)?;
        let Some(((ma, mb), a, b, xd, u, mask, s)) = &adapter else {
            return Ok(dx);
        };
        // dB = s dy^T u, du = s dy B, dA = du^T dropout(x), dx += du A (into the dx just made).
        hand_weight_grad_scaled(mb, &dy, u, *s)?;
        let du = kernels::scaled_matmul(&dy, b, false, *s, None)?;
        hand_weight_grad(ma, &du, xd)?;
        Ok(match mask {
            Some(m) => (dx + (du.matmul(a)? * m)?)?,
            None => kernels::scaled_matmul(&du, a, false, 1.0, Some(dx))?,
        })
    };
    Ok((y, Box::new(back)))
}

/// x (N, in) → y (N, sum of rows) for linear layers of one input whose compute weights `w` are
/// stacked by rows (a layer's q, k and v): one matrix product forward, and one each for dx and
/// the weight gradients, instead of one each per layer and the adds of their input gradients
/// (cuBLAS runs TinyLlama's one (N, 2,560) product faster than a (N, 2,048) and two (N, 256)
/// ones: benches/gpu/gemm_shapes.py). The pullback takes dy (N, sum of rows).
pub(super) fn stacked_lin_vjp(lins: &[&Lin], w: &Tensor, x: &Tensor) -> Result<(Tensor, Back)> {
    let w = w.detach();
    let y = x.matmul(&w.t()?)?;
    let mut masters = Vec::with_capacity(lins.len());
    let mut row = 0;
    for l in lins {
        let rows = l.w.dim(0)?;
        masters.push((l.w.clone(), row, rows));
        row += rows;
    }
    let y = if lins.iter().any(|l| l.b.is_some()) {
        let b = lins
            .iter()
            .map(|l| match &l.b {
                Some(b) => b.to_dtype(x.dtype()),
                None => Tensor::zeros(l.w.dim(0)?, x.dtype(), x.device()),
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        y.broadcast_add(&Tensor::cat(&b, 0)?.detach())?
    } else {
        y
    };
    let (y, adapters) = match StackedAdapters::new(lins, x)? {
        Some(sa) => (sa.forward_into(x, y)?, Some(sa)),
        None => (y, None),
    };
    let trainable = lins.iter().all(|l| l.w.is_variable());
    let biases: Vec<Option<Tensor>> = lins.iter().map(|l| l.b.clone()).collect();
    let x = x.clone();
    let back = move |dy: &Tensor| -> Result<Tensor> {
        let dy = dy.to_dtype(x.dtype())?.contiguous()?;
        if trainable {
            hand_weight_grads(&masters, &dy, &x)?;
        }
        if biases.iter().any(|b| b.is_some()) {
            let db = dy.to_dtype(DType::F32)?.sum(0)?;
            for (b, (_, row, rows)) in biases.iter().zip(&masters) {
                if let Some(b) = b {
                    side_grad(b, db.narrow(0, *row, *rows)?)?;
                }
            }
        }
        let dx = dy.matmul(&w)?;
        Ok(match &adapters {
            Some(sa) => sa.backward_into(&dy, &x, dx)?,
            None => dx,
        })
    };
    Ok((y, Box::new(back)))
}

pub(super) fn norm_vjp(norm: &Norm, x: &Tensor) -> Result<(Tensor, Back)> {
    if norm.spec.kind == super::super::spec::NormKind::Rms {
        let w = norm.w.as_ref().expect("rms weight");
        if let Some((y, back)) = kernels::rms_norm_vjp(x, w, norm.spec.eps)? {
            let w = w.clone();
            let back = move |dy: &Tensor| -> Result<Tensor> {
                let (dx, dw) = back(dy)?;
                side_grad(&w, dw)?;
                Ok(dx)
            };
            return Ok((y, Box::new(back)));
        }
    }
    let params: Vec<Tensor> = norm.w.iter().chain(norm.b.iter()).cloned().collect();
    let mut inputs = vec![x];
    inputs.extend(params.iter());
    let (has_w, spec) = (norm.w.is_some(), norm.spec);
    let (y, back) = through_autograd(&inputs, |t| {
        let local = Norm {
            spec,
            w: if has_w { Some(t[1].clone()) } else { None },
            b: if has_w { t.get(2).cloned() } else { None },
        };
        local.fwd(&t[0])
    })?;
    Ok((y, x_then_params(back, x.clone(), params)))
}

/// The pullback of a piece through autograd whose inputs are `x` and then parameters: returns
/// dx and hands the parameters' gradients over.
pub(super) fn x_then_params(
    back: Pullback<Vec<Option<Tensor>>>,
    x: Tensor,
    params: Vec<Tensor>,
) -> Back {
    Box::new(move |dy: &Tensor| -> Result<Tensor> {
        let mut g = back(dy)?.into_iter();
        let dx = grad_or_zeros(g.next().flatten(), &x)?;
        for (p, gp) in params.iter().zip(g) {
            if let Some(gp) = gp {
                side_grad(p, gp)?;
            }
        }
        Ok(dx)
    })
}

pub(super) fn rope_vjp(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<(Tensor, Back)> {
    if let Some(fused) = kernels::apply_rope_vjp(x, cos, sin)? {
        return Ok(fused);
    }
    let (y, back) = through_autograd(&[x], |t| ops::apply_rope(&t[0], cos, sin))?;
    let x = x.clone();
    let back = move |dy: &Tensor| grad_or_zeros(back(dy)?.pop().flatten(), &x);
    Ok((y, Box::new(back)))
}

/// act(g) * u with its pullback (dg, du).
pub(super) fn gated_vjp(g: &Tensor, u: &Tensor, act: Act) -> Result<(Tensor, Pullback<PairGrads>)> {
    if act == Act::Silu {
        if let Some(fused) = kernels::silu_mul_vjp(g, u)? {
            return Ok(fused);
        }
    }
    let (y, back) = through_autograd(&[g, u], |t| Ok((activate(&t[0], act)? * &t[1])?))?;
    let (g, u) = (g.clone(), u.clone());
    let back = move |dy: &Tensor| -> Result<PairGrads> {
        let mut r = back(dy)?.into_iter();
        Ok((
            grad_or_zeros(r.next().flatten(), &g)?,
            grad_or_zeros(r.next().flatten(), &u)?,
        ))
    };
    Ok((y, Box::new(back)))
}

pub(super) fn act_vjp(a: &Tensor, act: Act) -> Result<(Tensor, Back)> {
    act_like(a, move |x| activate(x, act))
}

/// An elementwise piece `f` of one input, through autograd.
pub(super) fn act_like(
    a: &Tensor,
    f: impl FnOnce(&Tensor) -> Result<Tensor>,
) -> Result<(Tensor, Back)> {
    let (y, back) = through_autograd(&[a], |t| f(&t[0]))?;
    let a = a.clone();
    let back = move |dy: &Tensor| grad_or_zeros(back(dy)?.pop().flatten(), &a);
    Ok((y, Box::new(back)))
}

/// [`head_norm`] with its pullback; the weights' gradients go to their parameters.
pub(super) fn head_norm_vjp(
    x: &Tensor,
    ws: &[Tensor],
    eps: f64,
    kind: QkNorm,
) -> Result<(Tensor, Back)> {
    let mut inputs = vec![x];
    inputs.extend(ws.iter());
    let (y, back) = through_autograd(&inputs, |t| head_norm(&t[0], &t[1..], eps, kind))?;
    Ok((y, x_then_params(back, x.clone(), ws.to_vec())))
}

/// Adds the input gradients of several pullbacks of one input.
pub(super) fn sum_backs(backs: Vec<(Back, Tensor)>) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (back, dy) in backs {
        let d = back(&dy)?;
        total = Some(match total {
            Some(t) => add(&t, &d)?,
            None => d,
        });
    }
    total.ok_or_else(|| Error::Config("no gradient to add".into()))
}
