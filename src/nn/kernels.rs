//! The one place that picks this project's CUDA kernels or the reference formulation, op by op
//! (as candle-nn's `ops.rs` gives one op per-backend bodies). Every function here has the same
//! meaning in every build: with the `cuda` feature, bf16 tensors on a CUDA device take the fused
//! kernels of the `cuda` room; everything else takes the differentiable reference of
//! [`super::ops`], which the kernels are tested against (`tests/gpu_ops.rs`). Callers above
//! (the model) never name a feature.
//!
//! The `*_vjp` forms return a pullback for the hand-written layer backward, or `None` where no
//! kernel applies: the caller then differentiates the reference through candle's autograd.

use candle_core::{CpuStorage, CudaStorage, DType, Layout, Tensor};

use super::ops;
use crate::error::Result;
use crate::pullback::{PairGrads, Pullback};

/// Whether the fused layer kernels apply to `x`: bf16 on a CUDA device of a `cuda` build.
pub fn usable(x: &Tensor) -> bool {
    #[cfg(feature = "cuda")]
    return crate::cuda::usable(x);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = x;
        false
    }
}

/// Whether this build runs its CUDA kernels on `device` (a `cuda` build and a CUDA device).
pub fn on_cuda(device: &candle_core::Device) -> bool {
    cfg!(feature = "cuda") && device.is_cuda()
}

/// Whether `table` takes the fused row gather and scatter (float32 or bf16 matrices on CUDA).
fn gather_usable(table: &Tensor) -> bool {
    on_cuda(table.device())
        && matches!(table.dtype(), DType::F32 | DType::BF16)
        && table.rank() == 2
}

/// [`ops::rms_norm`].
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if usable(x) && crate::cuda::rms_norm_fits(x) {
        return crate::cuda::rms_norm(x, weight, eps);
    }
    ops::rms_norm(x, weight, eps)
}

/// [`ops::apply_rope`].
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if usable(x) {
        return crate::cuda::apply_rope(x, cos, sin);
    }
    ops::apply_rope(x, cos, sin)
}

/// silu(g) * u.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if usable(g) && g.dims() == u.dims() {
        return crate::cuda::silu_mul(g, u);
    }
    Ok((g.silu()? * u)?)
}

/// a + b, differentiable: one vectorised kernel for bf16 tensors of one shape on CUDA (the
/// residuals and gradient sums of every layer; candle's strided add reads at about a third of
/// the card's bandwidth), candle's add elsewhere.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return crate::cuda::add(a, b);
    #[cfg(not(feature = "cuda"))]
    Ok((a + b)?)
}

/// [`ops::nll`]: the fused masked cross-entropy for bf16 logits on CUDA.
pub fn nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if usable(logits) && logits.rank() == 2 {
        return crate::cuda::nll(logits, targets);
    }
    ops::nll(logits, targets)
}

/// Summed (optionally weighted) negative log-likelihood, through [`nll`].
pub fn nll_sum(logits: &Tensor, targets: &Tensor, weights: Option<&Tensor>) -> Result<Tensor> {
    ops::weighted_sum(&nll(logits, targets)?, weights)
}

/// [`ops::index_rows`]: the fused gather for float32 and bf16 tables on CUDA.
pub fn index_rows(table: &Tensor, idx: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gather_usable(table) {
        return crate::cuda::index_rows(table, idx);
    }
    let _ = gather_usable;
    ops::index_rows(table, idx)
}

/// [`ops::index_rows_grad`]: the fused atomic scatter on CUDA.
pub fn index_rows_grad(table: &Tensor, idx: &Tensor, dy: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if gather_usable(table) {
        return crate::cuda::index_rows_grad(table, idx, dy);
    }
    ops::index_rows_grad(table, idx, dy)
}

/// RMSNorm with its pullback (dx, float32 dw); `None` where the kernel does not apply.
pub fn rms_norm_vjp(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Pullback<PairGrads>)>> {
    #[cfg(feature = "cuda")]
    if usable(x) {
        return crate::cuda::rms_norm_vjp(x, w, eps);
    }
    let _ = (x, w, eps);
    Ok(None)
}

/// Rotary embedding with its pullback; `None` where the kernel does not apply.
pub fn apply_rope_vjp(
    x: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Pullback<Tensor>)>> {
    #[cfg(feature = "cuda")]
    if usable(x) {
        return crate::cuda::apply_rope_vjp(x, cos, sin).map(Some);
    }
    let _ = (x, cos, sin);
    Ok(None)
}

/// silu(g) * u with its pullback (dg, du); `None` where the kernel does not apply.
pub fn silu_mul_vjp(g: &Tensor, u: &Tensor) -> Result<Option<(Tensor, Pullback<PairGrads>)>> {
    #[cfg(feature = "cuda")]
    if usable(g) && g.dims() == u.dims() {
        return crate::cuda::silu_mul_vjp(g, u).map(Some);
    }
    let _ = (g, u);
    Ok(None)
}

/// The weight gradient dy^T x of a linear layer as one cuBLAS product with bf16 output and
/// float32 accumulation (as PyTorch's autocast makes it); `None` where that does not apply.
pub fn weight_grad(dy: &Tensor, x: &Tensor) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if usable(dy) && usable(x) && x.rank() == 2 {
        return crate::cuda::weight_grad_bf16(dy, x).map(Some);
    }
    let _ = (dy, x);
    Ok(None)
}

/// [`weight_grad`] times `alpha` (the factor in the product's accumulator on CUDA); `None` where
/// the kernel does not apply.
pub fn weight_grad_scaled(dy: &Tensor, x: &Tensor, alpha: f64) -> Result<Option<Tensor>> {
    #[cfg(feature = "cuda")]
    if usable(dy) && usable(x) && x.rank() == 2 {
        return crate::cuda::weight_grad_bf16_scaled(dy, x, alpha as f32).map(Some);
    }
    let _ = (dy, x, alpha);
    Ok(None)
}

/// `alpha` · a · op(b), plus `acc` when given: a (M, K); b (N, K) with `b_transposed` (op(b) =
/// b^T), else (K, N). In bf16 on CUDA one cuBLAS call, the factor in its accumulator and the sum
/// written into acc's own buffer, so `acc` must be a tensor nothing else holds (a product the
/// caller just made); elsewhere candle's matmul, a scale and an add.
pub fn scaled_matmul(
    a: &Tensor,
    b: &Tensor,
    b_transposed: bool,
    alpha: f64,
    acc: Option<Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if usable(a) && usable(b) && a.rank() == 2 && b.rank() == 2 && acc.as_ref().is_none_or(usable) {
        return crate::cuda::matmul_bf16(a, b, b_transposed, alpha as f32, acc);
    }
    let p = match b_transposed {
        true => a.matmul(&b.t()?)?,
        false => a.matmul(b)?,
    };
    let p = if alpha == 1.0 { p } else { (p * alpha)? };
    Ok(match acc {
        Some(c) => (c + p)?,
        None => p,
    })
}

/// The per-row negative log-likelihood of bf16 `logits` (rows, vocab) with a pullback from its
/// gradient to the logits' gradient; `None` where the fused kernel does not apply.
pub fn nll_vjp(logits: &Tensor, targets: &Tensor) -> Result<Option<(Tensor, Pullback<Tensor>)>> {
    #[cfg(feature = "cuda")]
    if usable(logits) && logits.rank() == 2 {
        return crate::cuda::nll_with_backward(logits, targets).map(Some);
    }
    let _ = (logits, targets);
    Ok(None)
}

/// q, k (rotated) and v out of a stacked projection y (n, (heads + 2 kv_heads) d) in one pass;
/// `None` where the kernel does not apply.
pub fn rope_split_stacked(
    y: &Tensor,
    dims: (usize, usize, usize),
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    #[cfg(feature = "cuda")]
    if usable(y) {
        return crate::cuda::rope_split_stacked(y, dims, cos, sin);
    }
    let _ = (y, dims, cos, sin);
    Ok(None)
}

/// The gradient of [`rope_split_stacked`]: dq and dk rotated back and dv, joined into the
/// stacked product's columns.
pub fn rope_join_stacked(
    dq: &Tensor,
    dk: &Tensor,
    dv: &Tensor,
    cos: &Tensor,
    sin: &Tensor,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    return crate::cuda::rope_join_stacked(dq, dk, dv, cos, sin);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (dq, dk, dv, cos, sin);
        Err(crate::error::Error::Training(
            "rope_join_stacked runs only after rope_split_stacked, which needs CUDA".into(),
        ))
    }
}

/// Writes each `src` (float32) into its `dst` (bf16) copy, in `dst`'s storage (a view's rows of
/// its variable): one launch for all pairs on CUDA, a cast and a copy each elsewhere.
pub fn cast_bf16_into(pairs: &[(&Tensor, &Tensor)]) -> Result<()> {
    #[cfg(feature = "cuda")]
    if pairs.first().is_some_and(|(src, _)| src.device().is_cuda()) {
        return crate::cuda::cast_bf16_into(pairs);
    }
    for (src, dst) in pairs {
        dst.slice_set(&src.to_dtype(DType::BF16)?, 0, 0)?;
    }
    Ok(())
}

/// The tensors widened to float32 and laid end to end in one flat tensor (a data-parallel
/// gradient bucket): one launch on CUDA, casts and a concatenation elsewhere.
pub fn flatten_f32(tensors: &[&Tensor]) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if tensors.first().is_some_and(|t| t.device().is_cuda())
        && tensors.iter().all(|t| t.is_contiguous())
    {
        return crate::cuda::flatten_f32(tensors);
    }
    let flat = tensors
        .iter()
        .map(|t| t.to_dtype(DType::F32)?.flatten_all())
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(Tensor::cat(&flat, 0)?)
}

/// A contiguous copy of `y` (what a custom op's forward returns as its output), on the CPU.
pub fn copy_cpu(y: &CpuStorage, yl: &Layout) -> candle_core::Result<CpuStorage> {
    use candle_core::backend::BackendStorage;
    // A same-dtype conversion is a contiguous copy that honours the layout.
    y.to_dtype(yl, y.dtype())
}

/// A contiguous copy of `y`, on CUDA.
pub fn copy_cuda(y: &CudaStorage, yl: &Layout) -> candle_core::Result<CudaStorage> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::backend::BackendStorage;
        use candle_core::cuda_backend::{CudaDType, WrapErr};
        fn copy<T: CudaDType + candle_core::cuda_backend::cudarc::driver::DeviceRepr>(
            y: &CudaStorage,
            yl: &Layout,
        ) -> candle_core::Result<CudaStorage> {
            let v = crate::cuda::launch::cview::<T>(y, yl)?;
            let dev = y.device.clone();
            let c = dev.cuda_stream().clone_dtod(&v).w()?;
            Ok(CudaStorage::wrap_cuda_slice(c, dev))
        }
        match y.dtype() {
            DType::BF16 => copy::<half::bf16>(y, yl),
            DType::F16 => copy::<half::f16>(y, yl),
            DType::F32 => copy::<f32>(y, yl),
            d => Err(candle_core::Error::Msg(format!("layer output in {d:?}"))),
        }
    }
    #[cfg(not(feature = "cuda"))]
    {
        let _ = (y, yl);
        Err(candle_core::Error::Msg(
            "a CUDA storage in a build without CUDA".into(),
        ))
    }
}
