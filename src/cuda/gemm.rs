//! cuBLAS products candle's matmul does not make: weight gradients (bf16 in and out, float32
//! accumulation, as PyTorch's autocast makes them), and products scaled by a factor and added
//! into an existing result in the same pass (cuBLAS's alpha and beta), which spare a LoRA adapter
//! its separate scale and add launches.

use candle_core::{DType, Tensor};
use half::bf16;

use super::launch::*;
use crate::error::{Error, Result};
use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
use sys::cublasOperation_t as Op;

/// The weight gradient dy^T x of a linear layer, dy (N, out) and x (N, in) bf16 on CUDA, as a
/// bf16 (out, in) matrix straight from cuBLAS (bf16 products, float32 accumulation): what
/// PyTorch's autocast gives a float32 weight (a bf16 product, then widened). The fused optimizer
/// reads it as it is, so neither a cast pass nor a float32 copy of every weight's gradient is
/// needed.
pub fn weight_grad_bf16(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    weight_grad_bf16_scaled(dy, x, 1.0)
}

/// `alpha` · [`weight_grad_bf16`], the factor applied in the product's float32 accumulator.
pub fn weight_grad_bf16_scaled(dy: &Tensor, x: &Tensor, alpha: f32) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (n, out) = dy.dims2()?;
    let (n2, inp) = x.dims2()?;
    if n != n2 || dy.dtype() != DType::BF16 || x.dtype() != DType::BF16 {
        return Err(Error::Config(format!(
            "weight gradient of {:?} {:?} and {:?} {:?}",
            dy.shape(),
            dy.dtype(),
            x.shape(),
            x.dtype()
        )));
    }
    let (dy, x) = (dy.contiguous()?, x.contiguous()?);
    Ok(with_storages(&[&dy, &x], |s| {
        let dev = s[0].0.device.clone();
        let (dyv, xv) = (
            cview::<bf16>(s[0].0, s[0].1)?,
            cview::<bf16>(s[1].0, s[1].1)?,
        );
        let dw = unsafe { dev.alloc::<bf16>((out * inp).max(1))? };
        let stream = dev.cuda_stream();
        {
            let (pa, _ga) = xv.device_ptr(&stream);
            let (pb, _gb) = dyv.device_ptr(&stream);
            let (pc, _gc) = dw.device_ptr(&stream);
            let beta = 0f32;
            // Column-major view of the row-major product: dW^T (in, out) = x^T (in, N) · dy (N, out).
            // SAFETY: the pointers are the live buffers of x, dy and the new dw, of the shapes
            // checked above.
            unsafe {
                gemm_bf16(
                    &dev,
                    (Op::CUBLAS_OP_N, Op::CUBLAS_OP_T),
                    (inp, out, n),
                    (alpha, beta),
                    (pa, inp),
                    (pb, out),
                    (pc, inp),
                )
            }
            .map_err(|e| cerr(format!("cublas weight gradient: {e:?}")))?;
        }
        wrap(dw, &dev, (out, inp), &dy)
    })?)
}

/// `alpha` · a · op(b), plus `acc` when given, all bf16 on CUDA (float32 accumulation): a (M, K);
/// b (N, K) with `b_transposed` (op(b) = b^T), else (K, N). With `acc` (M, N) the result is
/// written into acc's own buffer and acc is returned: the caller must hold the only handle to it
/// (a product it just made), since nothing else may see it change.
pub fn matmul_bf16(
    a: &Tensor,
    b: &Tensor,
    b_transposed: bool,
    alpha: f32,
    acc: Option<Tensor>,
) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (m, k) = a.dims2()?;
    let (n, k2) = match b_transposed {
        true => b.dims2()?,
        false => {
            let (k2, n) = b.dims2()?;
            (n, k2)
        }
    };
    let bad = k != k2
        || a.dtype() != DType::BF16
        || b.dtype() != DType::BF16
        || acc
            .as_ref()
            .is_some_and(|c| c.dtype() != DType::BF16 || c.dims() != [m, n] || !c.is_contiguous());
    if bad {
        return Err(Error::Config(format!(
            "scaled product of {:?} {:?} and {:?} {:?} (transposed: {b_transposed}) into {:?}",
            a.shape(),
            a.dtype(),
            b.shape(),
            b.dtype(),
            acc.as_ref().map(|c| (c.shape().clone(), c.dtype()))
        )));
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let mut ts = vec![&a, &b];
    if let Some(c) = &acc {
        ts.push(c);
    }
    let made = with_storages(&ts, |s| {
        let dev = s[0].0.device.clone();
        let (av, bv) = (
            cview::<bf16>(s[0].0, s[0].1)?,
            cview::<bf16>(s[1].0, s[1].1)?,
        );
        let stream = dev.cuda_stream();
        let (pa, _ga) = av.device_ptr(&stream);
        let (pb, _gb) = bv.device_ptr(&stream);
        // Into acc (beta 1), or into a new buffer every element of which the product writes
        // (beta 0: cuBLAS does not read C).
        let fresh = match s.get(2) {
            Some(_) => None,
            None => Some(unsafe { dev.alloc::<bf16>((m * n).max(1))? }),
        };
        let acc_view = s.get(2).map(|c| cview::<bf16>(c.0, c.1)).transpose()?;
        let (pc, _gc) = match (&fresh, &acc_view) {
            (Some(f), _) => f.device_ptr(&stream),
            (None, Some(v)) => v.device_ptr(&stream),
            (None, None) => unreachable!("a product has an output"),
        };
        let beta = if fresh.is_some() { 0f32 } else { 1f32 };
        // Column-major view of the row-major C (M, N) = A op(B): C^T (N, M) = op(B)^T · A^T,
        // where row-major A is column-major A^T (K, M) and row-major b is its own transpose.
        let (op_b, ldb) = match b_transposed {
            true => (Op::CUBLAS_OP_T, k),
            false => (Op::CUBLAS_OP_N, n),
        };
        // SAFETY: the pointers are the live buffers of `a`, `b` and the output with the shapes
        // checked above; the output is a fresh buffer or an `acc` its caller holds alone.
        unsafe {
            gemm_bf16(
                &dev,
                (op_b, Op::CUBLAS_OP_N),
                (n, m, k),
                (alpha, beta),
                (pb, ldb),
                (pa, k),
                (pc, n),
            )
        }
        .map_err(|e| cerr(format!("cublas scaled product: {e:?}")))?;
        drop((_gc, _ga, _gb));
        fresh.map(|f| wrap(f, &dev, (m, n), &a)).transpose()
    })?;
    drop(ts);
    Ok(match made {
        Some(t) => t,
        None => acc.expect("an accumulator"),
    })
}

/// One column-major cuBLAS product C = alpha op_a(A) op_b(B) + beta C of bf16 matrices with
/// float32 accumulation: `mnk` are cuBLAS's m, n, k; each matrix is (device address, leading
/// dimension).
///
/// # Safety
/// The addresses must be live device buffers on the cuBLAS handle's stream, large enough for the
/// shapes and leading dimensions given, and C written by nothing else meanwhile.
unsafe fn gemm_bf16(
    dev: &candle_core::CudaDevice,
    (op_a, op_b): (Op, Op),
    (m, n, k): (usize, usize, usize),
    (alpha, beta): (f32, f32),
    (a, lda): (u64, usize),
    (b, ldb): (u64, usize),
    (c, ldc): (u64, usize),
) -> std::result::Result<(), candle_core::cuda_backend::cudarc::cublas::result::CublasError> {
    let bf16 = sys::cudaDataType::CUDA_R_16BF;
    gemm_ex(
        *dev.cublas_handle().handle(),
        op_a,
        op_b,
        m as i32,
        n as i32,
        k as i32,
        &alpha as *const f32 as *const _,
        a as *const _,
        bf16,
        lda as i32,
        b as *const _,
        bf16,
        ldb as i32,
        &beta as *const f32 as *const _,
        c as *mut _,
        bf16,
        ldc as i32,
        sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
        sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
    )
}
