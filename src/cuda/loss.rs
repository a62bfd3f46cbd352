//! The masked cross-entropy on bf16 logits with its backward: per-row negative log-likelihood
//! (float32 log-sum-exp minus the target's logit), the log-sum-exp kept for the backward.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

use super::launch::*;
use crate::error::{Error, Result};
use crate::pullback::Pullback;

struct CrossEntropy {
    lse: Arc<Mutex<Option<Arc<CudaSlice<f32>>>>>,
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "packsft-cross-entropy"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused cross-entropy: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ts: &CudaStorage,
        tl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, vocab) = xl.shape().dims2()?;
        let dev = xs.device.clone();
        let (x, t) = (cview::<bf16>(xs, xl)?, cview::<u32>(ts, tl)?);
        let lse = unsafe { dev.alloc::<f32>(rows.max(1))? };
        let nll = unsafe { dev.alloc::<f32>(rows.max(1))? };
        let f = ops_func(&dev, "ce_fwd_bf16")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (r, v) = (rows as i32, vocab as i32);
        b.arg(&x).arg(&t).arg(&lse).arg(&nll).arg(&r).arg(&v);
        unsafe { b.launch(grid_cfg(rows, 16)) }.w()?;
        *self.lse.lock().unwrap() = Some(Arc::new(lse));
        Ok((CudaStorage::wrap_cuda_slice(nll, dev), Shape::from(rows)))
    }
    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, vocab) = x.dims2()?;
        let lse = self
            .lse
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| cerr("no forward"))?;
        let g = g.to_dtype(DType::F32)?.contiguous()?;
        with_storages(&[x, t, &g], |s| {
            let dev = s[0].0.device.clone();
            let (xv, tv, gv) = (
                cview::<bf16>(s[0].0, s[0].1)?,
                cview::<u32>(s[1].0, s[1].1)?,
                cview::<f32>(s[2].0, s[2].1)?,
            );
            let dx = unsafe { dev.alloc::<bf16>(rows * vocab)? };
            let f = ops_func(&dev, "ce_bwd_bf16")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (r, v) = (rows as i32, vocab as i32);
            b.arg(&xv)
                .arg(&tv)
                .arg(lse.as_ref())
                .arg(&gv)
                .arg(&dx)
                .arg(&r)
                .arg(&v);
            unsafe { b.launch(grid_cfg(rows, 16)) }.w()?;
            Ok((Some(wrap(dx, &dev, (rows, vocab), x)?), None))
        })
    }
}

/// Negative log-likelihood (rows,) float32 of u32 `targets` under bf16 `logits` (rows,
/// vocab), as the reference `nn::ops::nll` computes it (float32 log-sum-exp minus the target's logit),
/// in one kernel each way and without float32 logits; a target outside the vocabulary gives NaN.
pub fn nll(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let targets = targets.to_dtype(DType::U32)?.contiguous()?;
    let op = CrossEntropy {
        lse: Arc::new(Mutex::new(None)),
    };
    Ok(logits.contiguous()?.apply_op2(&targets, op)?)
}

/// [`nll`] outside autograd, with its backward (the per-row loss gradient to the logits'
/// gradient) as a function: for a graph node that owns the logits, so that autograd never holds
/// a logits-sized gradient (it would add it into a zero-filled one).
pub fn nll_with_backward(logits: &Tensor, targets: &Tensor) -> Result<(Tensor, Pullback<Tensor>)> {
    let (logits, targets) = (
        logits.detach().contiguous()?,
        targets.to_dtype(DType::U32)?.contiguous()?,
    );
    let lse = Arc::new(Mutex::new(None));
    let op = CrossEntropy { lse: lse.clone() };
    let nll = logits.apply_op2_no_bwd(&targets, &op)?;
    let y = nll.clone();
    let back = move |g: &Tensor| -> Result<Tensor> {
        let (dx, _) = CrossEntropy { lse }.bwd(&logits, &targets, &y, g)?;
        dx.ok_or_else(|| Error::Config("cross-entropy backward gave no gradient".into()))
    };
    Ok((nll, Box::new(back)))
}
