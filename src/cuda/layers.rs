//! Fused layers with their backward passes (src/cuda/kernels/fused_ops.cu), as candle custom ops
//! and as `*_vjp` forms for the hand-written layer backward: RMSNorm, SiLU-gated products and a
//! vectorised add. One kernel each way instead of a chain, no float32 intermediates kept.

use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CpuStorage, CudaStorage, CustomOp2, DType, Layout, Shape, Tensor};
use half::bf16;

use super::launch::*;
use crate::error::{Error, Result};
use crate::pullback::{PairGrads, Pullback};

struct Add;

impl CustomOp2 for Add {
    fn name(&self) -> &'static str {
        "packsft-add"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused add: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        a: &CudaStorage,
        al: &Layout,
        b: &CudaStorage,
        bl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = al.shape().elem_count();
        let dev = a.device.clone();
        let (av, bv) = (cview::<bf16>(a, al)?, cview::<bf16>(b, bl)?);
        let y = unsafe { dev.alloc::<bf16>(n)? };
        let f = ops_func(&dev, "add_bf16")?;
        let stream = dev.cuda_stream();
        let mut l = stream.launch_builder(&f);
        let n64 = n as u64;
        l.arg(&av).arg(&bv).arg(&y).arg(&n64);
        unsafe { l.launch(grid_cfg(n.div_ceil(256 * 8), 8)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), al.shape().clone()))
    }
    fn bwd(
        &self,
        _a: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(dy.clone()), Some(dy.clone())))
    }
}

/// a + b for bf16 tensors of one shape on CUDA in one vectorised pass (candle's strided add
/// reads at about a third of the card's bandwidth: the gradient sums and residuals of every
/// layer); anything else through candle's add. Differentiable either way.
pub fn add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if usable(a) && usable(b) && a.dims() == b.dims() {
        let (a, b) = (a.contiguous()?, b.contiguous()?);
        return Ok(a.apply_op2(&b, Add)?);
    }
    Ok((a + b)?)
}

const NORM_MAX_HIDDEN: usize = 256 * 32;

/// Whether the fused RMSNorm kernels take rows of `x`'s width.
pub fn rms_norm_fits(x: &Tensor) -> bool {
    x.dims().last().is_some_and(|&h| h <= NORM_MAX_HIDDEN)
}

/// The RMSNorm backward instance (`rms_norm_bwd_c{COLS}` in fused_ops.cu) with the fewest columns
/// a thread that still covers `h` with 256 threads.
fn rms_norm_bwd_kernel(h: usize) -> &'static str {
    const INSTANCES: [(usize, &str); 8] = [
        (1, "rms_norm_bwd_c1"),
        (2, "rms_norm_bwd_c2"),
        (4, "rms_norm_bwd_c4"),
        (8, "rms_norm_bwd_c8"),
        (12, "rms_norm_bwd_c12"),
        (16, "rms_norm_bwd_c16"),
        (24, "rms_norm_bwd_c24"),
        (32, "rms_norm_bwd_c32"),
    ];
    let cols = h.div_ceil(256);
    INSTANCES
        .iter()
        .find(|(c, _)| *c >= cols)
        .map_or("rms_norm_bwd_c32", |(_, name)| name)
}

struct RmsNorm {
    eps: f32,
    rstd: Mutex<Option<Arc<CudaSlice<f32>>>>,
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "packsft-rms-norm"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused RMSNorm: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        xs: &CudaStorage,
        xl: &Layout,
        ws: &CudaStorage,
        wl: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let (rows, h) = xl.shape().dims2()?;
        let dev = xs.device.clone();
        let (x, w) = (cview::<bf16>(xs, xl)?, cview::<f32>(ws, wl)?);
        let y = unsafe { dev.alloc::<bf16>(rows * h)? };
        let rstd = unsafe { dev.alloc::<f32>(rows.max(1))? };
        let f = ops_func(&dev, "rms_norm_fwd")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let (r, hh) = (rows as i32, h as i32);
        b.arg(&x)
            .arg(&w)
            .arg(&y)
            .arg(&rstd)
            .arg(&r)
            .arg(&hh)
            .arg(&self.eps);
        unsafe { b.launch(grid_cfg(rows, 8)) }.w()?;
        *self.rstd.lock().unwrap() = Some(Arc::new(rstd));
        Ok((CudaStorage::wrap_cuda_slice(y, dev), xl.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (rows, h) = x.dims2()?;
        let rstd = self
            .rstd
            .lock()
            .unwrap()
            .clone()
            .ok_or_else(|| cerr("no forward"))?;
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        with_storages(&[x, w, &dy], |s| {
            let dev = s[0].0.device.clone();
            let (xv, wv, dyv) = (
                cview::<bf16>(s[0].0, s[0].1)?,
                cview::<f32>(s[1].0, s[1].1)?,
                cview::<bf16>(s[2].0, s[2].1)?,
            );
            let dx = unsafe { dev.alloc::<bf16>(rows * h)? };
            let dw = dev.alloc_zeros::<f32>(h)?;
            let f = ops_func(&dev, rms_norm_bwd_kernel(h))?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let (r, hh) = (rows as i32, h as i32);
            b.arg(&xv)
                .arg(&wv)
                .arg(&dyv)
                .arg(rstd.as_ref())
                .arg(&dx)
                .arg(&dw)
                .arg(&r)
                .arg(&hh);
            // Four blocks an SM at most: each then strides over more rows, and fewer blocks
            // end with an atomic add of every column of the weight's gradient.
            unsafe { b.launch(grid_cfg(rows, 4)) }.w()?;
            Ok((
                Some(wrap(dx, &dev, (rows, h), x)?),
                Some(wrap(dw, &dev, h, x)?),
            ))
        })
    }
}

/// RMSNorm as the reference `nn::ops::rms_norm` (x bf16 (.., hidden), float32 weight (hidden)), fused;
/// the weight's gradient is float32. Only for rows that [`rms_norm_fits`].
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let h = *dims.last().unwrap_or(&0);
    if !rms_norm_fits(x) {
        return Err(Error::Training(format!(
            "fused RMSNorm takes rows of at most {NORM_MAX_HIDDEN} values, not {h}"
        )));
    }
    let x2 = x.reshape(((), h))?.contiguous()?;
    let w = w.to_dtype(DType::F32)?.contiguous()?;
    let op = RmsNorm {
        eps: eps as f32,
        rstd: Mutex::new(None),
    };
    Ok(x2.apply_op2(&w, op)?.reshape(dims)?)
}

/// [`rms_norm`] with its pullback (dx, float32 dw) for a hand-written backward; `None` where the
/// fused kernel does not apply (hidden size above its limit).
pub fn rms_norm_vjp(
    x: &Tensor,
    w: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Pullback<PairGrads>)>> {
    let dims = x.dims().to_vec();
    let h = *dims.last().unwrap_or(&0);
    if h > NORM_MAX_HIDDEN {
        return Ok(None);
    }
    let x2 = x.reshape(((), h))?.contiguous()?.detach();
    let w = w.to_dtype(DType::F32)?.contiguous()?.detach();
    // The forward leaves rstd in the op for its backward: keep a handle on it.
    let op: Arc<Box<dyn CustomOp2 + Send + Sync>> = Arc::new(Box::new(RmsNorm {
        eps: eps as f32,
        rstd: Mutex::new(None),
    }));
    let y2 = x2.apply_op2_arc(&w, op.clone())?;
    let y = y2.reshape(dims.as_slice())?;
    let back = move |dy: &Tensor| -> Result<PairGrads> {
        let dy = dy.reshape(((), h))?;
        let (dx, dw) = op.bwd(&x2, &w, &y2, &dy)?;
        let dx = dx.ok_or_else(|| cerr("rms_norm: no dx"))?;
        Ok((
            dx.reshape(dims.as_slice())?,
            dw.ok_or_else(|| cerr("rms_norm: no dw"))?,
        ))
    };
    Ok(Some((y, Box::new(back))))
}

struct SiluMul;

impl CustomOp2 for SiluMul {
    fn name(&self) -> &'static str {
        "packsft-silu-mul"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        Err(cerr("fused SiLU-mul: CUDA only"))
    }
    fn cuda_fwd(
        &self,
        gs: &CudaStorage,
        gl: &Layout,
        us: &CudaStorage,
        ul: &Layout,
    ) -> candle_core::Result<(CudaStorage, Shape)> {
        let n = gl.shape().elem_count();
        let dev = gs.device.clone();
        let (g, u) = (cview::<bf16>(gs, gl)?, cview::<bf16>(us, ul)?);
        let y = unsafe { dev.alloc::<bf16>(n)? };
        let f = ops_func(&dev, "silu_mul_fwd")?;
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&f);
        let nn = n as i64;
        b.arg(&g).arg(&u).arg(&y).arg(&nn);
        unsafe { b.launch(elementwise_cfg(n)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(y, dev), gl.shape().clone()))
    }
    fn bwd(
        &self,
        g: &Tensor,
        u: &Tensor,
        _y: &Tensor,
        dy: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let dy = dy.to_dtype(DType::BF16)?.contiguous()?;
        let n = g.elem_count();
        with_storages(&[g, u, &dy], |s| {
            let dev = s[0].0.device.clone();
            let (gv, uv, dv) = (
                cview::<bf16>(s[0].0, s[0].1)?,
                cview::<bf16>(s[1].0, s[1].1)?,
                cview::<bf16>(s[2].0, s[2].1)?,
            );
            let dg = unsafe { dev.alloc::<bf16>(n)? };
            let du = unsafe { dev.alloc::<bf16>(n)? };
            let f = ops_func(&dev, "silu_mul_bwd")?;
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            let nn = n as i64;
            b.arg(&gv).arg(&uv).arg(&dv).arg(&dg).arg(&du).arg(&nn);
            unsafe { b.launch(elementwise_cfg(n)) }.w()?;
            Ok((
                Some(wrap(dg, &dev, g.shape().clone(), g)?),
                Some(wrap(du, &dev, u.shape().clone(), g)?),
            ))
        })
    }
}

/// silu(g) * u for bf16 g and u of one shape, fused.
pub fn silu_mul(g: &Tensor, u: &Tensor) -> Result<Tensor> {
    Ok(g.contiguous()?.apply_op2(&u.contiguous()?, SiluMul)?)
}

/// [`silu_mul`] with its pullback (dg, du).
pub fn silu_mul_vjp(g: &Tensor, u: &Tensor) -> Result<(Tensor, Pullback<PairGrads>)> {
    let g = g.contiguous()?.detach();
    let u = u.contiguous()?.detach();
    let y = g.apply_op2(&u, SiluMul)?;
    let y2 = y.clone();
    let back = move |dy: &Tensor| -> Result<PairGrads> {
        let (dg, du) = SiluMul.bwd(&g, &u, &y2, dy)?;
        Ok((
            dg.ok_or_else(|| cerr("silu_mul: no dg"))?,
            du.ok_or_else(|| cerr("silu_mul: no du"))?,
        ))
    };
    Ok((y, Box::new(back)))
}
