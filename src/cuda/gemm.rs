//! Weight gradients as one cuBLAS product: bf16 in and out, float32 accumulation (as PyTorch's
//! autocast makes them).

use candle_core::{DType, Tensor};
use half::bf16;

use super::launch::*;
use crate::error::{Error, Result};

/// The weight gradient dy^T x of a linear layer, dy (N, out) and x (N, in) bf16 on CUDA, as a
/// bf16 (out, in) matrix straight from cuBLAS (bf16 products, float32 accumulation): what
/// PyTorch's autocast gives a float32 weight (a bf16 product, then widened). The fused optimizer
/// reads it as it is, so neither a cast pass nor a float32 copy of every weight's gradient is
/// needed.
pub fn weight_grad_bf16(dy: &Tensor, x: &Tensor) -> Result<Tensor> {
    use candle_core::cuda_backend::cudarc::cublas::{result::gemm_ex, sys};
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
            let (alpha, beta) = (1f32, 0f32);
            // Column-major view of the row-major product: dW^T (in, out) = x^T (in, N) · dy (N, out).
            unsafe {
                gemm_ex(
                    *dev.cublas_handle().handle(),
                    sys::cublasOperation_t::CUBLAS_OP_N,
                    sys::cublasOperation_t::CUBLAS_OP_T,
                    inp as i32,
                    out as i32,
                    n as i32,
                    &alpha as *const f32 as *const _,
                    pa as *const _,
                    sys::cudaDataType::CUDA_R_16BF,
                    inp as i32,
                    pb as *const _,
                    sys::cudaDataType::CUDA_R_16BF,
                    out as i32,
                    &beta as *const f32 as *const _,
                    pc as *mut _,
                    sys::cudaDataType::CUDA_R_16BF,
                    inp as i32,
                    sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    sys::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )
            }
            .map_err(|e| cerr(format!("cublas weight gradient: {e:?}")))?;
        }
        wrap(dw, &dev, (out, inp), &dy)
    })?)
}
